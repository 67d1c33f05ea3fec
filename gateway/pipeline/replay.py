"""Replay: run parked work again once its cause is fixed (an operator's decision).

A parked event's id is already claimed in ``processed_events``, so the replayed event gets a
fresh id; the stages' own state checks still keep the effect single.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages


@dataclass(frozen=True, slots=True)
class Replayed:
    message: bool
    deliveries: int


async def replay(db: Database, message_id: str) -> Replayed | None:
    """Restart a parked message from consent, and parked deliveries from delivery."""
    stamp = clock.now().strftime("%Y%m%dT%H%M%S%f")
    async with db.transaction() as conn:
        msg = (
            await conn.execute(
                select(messages.c.status, messages.c.patient_key).where(messages.c.id == message_id)
            )
        ).first()
        if msg is None:
            return None
        restarted = msg.status == "parked"
        if restarted:
            await conn.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(
                    status="accepted",
                    consent_decision=None,
                    consent_reason=None,
                    updated_at=clock.now(),
                )
            )
            await enqueue(
                conn,
                topics.EVENTS,
                msg.patient_key,
                Event(
                    id=f"message.accepted:{message_id}:replay:{stamp}",
                    type="message.accepted",
                    message_id=message_id,
                ),
            )
        parked = (
            (
                await conn.execute(
                    select(deliveries.c.id).where(
                        deliveries.c.message_id == message_id,
                        deliveries.c.state == State.PARKED.value,
                        deliveries.c.channel.is_not(None),
                    )
                )
            )
            .scalars()
            .all()
        )
        for delivery_id in parked:
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(state=State.ROUTED.value, updated_at=clock.now())
            )
            await enqueue(
                conn,
                topics.DELIVERIES,
                msg.patient_key,
                Event(
                    id=f"delivery.requested:{delivery_id}:replay:{stamp}",
                    type="delivery.requested",
                    message_id=message_id,
                    delivery_id=delivery_id,
                ),
            )
    return Replayed(restarted, len(parked))
