"""Consent records and the gate's decision: pure domain logic, no I/O.

A consent record is the legal basis for (or against) telling a recipient about a patient:
the patient's consent (samtycke), the physician's secrecy assessment when the patient cannot
consent (menprövning), or the patient's objection (spärr). It is scoped to recipients (an
organisation by HSA-id, or a kind of party such as home care), to purposes (LUS discharge
coordination, SIP) and to a period. Records arrive as FHIR R4 Consent resources over the API,
or inside an incoming message (the admission notice's consent segment).

:func:`decide` turns the records that apply to one (message, recipient) into *permit*, *hold*
or *deny*, naming the rule that decided, so every decision can be explained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.model.bundle import CONSENT_BASIS_SYSTEM, consent_policy
from gateway.model.identifiers import (
    HSA_SYSTEM,
    KIND_BY_SYSTEM,
    InvalidIdentifier,
    PatientId,
    is_hsa_id,
    parse_patient_id,
)

RECIPIENT_KIND_SYSTEM = "https://brygga.dev/fhir/CodeSystem/recipient-kind"
PURPOSE_SYSTEM = "https://brygga.dev/fhir/CodeSystem/consent-purpose"
SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
REASON_URL = "https://brygga.dev/fhir/StructureDefinition/menprovning-reason"

BASES = ("samtycke", "menprovning", "sparr")
PURPOSES = ("lus", "sip")
# The kinds of party a consent can name instead of one organisation (routing roles).
RECIPIENT_KINDS = (
    "listed-clinic",
    "bistand",
    "hemtjanst",
    "hemtjanst-natt",
    "sabo",
    "korttidsboende",
    "rehab",
    "kommunal-hsl",
    "psykiatri",
    "asih",
)
STATUSES = ("active", "inactive", "rejected", "entered-in-error", "draft", "proposed")


class Outcome(StrEnum):
    PERMIT = "permit"
    HOLD = "hold"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gate decided for one (message, recipient), and why (the rule and a Swedish
    reason the sender and operations see)."""

    outcome: Outcome
    rule: str
    reason: str
    consent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Whom a consent names: ``kind`` "org" (value = HSA-id) or "role" (a recipient kind)."""

    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Recipient:
    """The party the gate decides for."""

    hsa_id: str
    role: str


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    id: str
    patient: PatientId = field(repr=False)
    basis: str
    status: str
    recorded_at: datetime
    actors: tuple[Actor, ...] = ()  # empty: every recipient
    purposes: tuple[str, ...] = ()  # empty: every purpose
    start: datetime | None = None
    end: datetime | None = None
    episode_key: str | None = None  # carried by a message: that stay only
    performer_hsa_id: str = ""
    reason: str = ""  # a menprövning's grounds, as the physician wrote them

    def applies_to(self, recipient: Recipient, purpose: str, episode_key: str | None) -> bool:
        if self.status == "entered-in-error":
            return False
        if self.episode_key is not None and self.episode_key != episode_key:
            return False
        if self.purposes and purpose not in self.purposes:
            return False
        return not self.actors or any(
            (a.kind == "org" and a.value == recipient.hsa_id)
            or (a.kind == "role" and a.value == recipient.role)
            for a in self.actors
        )

    def in_force(self, now: datetime) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)

    def scope_text(self) -> str:
        if not self.actors:
            return ""
        return " för " + ", ".join(a.value for a in self.actors)


HOLD_NO_BASIS = Decision(Outcome.HOLD, "no-basis", "Väntar på samtycke")


def decide(
    records: Iterable[ConsentRecord],
    recipient: Recipient,
    purpose: str,
    now: datetime,
    episode_key: str | None = None,
) -> Decision:
    """The gate's rules, in order (the first that matches decides):

    1. ``objection``: an active spärr in force that covers the recipient → deny.
    2. ``revoked``: the newest consent (samtycke) covering the recipient was withdrawn
       (status inactive or rejected) and no newer basis replaces it → deny.
    3. ``consent`` / ``menprovning``: an active basis in force covering the recipient →
       permit (the newest one is named).
    4. ``expired``: a basis covered the recipient but its period has ended → hold.
    5. ``not-yet-valid``: a basis covers the recipient from a later date → hold.
    6. ``no-basis``: nothing covers the recipient → hold.
    """
    applicable = sorted(
        (r for r in records if r.applies_to(recipient, purpose, episode_key)),
        key=lambda r: r.recorded_at,
        reverse=True,
    )
    for r in applicable:
        if r.basis == "sparr" and r.status == "active" and r.in_force(now):
            return Decision(
                Outcome.DENY, "objection", "Patienten har spärrat utlämnande" + r.scope_text(), r.id
            )
    bases = [r for r in applicable if r.basis != "sparr"]
    newest_consent = next((r for r in bases if r.basis == "samtycke"), None)
    permitting = [r for r in bases if r.status == "active" and r.in_force(now)]
    if newest_consent is not None and newest_consent.status in ("inactive", "rejected"):
        if not permitting or permitting[0].recorded_at < newest_consent.recorded_at:
            return Decision(
                Outcome.DENY, "revoked", "Patienten har återkallat sitt samtycke", newest_consent.id
            )
    if permitting:
        r = permitting[0]
        if r.basis == "samtycke":
            return Decision(Outcome.PERMIT, "consent", "Patientens samtycke", r.id)
        return Decision(
            Outcome.PERMIT, "menprovning", "Läkarens menprövning: uppgifterna får lämnas ut", r.id
        )
    active = [r for r in bases if r.status == "active"]
    if any(r.end is not None and r.end <= now for r in active):
        return Decision(Outcome.HOLD, "expired", "Samtycket har upphört att gälla; väntar på nytt")
    if any(r.start is not None and now < r.start for r in active):
        return Decision(Outcome.HOLD, "not-yet-valid", "Samtycket gäller från ett senare datum")
    return HOLD_NO_BASIS


# --------------------------------------------------------------------------- FHIR Consent


class ConsentInvalid(ValueError):
    """A Consent resource the gateway cannot use; ``path`` is the FHIRPath of the problem."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(f"{path}: {text}")
        self.path = path
        self.text = text


