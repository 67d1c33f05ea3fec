"""Consent stage: record the legal basis a message carries, then pass it on to routing.

A message about a patient who is no LUS case (:mod:`gateway.pipeline.lus`) stops here, in
status ``not-lus``: acknowledged and kept, never routed.

An admission notice carries the patient's consent, the physician's menprövning or the
patient's objection (TakeCare's ZSC segment). That basis becomes a consent record for this
stay (and may release deliveries of earlier messages that were held for want of one); a
message without one relies on the records already there. The decision itself is made per
recipient by the gate (:mod:`gateway.pipeline.gate`) when routing knows the recipients.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.audit import AuditEntry
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.model.bundle import read_bundle, resources_by_ref
from gateway.model.consent import ConsentRecord
from gateway.model.identifiers import PatientId
from gateway.pipeline import gate, lus
from gateway.pipeline.stage import Stage
from gateway.store.tables import messages

_CONSENT_IDS = uuid.UUID("6d1b1c52-6a0e-4c39-9a7e-6f1f2f3b0c11")


class ConsentStage(Stage):
    name = "consent"
    topic = topics.EVENTS
    handles = frozenset({"message.accepted"})

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        row = (
            await conn.execute(
                select(
                    messages.c.status,
                    messages.c.canonical,
                    messages.c.episode_key,
                    messages.c.received_at,
                ).where(messages.c.id == event.message_id)
            )
        ).one()
        if row.status != "accepted":
            return
        bundle = json.loads(row.canonical)
        view = read_bundle(bundle)
        if not await lus.needs_of(
            conn, view, key, event.message_id, row.episode_key, row.received_at
        ):
            # No LUS case: acknowledged and kept, and nothing more (no consent, no deliveries,
            # so no hold, deadline, chase, escalation or deviation).
            await conn.execute(
                update(messages)
                .where(messages.c.id == event.message_id)
                .values(status=lus.NOT_LUS, updated_at=clock.now())
            )
            await announce_status(conn, key, event.message_id, lus.NOT_LUS, lus.NOT_LUS_REASON)
            return
        record = carried_consent(bundle, event.message_id, row.received_at, row.episode_key)
        entries: list[AuditEntry] = []  # recorded last: the chain's lock after the row locks
        if record is not None:
            await gate.store(
                conn,
                record,
                patient_key=key,
                source="message",
                source_id=event.message_id,
                audit_later=entries,
            )
        await conn.execute(
            update(messages)
            .where(messages.c.id == event.message_id)
            .values(status="permitted", updated_at=clock.now())
        )
        await enqueue(conn, topics.EVENTS, key, permitted_event(event.message_id))
        await audit.record_many(conn, entries)

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        await park_message(conn, event.message_id)


def carried_consent(
    bundle: dict[str, Any], message_id: str, received_at: datetime, episode_key: str | None
) -> ConsentRecord | None:
    """The consent record a message's own Consent resource stands for (that stay only)."""
    resources = resources_by_ref(bundle)
    consent = resources.get("Consent/consent")
    patient = resources.get("Patient/patient") or {}
    idents = patient.get("identifier") or []
    if consent is None or not idents:
        return None
    pid = PatientId.from_fhir(idents[0]["system"], str(idents[0]["value"]))
    decided = consent.get("dateTime")
    performer = next(
        (str(p["identifier"]["value"]) for p in consent.get("performer", []) if "identifier" in p),
        "",
    )
    return ConsentRecord(
        id=str(uuid.uuid5(_CONSENT_IDS, message_id)),
        patient=pid,
        basis=consent["category"][0]["coding"][0]["code"],
        status="active",
        recorded_at=datetime.fromisoformat(decided) if decided else received_at,
        purposes=(gate.PURPOSE,),
        episode_key=episode_key,
        performer_hsa_id=performer,
    )


async def announce_status(
    conn: AsyncConnection, key: str, message_id: str, status: str, reason: str = ""
) -> None:
    """Tell subscribers (and the sender's adapter) what became of a message as a whole."""
    await enqueue(
        conn,
        topics.RECEIPTS,
        key,
        Event(
            id=f"message.status:{message_id}:{status}",
            type="message.status",
            message_id=message_id,
            data={"status": status, "reason": reason},
        ),
    )


def permitted_event(message_id: str) -> Event:
    return Event(
        id=f"message.permitted:{message_id}", type="message.permitted", message_id=message_id
    )


def accepted_event(message_id: str) -> Event:
    return Event(
        id=f"message.accepted:{message_id}", type="message.accepted", message_id=message_id
    )


async def park_message(conn: AsyncConnection, message_id: str) -> None:
    await conn.execute(
        update(messages)
        .where(messages.c.id == message_id)
        .values(status="parked", updated_at=clock.now())
    )
