"""Consent stage (foundation form): decide on the basis the message itself carries.

permit: the patient's consent (samtycke) or the physician's secrecy assessment
(menprövning); deny: an objection (spärr); hold: no basis recorded yet. The full gate, with
Consent resources, per-recipient scope and release of held messages, comes later.
"""

from __future__ import annotations

import json

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.model.bundle import read_bundle
from gateway.pipeline.stage import Stage
from gateway.store.tables import messages

DECISIONS: dict[str | None, tuple[str, str]] = {
    "samtycke": ("permit", "Patientens samtycke registrerat vid inskrivning"),
    "menprovning": ("permit", "Läkarens menprövning: uppgifterna får lämnas ut"),
    "sparr": ("deny", "Patienten har spärrat utlämnande"),
    None: ("hold", "Väntar på samtycke"),
}
STATUS = {"permit": "permitted", "deny": "denied", "hold": "held"}


class ConsentStage(Stage):
    name = "consent"
    topic = topics.EVENTS
    handles = frozenset({"message.accepted"})

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        row = (
            await conn.execute(
                select(messages.c.status, messages.c.canonical).where(
                    messages.c.id == event.message_id
                )
            )
        ).one()
        if row.status != "accepted":
            return
        basis = read_bundle(json.loads(row.canonical)).consent_basis
        decision, reason = DECISIONS.get(basis, DECISIONS[None])
        await conn.execute(
            update(messages)
            .where(messages.c.id == event.message_id)
            .values(
                status=STATUS[decision],
                consent_decision=decision,
                consent_reason=reason,
                updated_at=clock.now(),
            )
        )
        if decision == "permit":
            await enqueue(conn, topics.EVENTS, key, permitted_event(event.message_id))
        else:
            await announce_status(conn, key, event.message_id, STATUS[decision], reason)

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        await park_message(conn, event.message_id)


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
