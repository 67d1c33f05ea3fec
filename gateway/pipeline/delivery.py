"""Delivery stage: hand each routed delivery to its channel and record the receipt."""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.pipeline import ledger
from gateway.pipeline.channels import ChannelRegistry, DeliveryContext
from gateway.pipeline.ledger import State
from gateway.pipeline.stage import Stage
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages


class DeliverStage(Stage):
    name = "deliver"
    topic = topics.DELIVERIES
    handles = frozenset({"delivery.requested"})

    def __init__(self, db: Database, channels: ChannelRegistry) -> None:
        super().__init__(db)
        self.channels = channels

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        assert event.delivery_id
        row = (
            await conn.execute(
                select(
                    deliveries.c.state,
                    deliveries.c.channel,
                    deliveries.c.recipient_hsa_id,
                    messages.c.canonical,
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.id == event.delivery_id)
            )
        ).one()
        if row.state != State.ROUTED.value:
            return
        channel = self.channels.get(row.channel)
        if channel is None:
            raise LookupError("channel not available in this process")
        outcome = await channel.deliver(
            conn,
            DeliveryContext(
                event.delivery_id, event.message_id, row.recipient_hsa_id, json.loads(row.canonical)
            ),
        )
        await ledger.record(
            conn, event.delivery_id, event.message_id, key, outcome.state, detail=outcome.detail
        )

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        assert event.delivery_id
        await ledger.record(
            conn,
            event.delivery_id,
            event.message_id,
            key,
            State.PARKED,
            detail=f"Leveransen parkerad efter upprepade fel ({error})",
        )
