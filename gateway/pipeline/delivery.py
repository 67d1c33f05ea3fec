"""Delivery stage: hand each routed delivery to its channel and record what came of it.

Every send is an attempt (``delivery_attempts``): the first, each resend and the first send
on a fallback channel. A ``delivery.requested`` event names the channel and the attempt it
asks for, so a duplicate or stale request (a redelivered event, a resend racing a late
receipt) changes nothing. What to do when no receipt comes is the follow-up's business
(:mod:`gateway.pipeline.followup`); this stage only schedules when it should look.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.audit import AuditEntry
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.directory import Directory, DirectorySource
from gateway.model.bundle import withheld_kinds, withhold
from gateway.model.consent import Outcome, Recipient
from gateway.pipeline import gate, ledger
from gateway.pipeline.channels import (
    ChannelRegistry,
    ChannelRejected,
    ChannelUnavailable,
    DeliveryContext,
)
from gateway.pipeline.deadlines import Deadlines, default_deadlines
from gateway.pipeline.ledger import State
from gateway.pipeline.stage import Stage
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, messages

# Deliveries in these states may still be sent (again): routed, or sent without a receipt.
SENDABLE = (State.ROUTED.value, State.DELIVERED.value)


def attempt_event_for(message_id: str, delivery_id: str, channel: str, attempt: int) -> Event:
    """A request to send ``delivery_id`` by ``channel`` for the ``attempt``-th time."""
    return Event(
        id=f"delivery.requested:{delivery_id}:{channel}:{attempt}",
        type="delivery.requested",
        message_id=message_id,
        delivery_id=delivery_id,
        data={"channel": channel, "attempt": attempt},
    )


async def attempt_event(
    conn: AsyncConnection,
    patient_key: str,
    message_id: str,
    delivery_id: str,
    channel: str,
    attempt: int,
) -> None:
    await enqueue(
        conn,
        topics.DELIVERIES,
        patient_key,
        attempt_event_for(message_id, delivery_id, channel, attempt),
    )


async def record_attempt(
    conn: AsyncConnection,
    delivery_id: str,
    channel: str,
    attempt: int,
    outcome: str,
    detail: str,
    at: datetime,
) -> None:
    await conn.execute(
        insert(delivery_attempts).values(
            delivery_id=delivery_id,
            channel=channel,
            attempt=attempt,
            at=at,
            outcome=outcome,
            detail=detail[:500] or None,
        )
    )


class DeliverStage(Stage):
    name = "deliver"
    topic = topics.DELIVERIES
    handles = frozenset({"delivery.requested"})

    def __init__(
        self,
        db: Database,
        channels: ChannelRegistry,
        directory: DirectorySource | None = None,
        resend_after: timedelta = timedelta(minutes=30),
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(db)
        self.channels = channels
        self.directory = directory or Directory([])
        self.resend_after = resend_after
        self.deadlines = deadlines or default_deadlines()

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        assert event.delivery_id
        query = (
            select(
                deliveries.c.state,
                deliveries.c.channel,
                deliveries.c.attempts,
                deliveries.c.recipient_hsa_id,
                deliveries.c.role,
                deliveries.c.due_at,
                deliveries.c.due_rule,
                deliveries.c.withheld,
                messages.c.canonical,
                messages.c.episode_key,
                messages.c.patient_key,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(deliveries.c.id == event.delivery_id)
        )
        if conn.dialect.name == "postgresql":  # two requests for one delivery: one at a time
            query = query.with_for_update(of=deliveries)
        row = (await conn.execute(query)).one()
        wanted = event.data.get("channel", row.channel)
        attempt = int(event.data.get("attempt", 1))
        if row.state not in SENDABLE or wanted != row.channel or attempt != row.attempts + 1:
            return  # already sent, receipted or moved on: a duplicate or stale request
        # Ask the gate again: a consent withdrawn (or an objection made) since routing stops
        # the delivery here. A basis that merely lapsed since then does not: the decision
        # to deliver was made while it held. The patient is the message's key now, not the
        # event's: a merge since routing moved the message and its consents to another.
        decision = await gate.decide_for(
            conn, row.patient_key, row.episode_key, Recipient(row.recipient_hsa_id, row.role)
        )
        if decision.outcome is Outcome.DENY:
            await _schedule(conn, event.delivery_id, None, attempt)
            await gate.apply(conn, decision, event.delivery_id, event.message_id, key)  # last
            return
        channel = self.channels.get(row.channel)
        if channel is None:
            raise LookupError("channel not available in this process")
        org = (await self.directory.current(conn)).get(row.recipient_hsa_id)
        endpoint = org.endpoint(row.channel) if org else None
        now = clock.now()
        try:
            outcome = await channel.deliver(
                DeliveryContext(
                    event.delivery_id,
                    event.message_id,
                    row.recipient_hsa_id,
                    withhold(json.loads(row.canonical), withheld_kinds(row.withheld)),
                    address=endpoint.address if endpoint else "",
                    attempt=attempt,
                    dedup_key=event.delivery_id,
                )
            )
        except (ChannelUnavailable, ChannelRejected) as exc:
            # Not a stage failure to retry at once: the follow-up resends after a while, or
            # (rejected) falls back to the next channel when it looks, which is now.
            rejected = isinstance(exc, ChannelRejected)
            kind = "rejected" if rejected else "unavailable"
            await record_attempt(conn, event.delivery_id, row.channel, attempt, kind, str(exc), now)
            await _schedule(
                conn, event.delivery_id, now if rejected else now + self.resend_after, attempt
            )
            return
        kind = "received" if outcome.state is State.RECEIVED else "delivered"
        await record_attempt(
            conn, event.delivery_id, row.channel, attempt, kind, outcome.detail, now
        )
        await ledger.record(
            conn, event.delivery_id, event.message_id, key, State.DELIVERED, detail=outcome.detail
        )
        if outcome.state is State.RECEIVED:
            await ledger.record(conn, event.delivery_id, event.message_id, key, State.RECEIVED)
            # delivered, not read: where a person's kvittens is due, look again then (0019)
            check = row.due_at if self.deadlines.needs_person(row.due_rule) else None
        elif channel.application_receipts:
            check = now + self.resend_after
        else:
            check = row.due_at  # the inbox: nothing to resend; look again at the deadline
        await _schedule(conn, event.delivery_id, check, attempt)
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
                detail=f"till {row.recipient_hsa_id} via {row.channel}, försök {attempt}",
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


async def _schedule(
    conn: AsyncConnection, delivery_id: str, check: datetime | None, attempt: int
) -> None:
    """Count the attempt, and tell the follow-up when to look at the delivery next."""
    await conn.execute(
        update(deliveries)
        .where(deliveries.c.id == delivery_id)
        .values(attempts=attempt, next_check_at=check)
    )
