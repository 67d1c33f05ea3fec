"""Render the canonical Bundle as an HL7 v2 message, following mappings/hl7v2/outbound.toml.

The code only reads the Bundle into named values and fills the mapping's field templates;
which message, which segments and which field holds what is data. Every field is kept
within the version's length (mappings/hl7v2/lengths.toml), so a strict receiver takes it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.takecare.ack import escape
from gateway import clock
from gateway.clock import STOCKHOLM
from gateway.model.bundle import Address, read_bundle, resources_by_ref
from gateway.model.events import LusEvent
from gateway.model.identifiers import HSA_SYSTEM
from mappings import MAPPINGS_DIR

OUTBOUND = MAPPINGS_DIR / "hl7v2" / "outbound.toml"
LENGTHS = MAPPINGS_DIR / "hl7v2" / "lengths.toml"
# Values already written as ER7 (built here from escaped parts): inserted as they stand.
_ER7_VALUES = frozenset({"prior_patient_ids", "value", "address"})


@dataclass(frozen=True, slots=True)
class Mapping:
    settings: dict[str, Any]
    lengths: dict[str, dict[str, dict[str, int]]]

    @classmethod
    def load(cls, path: Path = OUTBOUND, lengths: Path = LENGTHS) -> Mapping:
        return cls(
            tomllib.loads(path.read_text(encoding="utf-8")),
            tomllib.loads(lengths.read_text(encoding="utf-8")),
        )

    def event(self, code: str) -> dict[str, Any]:
        events = self.settings["events"]
        return events.get(code, events["default"])

    def max_length(self, segment: str, field: int) -> int | None:
        """The version's limit for a field, None when the table does not name it."""
        return self.lengths.get(self.settings["version"], {}).get(segment, {}).get(str(field))


@functools.cache
def default_mapping() -> Mapping:
    return Mapping.load()


def stable_control_id(key: str) -> str:
    """MSH-10 for a delivery: 20 characters (the v2.3-2.5 limit), the same for the same key.

    The shape of ``adapters.takecare.ack.control_id()`` (A-Z and 2-7, never escaped), but
    derived from the delivery's dedup key so a resend carries the same MSH-10 and the
    receiver recognises it; 100 bits of SHA-256 keep two deliveries apart.
    """
    return base64.b32encode(hashlib.sha256(key.encode("utf-8")).digest()[:15]).decode()[:20]


def _ts(value: str | datetime | None) -> str:
    if not value:
        return ""
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.astimezone(STOCKHOLM).strftime("%Y%m%d%H%M%S%z")


def cut(field: str, limit: int | None) -> str:
    """An ER7 field cut to ``limit`` characters without splitting an escape sequence."""
    if limit is None or len(field) <= limit:
        return field
    head = field[:limit]
    if head.count("\\") % 2:  # an escape sequence was opened and not closed: drop it
        head = head[: head.rindex("\\")]
    return head


