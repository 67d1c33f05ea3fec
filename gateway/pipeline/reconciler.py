"""The reconciler: republish the next event for any work that has not moved for too long.

Kafka may lose what it held (a broker restart with memory storage, a retention mistake) and
a process may die between commit and publish; the database still knows what is unfinished.
Each republished event has the same id as the original, so a stage that did handle it
ignores it. The row's ``updated_at`` is touched so it is not republished again at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.logs import error_fields
from gateway.pipeline.consent import accepted_event, permitted_event
from gateway.pipeline.gate import delivery_event
from gateway.pipeline.ledger import State
from gateway.pipeline.receipts import TERMINAL
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, outbox, processed_events

log = structlog.get_logger("brygga.reconciler")
LIMIT = 1000


class Reconciler:
    def __init__(
        self,
        db: Database,
        after_seconds: float,
        interval_seconds: float,
        retention_days: float = 7.0,
    ) -> None:
        self.db = db
        self.retention = timedelta(days=retention_days)
        self.after = timedelta(seconds=after_seconds)
        self.interval = interval_seconds
        self.republished = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for step, event in (
                (self.reconcile_once, "reconciler.republished"),
                (self.purge_once, "reconciler.purged"),
            ):
                try:
                    count = await step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is away: try again next round
                    log.warning("reconciler.retry", step=step.__name__, **error_fields(exc))
                    continue
                if count:
                    log.info(event, rows=count)

    async def reconcile_once(self) -> int:
        now = clock.now()
        cutoff = now - self.after
        async with self.db.transaction() as conn:
            count = await self._messages(conn, "accepted", cutoff, now, accepted_event)
            count += await self._messages(conn, "permitted", cutoff, now, permitted_event)
            count += await self._messages(conn, "routed", cutoff, now, _settle_event, settle=True)
            rows = (
                await conn.execute(
                    select(deliveries.c.id, deliveries.c.message_id, messages.c.patient_key)
                    .join(messages, messages.c.id == deliveries.c.message_id)
                    .where(
                        deliveries.c.state == State.ROUTED.value, deliveries.c.updated_at < cutoff
                    )
                    .limit(LIMIT)
                )
            ).all()
            for r in rows:
                await enqueue(
                    conn, topics.DELIVERIES, r.patient_key, delivery_event(r.message_id, r.id)
                )
            if rows:
                await conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_([r.id for r in rows]))
                    .values(updated_at=now)
                )
            count += len(rows)
        self.republished += count
        return count

    async def purge_once(self) -> int:
        """Delete published outbox rows and processed-event keys past retention.

        A processed-event key only guards against a redelivery; handlers also check state, so
        an event replayed after its key is gone still changes nothing.
        """
        cutoff = clock.now() - self.retention
        async with self.db.transaction() as conn:
            done = await conn.execute(
                delete(outbox).where(
                    outbox.c.published_at.is_not(None), outbox.c.published_at < cutoff
                )
            )
            keys = await conn.execute(
                delete(processed_events).where(processed_events.c.processed_at < cutoff)
            )
        return int(done.rowcount or 0) + int(keys.rowcount or 0)

    async def _messages(
        self,
        conn: AsyncConnection,
        status: str,
        cutoff: datetime,
        now: datetime,
        make_event: Callable[[str], Event],
        settle: bool = False,
    ) -> int:
        query = select(messages.c.id, messages.c.patient_key).where(
            messages.c.status == status, messages.c.updated_at < cutoff
        )
        if settle:  # only messages whose every delivery is finished but were not closed
            open_delivery = select(deliveries.c.id).where(
                deliveries.c.message_id == messages.c.id, deliveries.c.state.not_in(TERMINAL)
            )
            query = query.where(~open_delivery.exists())
        rows = (await conn.execute(query.limit(LIMIT))).all()
        topic = topics.RECEIPTS if settle else topics.EVENTS
        for r in rows:
            await enqueue(conn, topic, r.patient_key, make_event(r.id))
        if rows:
            await conn.execute(
                update(messages)
                .where(messages.c.id.in_([r.id for r in rows]))
                .values(updated_at=now)
            )
        return len(rows)


def _settle_event(message_id: str) -> Event:
    # A fresh id each time: settling is idempotent, and an old id may already be claimed.
    return Event(
        id=f"message.settle:{message_id}:{clock.now().timestamp()}",
        type="message.settle",
        message_id=message_id,
    )
