"""The TakeCare mappings as data: ``mappings/takecare/*.toml``, read and checked once.

Everything an integration engineer may want to change without touching Python lives in the
TOML files: which trigger means which LUS event (and per sending facility), the code maps,
which segments each message type reads, and which fields are mapped or deliberately ignored.
:func:`load_mapping` reads them once (at import of ``hl7in``) and refuses a bad entry, so a
mistake stops the start instead of mis-mapping traffic.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.model.bundle import EJ_BEDOMD, INGA_BEHOV, LUS_NEED_CODES
from gateway.model.events import LusEvent
from gateway.model.identifiers import IdentifierKind, is_hsa_id
from mappings import MAPPINGS_DIR

__all__ = [
    "DEFAULT_DIR",
    "DocumentType",
    "EventRule",
    "FieldRef",
    "MessageSpec",
    "ProtectedRule",
    "TakeCareMapping",
    "codec_for",
    "load_mapping",
    "parse_field_ref",
]

DEFAULT_DIR = MAPPINGS_DIR / "takecare"

FieldRef = tuple[str, int]  # ("PV2", 9) for PV2-9

_GENDERS = {"male", "female", "other", "unknown"}
_BASES = {"samtycke", "menprovning", "sparr"}
_ENCOUNTER_STATUS = {
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "entered-in-error",
    "unknown",
}
_DISPOSITIONS = {
    "home",
    "alt-home",
    "other-hcf",
    "hosp",
    "long",
    "aadvice",
    "exp",
    "psy",
    "rehab",
    "snf",
    "oth",
}
_DIAGNOSIS_ROLES = {"AD", "DD", "CC", "CM", "pre-op", "post-op", "billing", ""}
_DOC_STATUS = {"preliminary", "final", "amended", "entered-in-error"}
_PRIORITIES = {"routine", "urgent", "asap", "stat"}
_FIELD_REF = re.compile(r"^([A-Z][A-Z0-9]{2})-([1-9][0-9]?)$")
_SEGMENT_KEY = re.compile(
    r"^(?:([A-Z]{3}(?:\^[A-Z0-9]{3})?):)?([A-Z][A-Z0-9]{2})(?:-([1-9][0-9]?))?$"
)
MIME = re.compile(r"^[a-z]+/[a-z0-9.+-]+$")
REJECT = "reject"


def parse_field_ref(text: str) -> FieldRef:
    """'PV2-9' -> ("PV2", 9); anything else is a mapping error."""
    match = _FIELD_REF.match(text.strip().upper())
    if not match:
        raise ValueError(f"mappings/takecare: {text!r} is not a field reference like 'PV2-9'")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True, slots=True)
class ProtectedRule:
    segment: str
    field: int
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class EventRule:
    """What one MSH-9 type^trigger means: a LUS event, possibly decided by a field.

    ``event`` applies unless an ``if_absent`` field is empty (its target applies; None means
    reject) or ``by`` names a field whose value picks the event from ``values``.
    """

    event: LusEvent | None
    if_absent: tuple[tuple[FieldRef, LusEvent | None], ...] = ()
    by: FieldRef | None = None
    values: dict[str, LusEvent] = field(default_factory=dict)
    encounter_status: str = ""
    ready_at: tuple[FieldRef, ...] = ()


@dataclass(frozen=True, slots=True)
class DocumentType:
    """An MDM document type (TXA-2): its title and flags (e.g. ``nursing-referral``)."""

    title: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """Which segments a message type reads (the rest never reaches the mapper) and needs."""

    read: frozenset[str]
    required: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TakeCareMapping:
    """The code maps of ``mappings/takecare/``, validated when loaded."""

    versions: frozenset[str]
    charsets: dict[str, str]
    authorities: dict[str, IdentifierKind]
    type_codes: dict[str, IdentifierKind]
    gender: dict[str, str]
    patient_class: dict[str, str]
    roles: dict[str, str]
    consent_basis: dict[str, str]
    lus_needs: dict[str, tuple[str, ...]]  # ZLU-2 code -> LUS need codes
    protected: tuple[ProtectedRule, ...]
    facilities: dict[str, tuple[str, str]]  # code -> (hsa_id, name)
    rules: dict[str, EventRule] = field(default_factory=dict)  # "ADT^A01" -> rule
    # PID-3 type codes that name no country (0203 PN): Swedish only when the value is one
    generic_type_codes: dict[str, IdentifierKind] = field(default_factory=dict)
    facility_rules: dict[str, dict[str, EventRule]] = field(default_factory=dict)
    messages: dict[str, MessageSpec] = field(default_factory=dict)  # "ADT", "ADT^A40"
    required_fields: dict[LusEvent, tuple[FieldRef, ...]] = field(default_factory=dict)
    discharge_disposition: dict[str, str] = field(default_factory=dict)
    diagnosis_systems: dict[str, str] = field(default_factory=dict)
    diagnosis_default_system: str = ""
    diagnosis_type: dict[str, str] = field(default_factory=dict)
    medication_systems: dict[str, str] = field(default_factory=dict)
    document_types: dict[str, DocumentType] = field(default_factory=dict)
    document_status: dict[str, str] = field(default_factory=dict)
    mime_types: dict[str, str] = field(default_factory=dict)
    reference_url: str = ""
    provider_roles: dict[str, str] = field(default_factory=dict)  # PRD-1 -> referred-to|ignore
    referral_types: dict[str, str] = field(default_factory=dict)  # RF1-3 -> care role
    referral_priority: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, frozenset[int]] = field(default_factory=dict)  # segment -> fields
    ignored: dict[str, str] = field(default_factory=dict)  # "PID-11", "NK1", "ADT:OBX" -> why

    def _own_rules(self, sending_facility: str) -> list[dict[str, EventRule]]:
        """The facility's overrides, by its MSH-4 code and by the HSA-id the code maps to."""
        keys = [sending_facility]
        if sending_facility in self.facilities:
            keys.append(self.facilities[sending_facility][0])
        return [self.facility_rules[k] for k in keys if k in self.facility_rules]

    def rule_for(self, message_type: str, sending_facility: str) -> EventRule | None:
        """The rule for MSH-9, with the sending facility's overrides (MSH-4 code or HSA-id)."""
        for own in self._own_rules(sending_facility):
            if message_type in own:
                return own[message_type]
        return self.rules.get(message_type)

    def knows_type(self, mtype: str, sending_facility: str) -> bool:
        """Whether any rule (global or the facility's) handles this message type."""
        keys = [*self.rules, *(k for own in self._own_rules(sending_facility) for k in own)]
        return any(key.split("^", 1)[0] == mtype for key in keys)

    def spec_for(self, message_type: str) -> MessageSpec:
        """The segments of 'ADT^A40' (if listed) or else of its type 'ADT'."""
        spec = self.messages.get(message_type)
        if spec is None:
            spec = self.messages.get(message_type.split("^", 1)[0])
        return spec or MessageSpec(frozenset(), ())

    def account(self, message_type: str, segment: str, num: int) -> tuple[str, str]:
        """How field ``segment-num`` of a ``message_type`` is handled: ("mapped", ""),
        ("ignored", why) or ("UNACCOUNTED", "") — the coverage report's verdict."""
        spec = self.spec_for(message_type)
        if (segment == "MSH" or segment in spec.read) and num in self.mapped.get(
            segment, frozenset()
        ):
            return "mapped", ""
        mtype = message_type.split("^", 1)[0]
        name = f"{segment}-{num}"
        for key in (
            f"{message_type}:{name}",
            f"{mtype}:{name}",
            name,
            f"{message_type}:{segment}",
            f"{mtype}:{segment}",
            segment,
        ):
            why = self.ignored.get(key)
            if why is not None:
                return "ignored", why
        return "UNACCOUNTED", ""