@dataclass(frozen=True, slots=True)
class Observation:
    """One OBX: its value type (HL7 table 0125) and its value, already ER7."""

    value_type: str
    value: str


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def observations(res: dict[str, dict[str, Any]], event: LusEvent, m: Mapping) -> list[Observation]:
    """The notice as OBX values: text lines (TX), then each document (ED or RP).

    The CarePlan notes and every text/plain document become TX lines. Another attachment
    with data is embedded whole (ED, base64) when it fits OBX-5, else sent as a link (RP)
    when it has a URL; a line names each such attachment first.
    """
    docs = m.settings["documents"]
    limit = m.max_length("OBX", 5)
    texts = [n.get("text", "") for n in res.get("CarePlan/careplan", {}).get("note", [])]
    out = [Observation("TX", escape(line)) for t in texts for line in _lines(t)]
    for key, doc in res.items():
        if not key.startswith("DocumentReference/"):
            continue
        for content in doc.get("content", []):
            att = content.get("attachment", {})
            kind = att.get("contentType", "")
            if kind.startswith("text/plain") and att.get("data"):
                try:
                    text = base64.b64decode(att["data"], validate=True).decode("utf-8", "replace")
                except (binascii.Error, ValueError):
                    pass
                else:
                    out.extend(Observation("TX", escape(line)) for line in _lines(text))
                    continue
            title = att.get("title") or doc.get("description", "")
            subtype = docs["subtypes"].get(kind.split(";")[0].strip(), docs["other_subtype"])
            data = str(att.get("data", ""))
            url = str(att.get("url", ""))
            ed = f"^{docs['type_of_data']}^{escape(subtype)}^Base64^{data}"
            if data and data.isascii() and (limit is None or len(ed) <= limit):
                out.append(Observation("TX", escape(f"Bilaga: {title}")))
                out.append(Observation("ED", ed))
            elif url:
                out.append(Observation("TX", escape(f"Bilaga: {title}")))
                rp = f"{escape(url)}^^{docs['type_of_data']}^{escape(subtype)}"
                out.append(Observation("RP", rp))
            else:
                where = kind or "bilaga"
                out.append(Observation("TX", escape(f"Bilaga: {title} ({where}, ej bifogad)")))
    return out or [Observation("TX", escape(event.display))]


def _sender(res: dict[str, dict[str, Any]], hsa_id: str) -> dict[str, Any]:
    """The sending Organization, found by its HSA-id (not by following a reference)."""
    for key, org in res.items():
        if key.startswith("Organization/") and any(
            i.get("system") == HSA_SYSTEM and i.get("value") == hsa_id
            for i in org.get("identifier", [])
        ):
            return org
    return {}


def values(
    bundle: dict[str, Any],
    dedup_key: str,
    recipient_hsa_id: str,
    m: Mapping,
    made_at: datetime | None = None,
) -> dict[str, str]:
    """The named values the templates use: unescaped, except those in ``_ER7_VALUES``."""
    res = resources_by_ref(bundle)
    view = read_bundle(bundle)
    event = view.event
    kind = m.event(event.value)
    sender = _sender(res, view.sender_hsa_id)
    patient = res.get("Patient/patient", {})
    types: dict[str, str] = m.settings["identifier_types"]
    idents = sorted(
        patient.get("identifier", []),
        key=lambda i: list(types).index(i.get("system")) if i.get("system") in types else 99,
    )
    ident = idents[0] if idents else {}
    name = (patient.get("name") or [{}])[0]
    encounter = res.get("Encounter/encounter", {})
    period = encounter.get("period", {})
    ward = (encounter.get("location") or [{}])[0].get("location", {}).get("identifier", {})
    doc = next((r for k, r in res.items() if k.startswith("DocumentReference/")), {})
    # a local ward code (no HSA-id) means nothing to the receiver: the sender stands in
    local_ward = ward.get("system", HSA_SYSTEM) != HSA_SYSTEM
    ward_hsa = view.sender_hsa_id if local_ward else str(ward.get("value", ""))
    control_id = stable_control_id(dedup_key)
    document_id = str(doc.get("masterIdentifier", {}).get("value", "")) or control_id
    if len(escape(document_id)) > (m.max_length("TXA", 12) or len(document_id)):
        document_id = stable_control_id(document_id)  # too long to be TXA-12: its digest
    gateway = m.settings["gateway"]
    expected = res.get("CarePlan/careplan", {}).get("period", {}).get("end")
    prior = "~".join(
        f"{escape(value)}^^^^{escape(types.get(system, ''))}"
        for system, value in view.prior_identifiers
    )
    return {
        "control_id": control_id,
        "made_at": _ts(made_at or clock.now()),
        "timestamp": _ts(bundle.get("timestamp")),
        "gateway": gateway,
        "version": m.settings["version"],
        "charset": m.settings["charset"],
        "sender_hsa_id": view.sender_hsa_id,
        "sender_name": sender.get("name", ""),
        "sending_facility": view.sender_hsa_id
        if m.settings["sending_facility"] == "sender"
        else gateway,
        "recipient_hsa_id": recipient_hsa_id,
        "event_code": event.value,
        "event_display": event.display,
        "document_type": m.settings["document_types"].get(
            event.value, m.settings["document_types"]["default"]
        ),
        "message_type": kind["message_type"],
        "trigger": kind["trigger"],
        "structure": kind["structure"],
        "occurred_at": _ts(bundle.get("timestamp")),
        "ready_at": _ts(view.ready_at),
        "expected_discharge": _ts(expected),
        "patient_id": str(ident.get("value", "")),
        "patient_id_type": types.get(ident.get("system", ""), ""),
        "prior_patient_ids": prior,
        "address": _xad(view.address),
        "family": name.get("family", ""),
        "given": " ".join(name.get("given", [])),
        "birth_date": patient.get("birthDate", "").replace("-", ""),
        "gender": m.settings["genders"].get(patient.get("gender", "unknown"), "U"),
        "encounter_id": str((encounter.get("identifier") or [{}])[0].get("value", "")),
        "patient_class": m.settings["patient_classes"].get(
            encounter.get("class", {}).get("code", ""), ""
        ),
        "ward_hsa_id": ward_hsa,
        "admitted_at": _ts(period.get("start")),
        "discharged_at": _ts(period.get("end")),
        "document_id": document_id,
    }


