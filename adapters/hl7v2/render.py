"""Render the canonical Bundle as an HL7 v2.5 message, following mappings/hl7v2/outbound.toml.

The code only reads the Bundle into named values and fills the mapping's field templates;
which message, which segments and which field holds what is data.
"""

from __future__ import annotations

import base64
import binascii
import functools
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.takecare.ack import escape
from gateway.clock import STOCKHOLM
from gateway.model.bundle import resources_by_ref
from gateway.model.events import LusEvent
from gateway.model.identifiers import HSA_SYSTEM
from mappings import MAPPINGS_DIR

OUTBOUND = MAPPINGS_DIR / "hl7v2" / "outbound.toml"


@dataclass(frozen=True, slots=True)
class Mapping:
    settings: dict[str, Any]

    @classmethod
    def load(cls, path: Path = OUTBOUND) -> Mapping:
        return cls(tomllib.loads(path.read_text(encoding="utf-8")))

    def event(self, code: str) -> dict[str, Any]:
        events = self.settings["events"]
        return events.get(code, events["default"])


@functools.cache
def default_mapping() -> Mapping:
    return Mapping.load()


def _ts(value: str | None) -> str:
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone(STOCKHOLM).strftime("%Y%m%d%H%M%S%z")


def notice_lines(res: dict[str, dict[str, Any]], event: LusEvent) -> list[str]:
    """The notice text, one entry per line."""
    texts = [n.get("text", "") for n in res.get("CarePlan/careplan", {}).get("note", [])]
    for key, doc in res.items():
        if not key.startswith("DocumentReference/"):
            continue
        for content in doc.get("content", []):
            att = content.get("attachment", {})
            if att.get("contentType", "").startswith("text/plain") and att.get("data"):
                try:
                    texts.append(base64.b64decode(att["data"]).decode("utf-8", "replace"))
                    continue
                except (binascii.Error, ValueError):
                    pass
            where = att.get("url") or att.get("contentType") or "bilaga"
            texts.append(f"Bilaga: {att.get('title') or doc.get('description', '')} ({where})")
    lines = [
        line for t in texts for line in t.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    ]
    return lines or [event.display]


def values(
    bundle: dict[str, Any], control_id: str, recipient_hsa_id: str, m: Mapping
) -> dict[str, str]:
    """The named values the templates use, unescaped."""
    res = resources_by_ref(bundle)
    header = bundle["entry"][0]["resource"]
    event = LusEvent(header["eventCoding"]["code"])
    kind = m.event(event.value)
    sender = res.get(header.get("sender", {}).get("reference", ""), {})
    sender_hsa = next((str(i["value"]) for i in sender.get("identifier", [])), "")
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
    ward_hsa = sender_hsa if local_ward else str(ward.get("value", ""))
    gateway = m.settings["gateway"]
    return {
        "control_id": control_id,
        "timestamp": _ts(bundle.get("timestamp")),
        "gateway": gateway,
        "version": m.settings["version"],
        "charset": m.settings["charset"],
        "sender_hsa_id": sender_hsa,
        "sender_name": sender.get("name", ""),
        "sending_facility": sender_hsa if m.settings["sending_facility"] == "sender" else gateway,
        "recipient_hsa_id": recipient_hsa_id,
        "event_code": event.value,
        "event_display": event.display,
        "message_type": kind["message_type"],
        "trigger": kind["trigger"],
        "structure": kind["structure"],
        "occurred_at": _ts(bundle.get("timestamp")),
        "patient_id": str(ident.get("value", "")),
        "patient_id_type": types.get(ident.get("system", ""), ""),
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
        "document_id": str(doc.get("masterIdentifier", {}).get("value", "")) or control_id,
    }


def _segment(name: str, template: dict[str, str], vals: dict[str, str]) -> str:
    fields = {int(k): v.format_map(vals) for k, v in template.items()}
    if name == "MSH":  # MSH-1 is the separator itself: field n is element n - 1
        parts = ["MSH", "^~\\&"] + [fields.get(n, "") for n in range(3, max(fields, default=2) + 1)]
    else:
        parts = [name] + [fields.get(n, "") for n in range(1, max(fields, default=0) + 1)]
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return "|".join(parts)


def render(
    bundle: dict[str, Any], control_id: str, recipient_hsa_id: str, mapping: Mapping | None = None
) -> str:
    """The ER7 text of the message (segments ended by CR)."""
    m = mapping or default_mapping()
    raw = values(bundle, control_id, recipient_hsa_id, m)
    vals = {k: escape(v) for k, v in raw.items()}
    segments = []
    for name in m.event(raw["event_code"])["segments"]:
        template = m.settings["segments"][name]
        if name == "OBX":
            res = resources_by_ref(bundle)
            lines = notice_lines(res, LusEvent(raw["event_code"]))
            for n, line in enumerate(lines, 1):
                vals_line = {**vals, "set_id": str(n), "line": escape(line)}
                segments.append(_segment(name, template, vals_line))
        else:
            segments.append(_segment(name, template, vals))
    return "\r".join(segments) + "\r"
