"""Text that comes from a recipient's system (an HL7 ERR, a FHIR OperationOutcome) before it
goes into a delivery's detail or an exception shown to operations staff.

The receiver may echo the patient back ("patient 19121212-1212 Tolvan Tolvansson unknown"):
everything shaped like an identity number and every identifier and name part of the patient
in the Bundle is masked, control characters go, and the text is cut short.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.logs import redact_identity_numbers

MASK = "<dolt>"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _patient_words(bundle: dict[str, Any]) -> list[str]:
    words: list[str] = []
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Patient":
            continue
        words += [str(i.get("value", "")) for i in resource.get("identifier", [])]
        for name in resource.get("name", []):
            words += [str(name.get("family", "")), *map(str, name.get("given", []))]
            words += str(name.get("text", "")).split()
    # longest first, so "Tolvansson" is masked before "Tolvan"; one letter masks nothing
    return sorted({w.strip() for w in words if len(w.strip()) > 1}, key=len, reverse=True)


def outside_text(text: str, bundle: dict[str, Any], limit: int = 160) -> str:
    """``text`` from outside, safe to show: patient data masked, one line, at most ``limit``."""
    clean = _CONTROL.sub(" ", str(text)).strip()
    for word in _patient_words(bundle):
        clean = re.sub(re.escape(word), MASK, clean, flags=re.IGNORECASE)
    clean = redact_identity_numbers(clean)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def issue_text(body: Any, bundle: dict[str, Any], limit: int = 200) -> str:
    """The codes and texts (``details.text``, else ``diagnostics``) of the OperationOutcome
    in a FHIR answer (alone, or inside a response Bundle), patient data masked; "" if none."""
    outcomes: list[dict[str, Any]] = []
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        outcomes.append(body)
    elif isinstance(body, dict):
        entries = body.get("entry")
        for entry in entries if isinstance(entries, list) else []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
                outcomes.append(resource)
    parts = []
    for oo in outcomes:
        issues = oo.get("issue")
        for issue in issues if isinstance(issues, list) else []:
            if not isinstance(issue, dict):
                continue
            details = issue.get("details")
            text = (details.get("text") if isinstance(details, dict) else "") or ""
            text = str(text or issue.get("diagnostics") or "")
            code = str(issue.get("code", ""))
            parts.append(f"{code}: {text}" if text else code)
    return outside_text("; ".join(parts), bundle, limit=limit)