def _patient(resource: dict[str, Any]) -> PatientId:
    ident = (resource.get("patient") or {}).get("identifier") or {}
    system, value = ident.get("system"), ident.get("value")
    if not system or not value:
        raise ConsentInvalid(
            "Consent.patient.identifier",
            "the patient must be given by identifier (system and value: personnummer, "
            "samordningsnummer or reservnummer)",
        )
    kind = KIND_BY_SYSTEM.get(system)
    if kind is None:
        raise ConsentInvalid(
            "Consent.patient.identifier.system", f"must be one of {sorted(KIND_BY_SYSTEM)}"
        )
    try:
        pid = parse_patient_id(kind, str(value))
    except InvalidIdentifier as exc:
        raise ConsentInvalid("Consent.patient.identifier.value", str(exc)) from None
    pid = PatientId.from_fhir(system, pid.value)  # a regional reservnummer keeps its system
    if pid.kind != kind:
        raise ConsentInvalid(
            "Consent.patient.identifier.value", f"is a {pid.kind.value}, not a {kind}"
        )
    return pid


def _basis(resource: dict[str, Any]) -> str:
    for category in resource.get("category") or []:
        for coding in category.get("coding") or []:
            if coding.get("system") == CONSENT_BASIS_SYSTEM:
                if coding.get("code") not in BASES:
                    raise ConsentInvalid(
                        "Consent.category.coding.code", f"the basis must be one of {list(BASES)}"
                    )
                return str(coding["code"])
    raise ConsentInvalid(
        "Consent.category",
        f"needs a coding of {CONSENT_BASIS_SYSTEM} (samtycke, menprovning or sparr)",
    )


