"""What an authorised auditor may ask: every audit entry about one patient.

The log holds only the patient's pseudonym; the auditor gives the identity number, and the
gateway computes the pseudonym with its HMAC secret (``keys/patient-hmac.key``). That lookup
is itself an audit entry (``audit.read``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.bus.keys import PatientKeyer
from gateway.logs import redact_identity_numbers
from gateway.model.identifiers import parse_identity_number
from gateway.store.tables import audit_log

MAX_ENTRIES = 10_000
COLUMNS = ("actor", "actor_org", "role", "action", "subject", "purpose", "outcome", "detail")


def check_purpose(purpose: str) -> str:
    """The purpose is stored in clear with the search: it must not name the patient."""
    if redact_identity_numbers(purpose) != purpose:
        raise ValueError("purpose must not contain a personal identity number")
    return purpose


def patient_key_for(keyer: PatientKeyer, identity_number: str) -> str:
    """The pseudonym of a personnummer or samordningsnummer, as intake computes it.

    Raises ``InvalidIdentifier`` (whose text never repeats the number).
    """
    pid = parse_identity_number(identity_number)
    return keyer.key(pid.system, pid.value)


async def entries_for_patient(
    conn: AsyncConnection, patient_key: str, limit: int = MAX_ENTRIES
) -> list[dict[str, Any]]:
    """The patient's entries, oldest first (at most ``limit``)."""
    rows = (
        await conn.execute(
            select(audit_log)
            .where(audit_log.c.patient_key == patient_key)
            .order_by(audit_log.c.seq)
            .limit(limit)
        )
    ).all()
    return [
        {"seq": r.seq, "at": r.at.isoformat(), **{name: getattr(r, name) for name in COLUMNS}}
        for r in rows
    ]
