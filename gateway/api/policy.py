"""Who may do what, and for which organisation: the one place the API decides it.

``POLICY`` maps each action to the roles that may take it and how far they reach: ``OWN``
(only what belongs to the token's organisation) or ``ALL`` (the gateway operator's roles).
A role missing from an action gets 403; a resource of another organisation under ``OWN``
gets 404 where its existence is itself information (a message, a notice, a consent, a
deviation) and 403 where it is not (the directory, a delivery named in a receipt).
docs/operations.md ("Who may do what") is this table in words, decision 0011 says why, and
tests/test_authz_matrix.py checks every endpoint against it.

What belongs to an organisation:
- a message: the one that sent it (MessageHeader.sender) sees it whole; a recipient sees
  only its own deliveries;
- a delivery, a notice, a receipt: its recipient;
- a deviation: the party responsible for answering it;
- a patient's consent: recorded by an organisation that sent a message about the patient
  (the care unit that asked the patient, 001:2592); read by one that sent one or received
  one;
- a directory resource: the unit (Organization by HSA-id; HealthcareService and Endpoint by
  the Organization they reference).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, status
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.api.auth import Caller, caller
from gateway.audit import AuditEntry
from gateway.directory import store as directory_store
from gateway.directory.fhir import DirectoryInvalid, parse
from gateway.model.bundle import read_bundle
from gateway.pipeline.ledger import VISIBLE_IN_INBOX
from gateway.store.tables import deliveries, messages


class Reach(StrEnum):
    OWN = "own"
    ALL = "all"


OWN, ALL = Reach.OWN, Reach.ALL

POLICY: dict[str, dict[str, Reach]] = {
    "inbox.read": {"staff": OWN},
    "inbox.acknowledge": {"staff": OWN},
    "inbox.return": {"staff": OWN},
    "message.ledger": {"ops": ALL, "integration": OWN},
    "message.find": {"ops": ALL, "integration": OWN},
    "delivery.receipt": {"integration": OWN},
    "deviation.read": {"staff": OWN, "ops": ALL, "auditor": ALL},
    "deviation.answer": {"staff": OWN, "ops": ALL},
    "consent.write": {"integration": OWN, "consent-admin": ALL},
    "consent.read": {"integration": OWN, "consent-admin": ALL, "ops": ALL, "auditor": ALL},
    "directory.read": {"directory-admin": ALL, "integration": ALL, "ops": ALL},
    "directory.write": {"directory-admin": ALL, "integration": OWN},
    "stats.read": {"ops": ALL, "auditor": ALL},
    "unmapped.read": {"ops": ALL, "directory-admin": ALL},
    "audit.read": {"auditor": ALL},
}


@dataclass(frozen=True, slots=True)
class Grant:
    """A verified caller allowed an action, and how far that allowance reaches."""

    caller: Caller
    reach: Reach

    @property
    def org(self) -> str:
        return self.caller.org

    @property
    def role(self) -> str:
        return self.caller.role

    @property
    def name(self) -> str:
        return self.caller.name

    @property
    def title(self) -> str:
        return self.caller.title

    def audit_entry(
        self, action: str, purpose: str, patient_key: str, subject: str, detail: str = ""
    ) -> AuditEntry:
        return self.caller.audit_entry(action, purpose, patient_key, subject, detail)

    @property
    def scope(self) -> str | None:
        """The organisation to limit a query to; None: every organisation."""
        return None if self.reach is ALL else self.caller.org

    def covers(self, *owners: str | None) -> bool:
        """Whether the caller may act on something owned by any of ``owners``."""
        return self.reach is ALL or self.caller.org in owners


def allow(action: str) -> Callable[[Caller], Grant]:
    """The dependency for a route taking ``action``: 403 for a role the policy leaves out."""
    roles = POLICY[action]

    def check(who: Annotated[Caller, Depends(caller)]) -> Grant:
        reach = roles.get(who.role)
        if reach is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"This needs the role {' or '.join(roles)}; the token has '{who.role}'.",
            )
        return Grant(who, reach)

    return check


# --------------------------------------------------------------------------- messages


def _sender(canonical: str) -> str:
    return read_bundle(json.loads(canonical)).sender_hsa_id


async def message_sender(conn: AsyncConnection, message_id: str) -> str | None:
    row = await conn.execute(select(messages.c.canonical).where(messages.c.id == message_id))
    canonical = row.scalar_one_or_none()
    return None if canonical is None else _sender(canonical)


async def visible_ledger(
    conn: AsyncConnection, grant: Grant, ledger: dict[str, Any]
) -> dict[str, Any] | None:
    """The ledger as the caller may see it: whole for its sender (or ``ALL``), only the
    caller's own deliveries for a recipient, None for anyone else."""
    if grant.reach is ALL or await message_sender(conn, ledger["id"]) == grant.org:
        return ledger
    own = [d for d in ledger["deliveries"] if d["recipient"]["hsa_id"] == grant.org]
    return {**ledger, "deliveries": own} if own else None