def _upper_keys(table: dict[str, Any]) -> dict[str, Any]:
    return {str(k).upper(): v for k, v in table.items()}


def _toml(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    return tomllib.loads(path.read_text("utf-8")) if path.exists() else {}


def _event(value: str, where: str) -> LusEvent | None:
    if value == REJECT:
        return None
    try:
        return LusEvent(value)
    except ValueError:
        raise ValueError(f"mappings/takecare: {where}: {value!r} is not a LUS event") from None


def _lus_event(value: str, where: str) -> LusEvent:
    event = _event(value, where)
    if event is None:
        raise ValueError(f"mappings/takecare: {where}: {value!r} is not a LUS event")
    return event


def _rule(key: str, spec: Any, where: str) -> EventRule:
    """A rule from its TOML form: "event" or {event, if_absent, by, values, ...}."""
    if isinstance(spec, str):
        event = _event(spec, f"{where} {key}")
        if event is None:
            raise ValueError(f"mappings/takecare: {where} {key}: use no entry, not 'reject'")
        return EventRule(event)
    if not isinstance(spec, dict):
        raise ValueError(f"mappings/takecare: {where} {key}: a LUS event or a table")
    unknown = set(spec) - {"event", "if_absent", "by", "values", "encounter_status", "ready_at"}
    if unknown:
        raise ValueError(f"mappings/takecare: {where} {key}: unknown keys {sorted(unknown)}")
    event = _event(spec["event"], f"{where} {key}") if "event" in spec else None
    by = parse_field_ref(spec["by"]) if "by" in spec else None
    values = {
        str(k).upper(): _event(v, f"{where} {key}") for k, v in spec.get("values", {}).items()
    }
    if any(v is None for v in values.values()):
        raise ValueError(f"mappings/takecare: {where} {key}: values must be LUS events")
    if event is None and by is None:
        raise ValueError(f"mappings/takecare: {where} {key}: needs 'event' or 'by'")
    if by is not None and not values:
        raise ValueError(f"mappings/takecare: {where} {key}: 'by' needs 'values'")
    status = spec.get("encounter_status", "")
    if status and status not in _ENCOUNTER_STATUS:
        raise ValueError(f"mappings/takecare: {where} {key}: encounter_status {status!r}")
    return EventRule(
        event=event,
        if_absent=tuple(
            (parse_field_ref(ref), _event(target, f"{where} {key}"))
            for ref, target in spec.get("if_absent", {}).items()
        ),
        by=by,
        values={k: v for k, v in values.items() if v is not None},
        encounter_status=status,
        ready_at=tuple(parse_field_ref(r) for r in spec.get("ready_at", [])),
    )


def _rules(table: dict[str, Any], where: str) -> dict[str, EventRule]:
    return {k.upper(): _rule(k.upper(), v, where) for k, v in table.items()}


def _check(values: set[str], allowed: set[str], what: str) -> None:
    bad = values - allowed
    if bad:
        raise ValueError(f"mappings/takecare: {what}: invalid target values {sorted(bad)}")


def load_mapping(directory: Path = DEFAULT_DIR) -> TakeCareMapping:
    """Read and check every mapping file; a bad entry fails at start-up, not on traffic."""
    adt = _toml(directory, "adt.toml")
    ev = _toml(directory, "events.toml")
    mdm = _toml(directory, "mdm.toml")
    ref = _toml(directory, "ref.toml")
    fields = _toml(directory, "fields.toml")
    fac = _toml(directory, "facilities.toml")
    kinds = {k.value: k for k in IdentifierKind}
    pid3 = adt.get("pid3", {})
    rules = _rules(adt.get("events", {}) | ev.get("events", {}), "[events]")

    facilities: dict[str, tuple[str, str]] = {}
    facility_rules: dict[str, dict[str, EventRule]] = {}
    for code, entry in fac.get("facilities", {}).items():
        hsa = entry.get("hsa_id", code)
        if not is_hsa_id(hsa):
            raise ValueError(f"mappings/takecare: facility {code}: {hsa!r} is not an HSA-id")
        facilities[code] = (hsa, entry.get("name", ""))
        if "events" in entry:
            own = _rules(entry["events"], f"[facilities.{code}.events]")
            facility_rules[code] = own
            facility_rules.setdefault(hsa, own)

    messages = {
        key.upper(): MessageSpec(
            frozenset(s.upper() for s in spec.get("read", [])),
            tuple(s.upper() for s in spec.get("required", [])),
        )
        for key, spec in fields.get("messages", {}).items()
    }
    protected = tuple(
        ProtectedRule(r["segment"], int(r["field"]), frozenset(v.upper() for v in r["values"]))
        for r in adt.get("protected_identity", [])
    )
    extra = frozenset(rule.segment for rule in protected)
    messages = {k: MessageSpec(s.read | extra, s.required) for k, s in messages.items()}

    dg1 = adt.get("diagnosis", {})
    rx = adt.get("medication", {})
    mapping = TakeCareMapping(
        versions=frozenset(adt["msh"]["versions"]),
        charsets=_upper_keys(adt["charsets"]),
        authorities={k: kinds[v] for k, v in pid3.get("authorities", {}).items()},
        type_codes={k.upper(): kinds[v] for k, v in pid3.get("type_codes", {}).items()},
        generic_type_codes={
            k.upper(): kinds[v] for k, v in pid3.get("generic_type_codes", {}).items()
        },
        gender=_upper_keys(adt["gender"]),
        patient_class=_upper_keys(adt["patient_class"]),
        roles=_upper_keys(adt["roles"]),
        consent_basis=_upper_keys(adt["consent_basis"]),
        lus_needs={str(k).upper(): tuple(v) for k, v in adt.get("lus_needs", {}).items()},
        protected=protected,
        facilities=facilities,
        rules=rules,
        facility_rules=facility_rules,
        messages=messages,
        required_fields={
            _lus_event(k, "[required_fields]"): tuple(parse_field_ref(f) for f in v)
            for k, v in ev.get("required_fields", {}).items()
        },
        discharge_disposition=_upper_keys(adt.get("discharge_disposition", {})),
        diagnosis_systems=_upper_keys(dg1.get("coding_systems", {})),
        diagnosis_default_system=str(dg1.get("default_coding_system", "")).upper(),
        diagnosis_type=_upper_keys(dg1.get("diagnosis_type", {})),
        medication_systems=_upper_keys(rx.get("coding_systems", {})),
        document_types={
            str(k).upper(): DocumentType(v.get("title", ""), tuple(v.get("flags", [])))
            for k, v in ev.get("document_types", {}).items()
        },
        document_status=_upper_keys(mdm.get("document_status", {})),
        mime_types=_upper_keys(mdm.get("mime_types", {})),
        reference_url=str(mdm.get("documents", {}).get("reference_url", "")),
        provider_roles=_upper_keys(ref.get("provider_roles", {})),
        referral_types=_upper_keys(ref.get("referral_types", {})),
        referral_priority=_upper_keys(ref.get("priority", {})),
        mapped={
            seg.upper(): frozenset(int(n) for n in nums)
            for seg, nums in fields.get("mapped", {}).items()
        },
        ignored={str(k).upper(): str(v) for k, v in fields.get("ignored", {}).items()},
    )
    _validate(mapping)
    return mapping


def _validate(mapping: TakeCareMapping) -> None:
    both = set(mapping.type_codes) & set(mapping.generic_type_codes)
    if both:
        raise ValueError(f"mappings/takecare: [pid3] type codes listed twice {sorted(both)}")
    for codec in mapping.charsets.values():
        "".encode(codec)  # LookupError for an unknown codec name
    _check(set(mapping.gender.values()), _GENDERS, "[gender]")
    _check(set(mapping.consent_basis.values()), _BASES, "[consent_basis]")
    for code, needs in mapping.lus_needs.items():
        if not needs or not set(needs) <= LUS_NEED_CODES - {EJ_BEDOMD}:
            raise ValueError(f"mappings/takecare: [lus_needs] {code}: not LUS need codes")
        if INGA_BEHOV in needs and len(needs) > 1:
            raise ValueError(f"mappings/takecare: [lus_needs] {code}: inga-behov stands alone")
    _check(set(mapping.discharge_disposition.values()), _DISPOSITIONS, "[discharge_disposition]")
    _check(set(mapping.diagnosis_type.values()), _DIAGNOSIS_ROLES, "[diagnosis.diagnosis_type]")
    _check(set(mapping.document_status.values()), _DOC_STATUS, "[document_status]")
    _check(set(mapping.provider_roles.values()), {"referred-to", "ignore"}, "[provider_roles]")
    _check(set(mapping.referral_priority.values()), _PRIORITIES, "[priority]")
    bad_mime = {m for m in mapping.mime_types.values() if not MIME.match(m)}
    if bad_mime:
        raise ValueError(f"mappings/takecare: [mime_types]: not MIME types {sorted(bad_mime)}")
    if mapping.diagnosis_default_system and (
        mapping.diagnosis_default_system not in mapping.diagnosis_systems
    ):
        raise ValueError("mappings/takecare: [diagnosis] default_coding_system is not listed")
    if mapping.reference_url and "{id}" not in mapping.reference_url:
        raise ValueError("mappings/takecare: [documents] reference_url needs '{id}'")
    for key in mapping.ignored:
        if not _SEGMENT_KEY.match(key):
            raise ValueError(
                f"mappings/takecare: [ignored] {key!r}: use 'PID-11', 'NK1', 'ADT:OBX'"
            )
    for all_rules in (mapping.rules, *mapping.facility_rules.values()):
        for key, rule in all_rules.items():
            spec = mapping.spec_for(key)
            refs = [r for r, _ in rule.if_absent] + list(rule.ready_at)
            refs += [rule.by] if rule.by else []
            for seg, num in refs:
                if seg not in spec.read or num not in mapping.mapped.get(seg, frozenset()):
                    raise ValueError(
                        f"mappings/takecare: {key}: {seg}-{num} is not a mapped field of a "
                        "segment this message type reads (fields.toml)"
                    )
    for key in mapping.rules:
        if not mapping.spec_for(key).read:
            raise ValueError(f"mappings/takecare: {key}: no [messages] entry in fields.toml")


def codec_for(charset: str, mapping: TakeCareMapping) -> str:
    """The Python codec for an MSH-18 value ("" -> UTF-8); UTF-8 when unknown."""
    return mapping.charsets.get(charset.upper(), "utf-8")