def _dt(value: Any, path: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConsentInvalid(path, "not a FHIR dateTime") from None
    if parsed.tzinfo is None:
        raise ConsentInvalid(path, "needs a time zone (for example 2026-11-23T08:00:00+01:00)")
    return parsed


def _actors(provision: dict[str, Any]) -> tuple[Actor, ...]:
    actors = []
    for i, actor in enumerate(provision.get("actor") or []):
        ident = (actor.get("reference") or {}).get("identifier") or {}
        system, value = ident.get("system"), str(ident.get("value") or "")
        path = f"Consent.provision.actor[{i}].reference.identifier"
        if system == HSA_SYSTEM:
            if not is_hsa_id(value):
                raise ConsentInvalid(path + ".value", "not an HSA-id")
            actors.append(Actor("org", value))
        elif system == RECIPIENT_KIND_SYSTEM:
            if value not in RECIPIENT_KINDS:
                raise ConsentInvalid(path + ".value", f"must be one of {list(RECIPIENT_KINDS)}")
            actors.append(Actor("role", value))
        else:
            raise ConsentInvalid(
                path + ".system",
                f"an organisation ({HSA_SYSTEM}) or a kind of party ({RECIPIENT_KIND_SYSTEM})",
            )
    return tuple(actors)


def _purposes(provision: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for i, coding in enumerate(provision.get("purpose") or []):
        if coding.get("system") != PURPOSE_SYSTEM or coding.get("code") not in PURPOSES:
            raise ConsentInvalid(
                f"Consent.provision.purpose[{i}]",
                f"must be a coding of {PURPOSE_SYSTEM}: one of {list(PURPOSES)}",
            )
        out.append(str(coding["code"]))
    return tuple(out)


def from_fhir(
    resource: Any, consent_id: str, now: datetime, *, strict: bool = True
) -> ConsentRecord:
    """Read a FHIR R4 Consent; raises :class:`ConsentInvalid` naming the element at fault.

    ``strict`` (what the API applies to what it is given) also requires a menprövning to
    name its physician; records carried by messages are kept as the sender recorded them.
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise ConsentInvalid("Consent", "the body must be a FHIR Consent resource (JSON)")
    status = resource.get("status")
    if status not in STATUSES:
        raise ConsentInvalid("Consent.status", f"must be one of {list(STATUSES)}")
    patient = _patient(resource)
    basis = _basis(resource)
    provision = resource.get("provision") or {}
    expected = "deny" if basis == "sparr" else "permit"
    if provision.get("type", expected) != expected:
        raise ConsentInvalid("Consent.provision.type", f"a {basis} is provision type '{expected}'")
    period = provision.get("period") or {}
    start = _dt(period.get("start"), "Consent.provision.period.start")
    end = _dt(period.get("end"), "Consent.provision.period.end")
    if start and end and end <= start:
        raise ConsentInvalid("Consent.provision.period", "the end must be after the start")
    performer = ""
    for p in resource.get("performer") or []:
        ident = p.get("identifier") or {}
        if ident.get("system") == HSA_SYSTEM:
            performer = str(ident.get("value") or "")
    if strict and basis == "menprovning" and not is_hsa_id(performer):
        raise ConsentInvalid(
            "Consent.performer",
            "a menprövning names the physician who made it (identifier with an HSA-id)",
        )
    reason = next(
        (
            str(e.get("valueString") or "")
            for e in resource.get("extension") or []
            if e.get("url") == REASON_URL
        ),
        "",
    )
    if strict and basis == "menprovning" and not reason.strip():
        raise ConsentInvalid(
            "Consent.extension",
            f"a menprövning gives its grounds: an extension {REASON_URL} with valueString",
        )
    return ConsentRecord(
        id=consent_id,
        patient=patient,
        basis=basis,
        status=str(status),
        recorded_at=_dt(resource.get("dateTime"), "Consent.dateTime") or now,
        actors=_actors(provision),
        purposes=_purposes(provision),
        start=start,
        end=end,
        performer_hsa_id=performer,
        reason=reason,
    )


def to_fhir(record: ConsentRecord, version: int = 1) -> dict[str, Any]:
    """The record as a FHIR R4 Consent (what the API returns)."""
    provision: dict[str, Any] = {"type": "deny" if record.basis == "sparr" else "permit"}
    if record.start or record.end:
        provision["period"] = {
            k: v.isoformat() for k, v in (("start", record.start), ("end", record.end)) if v
        }
    if record.actors:
        provision["actor"] = [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                        }
                    ]
                },
                "reference": {
                    "identifier": {
                        "system": HSA_SYSTEM if a.kind == "org" else RECIPIENT_KIND_SYSTEM,
                        "value": a.value,
                    }
                },
            }
            for a in record.actors
        ]
    if record.purposes:
        provision["purpose"] = [{"system": PURPOSE_SYSTEM, "code": p} for p in record.purposes]
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": record.id,
        "meta": {"versionId": str(version)},
        "status": record.status,
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": record.basis}]}],
        "patient": {
            "identifier": {"system": record.patient.fhir_system, "value": record.patient.value}
        },
        "dateTime": record.recorded_at.isoformat(),
        "policy": consent_policy(record.basis),  # ppc-1
        "provision": provision,
    }
    if record.performer_hsa_id:
        resource["performer"] = [
            {"identifier": {"system": HSA_SYSTEM, "value": record.performer_hsa_id}}
        ]
    if record.reason:
        resource["extension"] = [{"url": REASON_URL, "valueString": record.reason}]
    return resource