def _xad(address: Address | None) -> str:
    """PID-11 as ER7: the folkbokföringsadress as a legal address (XAD-7 L) with the
    municipality code in XAD-9, as TakeCare sends it; empty when the Bundle has none (none
    sent, or withheld from this recipient)."""
    if address is None:
        return ""
    line = [*address.line, "", ""]
    # XAD-6 is ISO 3166 alpha-3 (HL7 table 0399); TakeCare may send alpha-2 "SE"
    country = address.country.upper()
    country = "SWE" if country == "SE" else country if len(country) == 3 else ""
    parts = [line[0], line[1], address.city, "", address.postal_code, country, "L"]
    parts += ["", address.municipality]
    # each component within its data type's length (ST: 199 in hl7apy's v2.5 tables)
    return "^".join(cut(escape(p), 199) for p in parts).rstrip("^")


def _segment(name: str, template: dict[str, str], vals: dict[str, str], m: Mapping) -> str:
    fields = {int(k): v.format_map(vals) for k, v in template.items()}
    for n, text in fields.items():
        if not (name == "OBX" and n == 5 and vals.get("value_type") == "ED"):
            fields[n] = cut(text, m.max_length(name, n))  # an ED is whole or not there
    if name == "MSH":  # MSH-1 is the separator itself: field n is element n - 1
        parts = ["MSH", "^~\\&"] + [fields.get(n, "") for n in range(3, max(fields, default=2) + 1)]
    else:
        parts = [name] + [fields.get(n, "") for n in range(1, max(fields, default=0) + 1)]
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return "|".join(parts)


def render(
    bundle: dict[str, Any],
    dedup_key: str,
    recipient_hsa_id: str,
    mapping: Mapping | None = None,
    made_at: datetime | None = None,
) -> str:
    """The ER7 text of the message (segments ended by CR); MSH-7 is ``made_at`` (now)."""
    m = mapping or default_mapping()
    raw = values(bundle, dedup_key, recipient_hsa_id, m, made_at)
    limits: dict[str, int] = m.settings["value_lengths"]
    vals = {k: cut(v if k in _ER7_VALUES else escape(v), limits.get(k)) for k, v in raw.items()}
    segments = []
    for name in m.event(raw["event_code"])["segments"]:
        template = m.settings["segments"][name]
        if name == "OBX":
            obs = observations(resources_by_ref(bundle), LusEvent(raw["event_code"]), m)
            for n, ob in enumerate(obs, 1):
                value = ob.value if ob.value_type == "ED" else cut(ob.value, limits["value"])
                row = {**vals, "set_id": str(n), "value_type": ob.value_type, "value": value}
                segments.append(_segment(name, template, row, m))
        else:
            segments.append(_segment(name, template, vals, m))
    return "\r".join(segments) + "\r"
