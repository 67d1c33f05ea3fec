"""The audit trail for auditors: who has used one patient's data, what for, and when.

The identity number travels in the request body, never in the URL (URLs end up in proxy and
access logs). The answer names the patient only by pseudonym. Each search is an audit entry.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field, field_validator

from gateway import audit
from gateway.api.openapi import example
from gateway.api.policy import Grant, allow
from gateway.audit.search import (
    MAX_ENTRIES,
    check_purpose,
    entries_for_patient,
    patient_key_for,
)
from gateway.model.identifiers import InvalidIdentifier

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])
Auditor = Annotated[Grant, Depends(allow("audit.read"))]

EXAMPLE_ANSWER = {
    "patient_key": "3f9c2a7e1b0d4c8a9e6f5d4c3b2a1908",
    "entries": [
        {
            "seq": 1041,
            "at": "2026-11-23T08:15:02.481230+00:00",
            "actor": "deliver",
            "actor_org": "",
            "role": "system",
            "action": "delivery.delivered",
            "subject": "6f1c2a8e-3b7d-4c55-9a41-2f0e8d9b7c11",
            "purpose": "lus-utskrivning",
            "outcome": "ok",
            "detail": "till SE5566778899-HT01 via inbox",
        },
        {
            "seq": 1187,
            "at": "2026-11-23T08:40:11.102938+00:00",
            "actor": "Anna Svensson",
            "actor_org": "SE5566778899-HT01",
            "role": "staff",
            "action": "message.read",
            "subject": "6f1c2a8e-3b7d-4c55-9a41-2f0e8d9b7c11",
            "purpose": "lus-utskrivning",
            "outcome": "ok",
            "detail": "",
        },
    ],
    "truncated": False,
}
INVALID = "The patient must be a personnummer or samordningsnummer: 12 digits YYYYMMDDNNNC."
NO_KEY = "This process has no patient key; audit search runs where the gateway's api stage runs."


class AuditSearch(BaseModel):
    """Whose entries to show, and why you look (recorded with the search)."""

    # Checked by hand, not by pydantic: a validation error would echo the number back.
    patient: str = Field(
        description="Personnummer or samordningsnummer, 12 digits, optionally with - or +.",
        examples=["19121212-1212"],
    )
    purpose: str = Field(
        audit.PURPOSE_AUDIT,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        max_length=60,
        description="Why: e.g. logguppfoljning (systematic follow-up) or patientens-begaran.",
        examples=["patientens-begaran"],
    )
    limit: int = Field(1000, ge=1, le=MAX_ENTRIES, description="At most this many, oldest first.")

    _purpose_names_no_patient = field_validator("purpose")(check_purpose)


@router.post(
    "/search",
    summary="Every audit entry about one patient (role auditor)",
    responses=example(
        EXAMPLE_ANSWER,
        {
            401: "Missing, expired or foreign bearer token.",
            403: "The token's role is not auditor.",
            422: f"{INVALID} (The number is never repeated in the answer.) Also: a purpose "
            "that is not a lowercase code or holds an identity number, or a limit outside "
            "1-10000.",
            503: NO_KEY,
        },
    ),
)
async def search(request: Request, body: AuditSearch, who: Auditor) -> dict[str, Any]:
    """Oldest first, by the patient's pseudonym. The search itself is recorded (audit.read)."""
    keyer = request.app.state.keyer
    if keyer is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, NO_KEY)
    try:
        patient_key = patient_key_for(keyer, body.patient)
    except InvalidIdentifier as exc:
        raise HTTPException(422, f"{INVALID} ({exc})") from None
    async with request.app.state.db.transaction() as conn:
        found = await entries_for_patient(conn, patient_key, body.limit + 1)
        entry = who.audit_entry(
            "audit.read", body.purpose, patient_key, "", detail="POST /api/v1/audit/search"
        )
        await audit.record(conn, entry)
    return {
        "patient_key": patient_key,
        "entries": found[: body.limit],
        "truncated": len(found) > body.limit,
    }
