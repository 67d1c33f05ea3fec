"""Receipts stage: settle a message once every delivery has reached a terminal state.

Receipts are recorded in the ledger by whoever observes them (a channel, the inbox API);
this stage follows ``brygga.receipts`` to close the message. Returning receipts to the
sender (HL7 to TakeCare, FHIR responses) hangs off the same topic in later issues.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.pipeline.ledger import State
from gateway.pipeline.stage import Stage
from gateway.store.tables import deliveries, messages

TERMINAL = [s.value for s in State if s.terminal]


async def settle(conn: AsyncConnection, message_id: str) -> bool:
    """Mark a routed message complete when no delivery is still open. True if it was."""
    open_count = (
        await conn.execute(
            select(deliveries.c.id)
            .where(deliveries.c.message_id == message_id, deliveries.c.state.not_in(TERMINAL))
            .limit(1)
        )
    ).first()
    if open_count is not None:
        return False
    result = await conn.execute(
        update(messages)
        .where(messages.c.id == message_id, messages.c.status == "routed")
        .values(status="complete", updated_at=clock.now())
    )
    return bool(result.rowcount)


class ReceiptsStage(Stage):
    name = "receipts"
    topic = topics.RECEIPTS
    handles = frozenset({"receipt.recorded", "message.settle"})

    def wants(self, event: Event) -> bool:
        return event.type == "message.settle" or event.data.get("state") in TERMINAL

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        await settle(conn, event.message_id)
