"""Delivery stage: hand each routed delivery to its channel and record the receipt."""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit
from gateway.audit import AuditEntry
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.model.consent import Outcome, Recipient
from gateway.pipeline import gate, ledger
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
                    deliveries.c.role,
                    messages.c.canonical,
                    messages.c.episode_key,
                    messages.c.patient_key,
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.id == event.delivery_id)
            )
        ).one()
        if row.state != State.ROUTED.value:
            return
        # Ask the gate again: a consent withdrawn (or an objection made) since routing stops
        # the delivery here. A basis that merely lapsed since then does not: the decision
        # to deliver was made while it held. The patient is the message's key now, not the
        # event's: a merge since routing moved the message and its consents to another.
        decision = await gate.decide_for(
            conn, row.patient_key, row.episode_key, Recipient(row.recipient_hsa_id, row.role)
        )
        if decision.outcome is Outcome.DENY:
            await gate.apply(conn, decision, event.delivery_id, event.message_id, key)
            return
        channel = self.channels.get(row.channel)
        if channel is None:
            raise LookupError("channel not available in this process")
        outcome = await channel.deliver(
            DeliveryContext(
                event.delivery_id, event.message_id, row.recipient_hsa_id, json.loads(row.canonical)
            ),
        )
        await ledger.record(
            conn, event.delivery_id, event.message_id, key, outcome.state, detail=outcome.detail
        )
        # The patient's data left the gateway: last in the transaction (the chain's lock).
        await audit.record(
            conn,
            AuditEntry(
                actor=self.name,
                actor_org="",
                role=audit.SYSTEM_ROLE,
                action=f"delivery.{outcome.state.value}",
                purpose=audit.PURPOSE_LUS,
                patient_key=row.patient_key,
                subject=event.delivery_id,
                detail=f"till {row.recipient_hsa_id} via {row.channel}",
            ),
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
