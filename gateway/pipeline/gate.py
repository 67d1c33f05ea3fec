"""The consent gate: no delivery without a recorded decision, and every decision explained.

Routing asks the gate for each (message, recipient) before anything is handed to a channel:
*permit* routes the delivery, *hold* parks it in state ``held`` (the sender hears "väntar på
samtycke" at once, through the ledger's receipt), *deny* ends it in state ``denied``. The
delivery stage asks again just before handing over, so a consent withdrawn in between stops
it. Whenever a consent record is stored (API or message), :func:`release` decides again for
the patient's held deliveries in the same transaction, so a held delivery leaves as soon as
the relay publishes it.

The rules themselves are pure and live in :mod:`gateway.model.consent`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.audit import AuditEntry
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.crypto.columns import seal_row
from gateway.model.consent import ConsentRecord, Decision, Outcome, Recipient, decide, from_fhir
from gateway.model.consent import to_fhir as consent_to_fhir
from gateway.pipeline import ledger
from gateway.pipeline.ledger import State
from gateway.store.sql import lock_rows
from gateway.store.tables import consents, deliveries, messages

log = structlog.get_logger("brygga.gate")
PURPOSE = "lus"  # every message the gateway carries today serves LUS discharge coordination


@dataclass(frozen=True, slots=True)
class StoredConsent:
    record: ConsentRecord
    version: int
    patient_key: str


async def records_for(conn: AsyncConnection, patient_key: str) -> list[ConsentRecord]:
    return [s.record for s in await find(conn, patient_key)]


def delivery_event(message_id: str, delivery_id: str) -> Event:
    return Event(
        id=f"delivery.requested:{delivery_id}",
        type="delivery.requested",
        message_id=message_id,
        delivery_id=delivery_id,
    )


async def decide_for(
    conn: AsyncConnection,
    patient_key: str,
    episode_key: str | None,
    recipient: Recipient,
    now: datetime | None = None,
) -> Decision:
    return decide(
        await records_for(conn, patient_key), recipient, PURPOSE, now or clock.now(), episode_key
    )


async def apply(
    conn: AsyncConnection,
    decision: Decision,
    delivery_id: str,
    message_id: str,
    patient_key: str,
    audit_later: list[AuditEntry] | None = None,
) -> None:
    """Record the decision in the ledger and the audit trail; a permit also asks the delivery
    stage to deliver. With ``audit_later`` the audit entry is appended there instead, for the
    caller to record once, last in its transaction (the chain's lock is taken last)."""
    log.info(
        "gate.decision",
        delivery_id=delivery_id,
        message_id=message_id,
        outcome=decision.outcome.value,
        rule=decision.rule,
    )
    if decision.outcome is Outcome.PERMIT:
        await ledger.record(conn, delivery_id, message_id, patient_key, State.ROUTED)
        await enqueue(conn, topics.DELIVERIES, patient_key, delivery_event(message_id, delivery_id))
    else:
        state = State.HELD if decision.outcome is Outcome.HOLD else State.DENIED
        await ledger.record(
            conn,
            delivery_id,
            message_id,
            patient_key,
            state,
            detail=f"{decision.reason} (regel: {decision.rule})",
        )
    consent = f", samtycke {decision.consent_id}" if decision.consent_id else ""
    entry = AuditEntry(
        actor="gate",
        actor_org="",
        role=audit.SYSTEM_ROLE,
        action="gate.decision",
        purpose=audit.PURPOSE_LUS,
        patient_key=patient_key,
        subject=delivery_id,
        outcome=decision.outcome.value,
        detail=f"regel {decision.rule}{consent}",
    )
    if audit_later is None:
        await audit.record(conn, entry)
    else:
        audit_later.append(entry)


async def store(
    conn: AsyncConnection,
    record: ConsentRecord,
    *,
    patient_key: str,
    source: str,
    source_id: str,
    audit_later: list[AuditEntry] | None = None,
) -> StoredConsent:
    """Insert or replace a consent record (a new version), then release what it decides.
    ``audit_later``: as for :func:`apply`."""
    now = clock.now()
    version = (
        await conn.execute(select(consents.c.version).where(consents.c.id == record.id))
    ).scalar()
    values = seal_row(
        consents,
        {
            "id": record.id,
            "patient_key": patient_key,
            "episode_key": record.episode_key,
            "basis": record.basis,
            "status": record.status,
            "resource": json.dumps(consent_to_fhir(record), ensure_ascii=False),
            "recorded_at": record.recorded_at,
            "updated_at": now,
        },
    )
    del values["id"]
    if version is None:
        version = 1
        await conn.execute(
            consents.insert().values(
                id=record.id, version=1, source=source, source_id=source_id, **values
            )
        )
    else:
        version += 1
        await conn.execute(
            update(consents).where(consents.c.id == record.id).values(version=version, **values)
        )
    await release(conn, patient_key, audit_later)
    return StoredConsent(record, version, patient_key)


async def release(
    conn: AsyncConnection, patient_key: str, audit_later: list[AuditEntry] | None = None
) -> None:
    """Decide again for the patient's held deliveries. The gate's audit entries go to
    ``audit_later`` if given, else they are recorded last."""
    held = (
        await conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.message_id,
                deliveries.c.recipient_hsa_id,
                deliveries.c.role,
                messages.c.episode_key,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(messages.c.patient_key == patient_key, deliveries.c.state == State.HELD.value)
            .order_by(messages.c.received_at, deliveries.c.created_at)
        )
    ).all()
    # Row locks in one order everywhere: the deliveries (by id) before their messages.
    await lock_rows(conn, deliveries, [d.id for d in held])
    if not held:
        return
    records = await records_for(conn, patient_key)
    now = clock.now()
    released: set[str] = set()
    entries: list[AuditEntry] = []
    for d in held:
        decision = decide(
            records, Recipient(d.recipient_hsa_id, d.role), PURPOSE, now, d.episode_key
        )
        if decision.outcome is not Outcome.HOLD:
            await apply(conn, decision, d.id, d.message_id, patient_key, entries)
            released.add(d.message_id)
    if released:
        await lock_rows(conn, messages, released)
        await conn.execute(
            update(messages)
            .where(messages.c.id.in_(released), messages.c.status == "held")
            .values(status="routed", updated_at=now)
        )
    if audit_later is None:
        await audit.record_many(conn, entries)
    else:
        audit_later.extend(entries)


async def load(conn: AsyncConnection, consent_id: str) -> StoredConsent | None:
    row = (await conn.execute(select(consents).where(consents.c.id == consent_id))).first()
    return None if row is None else _stored(row)


async def find(conn: AsyncConnection, patient_key: str) -> list[StoredConsent]:
    """The patient's consent records, oldest first."""
    rows = await conn.execute(
        select(consents)
        .where(consents.c.patient_key == patient_key)
        .order_by(consents.c.recorded_at)
    )
    return [_stored(r) for r in rows]


def _stored(row: Any) -> StoredConsent:
    record = from_fhir(json.loads(row.resource), row.id, row.recorded_at, strict=False)
    if row.episode_key:
        record = replace(record, episode_key=row.episode_key)
    return StoredConsent(record, row.version, row.patient_key)
