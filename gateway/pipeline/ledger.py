"""The receipt ledger: per (message, recipient), the ordered states and when each was reached.

Every change of a delivery's state goes through :func:`record`, which appends the receipt
event, moves the delivery forward and announces the receipt on ``brygga.receipts``, all in
the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.store.sql import insert_ignore
from gateway.store.tables import deliveries, receipt_events


class State(StrEnum):
    ACCEPTED = "accepted"
    HELD = "held"  # the gate found no legal basis yet; released when one arrives
    ROUTED = "routed"
    DELIVERED = "delivered"
    RECEIVED = "received"  # the recipient's system accepted it (an application receipt)
    READ = "read"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    PARKED = "parked"
    DENIED = "denied"  # the gate refused: an objection or a withdrawn consent

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in (State.ACKNOWLEDGED, State.FAILED, State.PARKED, State.DENIED)


_RANK = {s: i for i, s in enumerate(State)}
VISIBLE_IN_INBOX = (State.DELIVERED, State.RECEIVED, State.READ, State.ACKNOWLEDGED)


@dataclass(frozen=True, slots=True)
class Actor:
    """Who caused a receipt: a person (read, acknowledged) or the gateway itself."""

    name: str = ""
    role: str = ""
    org: str = ""


async def record(
    conn: AsyncConnection,
    delivery_id: str,
    message_id: str,
    patient_key: str,
    state: State,
    *,
    actor: Actor | None = None,
    detail: str = "",
    at: datetime | None = None,
) -> bool:
    """Record that a delivery reached ``state``. False if it had already (idempotent)."""
    at = at or clock.now()
    actor = actor or Actor()
    inserted = await insert_ignore(
        conn,
        receipt_events,
        {
            "delivery_id": delivery_id,
            "state": state.value,
            "at": at,
            "actor_name": actor.name or None,
            "actor_role": actor.role or None,
            "actor_org": actor.org or None,
            "detail": detail or None,
        },
    )
    if not inserted:
        return False
    current = (
        await conn.execute(select(deliveries.c.state).where(deliveries.c.id == delivery_id))
    ).scalar_one()
    if state.rank > State(current).rank:
        values: dict[str, object] = {"state": state.value, "updated_at": at}
        if detail:
            values["detail"] = detail
        await conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(values))
    await enqueue(
        conn,
        topics.RECEIPTS,
        patient_key,
        Event(
            id=f"receipt:{delivery_id}:{state.value}",
            type="receipt.recorded",
            message_id=message_id,
            delivery_id=delivery_id,
            data={"state": state.value, "at": at.isoformat()},
        ),
    )
    return True