async def sent_by_caller(conn: AsyncConnection, grant: Grant, ids: Iterable[str]) -> list[str]:
    """Of these message ids, those the caller may look up by MSH-10: the ones it sent."""
    ids = list(ids)
    if grant.reach is ALL or not ids:
        return ids
    rows = await conn.execute(
        select(messages.c.id, messages.c.canonical).where(messages.c.id.in_(ids))
    )
    mine = {r.id for r in rows if _sender(r.canonical) == grant.org}
    return [i for i in ids if i in mine]


# --------------------------------------------------------------------------- patients


async def sent_about(conn: AsyncConnection, org: str, patient_key: str) -> bool:
    """Whether ``org`` sent a message about the patient (it has the patient in its care)."""
    rows = await conn.execute(
        select(messages.c.canonical).where(messages.c.patient_key == patient_key)
    )
    return any(_sender(r.canonical) == org for r in rows)


async def received_about(conn: AsyncConnection, org: str, patient_key: str) -> bool:
    """Whether a message about the patient reached ``org`` (a delivery it could read)."""
    row = await conn.execute(
        select(deliveries.c.id)
        .join(messages, messages.c.id == deliveries.c.message_id)
        .where(
            messages.c.patient_key == patient_key,
            deliveries.c.recipient_hsa_id == org,
            deliveries.c.state.in_([s.value for s in VISIBLE_IN_INBOX]),
        )
        .limit(1)
    )
    return row.first() is not None


async def may_record_consent(conn: AsyncConnection, grant: Grant, patient_key: str) -> bool:
    return grant.reach is ALL or await sent_about(conn, grant.org, patient_key)


async def may_read_consent(conn: AsyncConnection, grant: Grant, patient_key: str) -> bool:
    return (
        grant.reach is ALL
        or await sent_about(conn, grant.org, patient_key)
        or await received_about(conn, grant.org, patient_key)
    )


# --------------------------------------------------------------------------- directory


async def directory_owner(conn: AsyncConnection, rtype: str, resource: Any) -> str | None:
    """The HSA-id of the unit a directory resource belongs to; None when it names none
    (or cannot be read: the write then fails on its own with the element named)."""
    try:
        parsed = parse(resource, rtype)
    except DirectoryInvalid:
        return None
    if parsed.hsa_id:
        return parsed.hsa_id
    if not parsed.organization_id:
        return None
    org = await directory_store.get(conn, "Organization", parsed.organization_id)
    return None if org is None else parse(org.resource, "Organization").hsa_id


async def may_change_directory(
    conn: AsyncConnection,
    grant: Grant,
    rtype: str,
    current: directory_store.StoredResource | None,
    resource: Any,
) -> bool:
    """An ``OWN`` writer changes only its unit's resources, and cannot hand one over to
    another unit or take one from it: the stored version and the new one must be its own."""
    if grant.reach is ALL:
        return True
    if current is not None and not current.deleted:
        if await directory_owner(conn, rtype, current.resource) != grant.org:
            return False
    if resource is None:  # a delete: an unknown id answers 404 on its own
        return True
    try:
        parse(resource, rtype)
    except DirectoryInvalid:
        return True  # the store refuses it with the element named (400)
    return await directory_owner(conn, rtype, resource) == grant.org
