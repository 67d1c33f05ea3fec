"""The reconciler: republish the next event for any work that has really stalled.

Kafka may lose what it held (a broker restart with memory storage, a retention mistake) and
a process may die between commit and publish; the database still knows what is unfinished.
Each republished event has the same id as the original, so a stage that did handle it
ignores it.

Stalled means: not moved for ``after_seconds`` (``updated_at``) *and* not republished within
its in-flight window. A republished event may sit behind a long queue; republishing it again
each pass only lengthens the queue (2,000 admissions once became 67,117 republished events).
So each row remembers when it was last republished (``republished_at``) and until when that
event counts as in flight (``republish_after``); the window starts at ``after_seconds`` and
doubles with every republish of a row that has not moved since, up to ``MAX_WINDOW_FACTOR``
times. A row that moves starts again from one window. Nothing is republished while the outbox
itself holds a backlog (the relay or Kafka is behind: what is there is in flight), nor while
the consumer group of the stage that would take the event has records left to read (``lag``):
the work is most likely queued there, and a republished event would only join the end of the
same queue (a 600-admission run once held three republished delivery requests for every one
routed). Once the group has caught up, anything still unfinished was really lost.

Locks: each kind of work is one short transaction of at most ``BATCH`` rows, taken in
primary-key order with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: the reconciler never waits
for a row a stage holds (it takes it next pass), so it is never part of a deadlock, and it
never touches ``updated_at``, which means "the row really changed".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Table, and_, delete, func, or_, select, update
from sqlalchemy.sql import Select

from gateway import clock
from gateway.bus import topics
from gateway.bus.kafka import group_id
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
BATCH = 200  # rows per kind of work per pass
MAX_WINDOW_FACTOR = 8  # the in-flight window grows to at most this many times after_seconds
BACKLOG = 5000  # unpublished outbox rows above which nothing more is republished
# Records a consumer group has yet to read from a topic; None when that cannot be told.
Lag = Callable[[str, str], Awaitable[int | None]]


class Reconciler:
    def __init__(
        self,
        db: Database,
        after_seconds: float,
        interval_seconds: float,
        retention_days: float = 7.0,
        lag: Lag | None = None,
    ) -> None:
        self.db = db
        self.lag = lag  # None: the consumers' progress is not known (republish by window)
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
        """One pass; the number of events republished."""
        if await self._backlog() > BACKLOG:
            log.info("reconciler.outbox_backlog", over=BACKLOG)
            return 0
        open_delivery = select(deliveries.c.id).where(
            deliveries.c.message_id == messages.c.id, deliveries.c.state.not_in(TERMINAL)
        )
        work: list[tuple[str, str, Table, Select[Any], Callable[[Any], Event]]] = [
            (topics.EVENTS, "consent", messages, _messages("accepted"), _by_id(accepted_event)),
            (topics.EVENTS, "route", messages, _messages("permitted"), _by_id(permitted_event)),
            (
                topics.RECEIPTS,
                "receipts",
                messages,
                _messages("routed").where(~open_delivery.exists()),  # done but not closed
                _settle_event,
            ),
            (
                topics.DELIVERIES,
                "deliver",
                deliveries,
                select(deliveries.c.id, messages.c.patient_key, deliveries.c.message_id)
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.state == State.ROUTED.value),
                lambda r: delivery_event(r.message_id, r.id),
            ),
        ]
        count = 0
        for topic, stage, table, query, make_event in work:
            if not await self._queued(topic, stage):
                count += await self._republish(table, query, topic, make_event)
        self.republished += count
        return count

    async def _queued(self, topic: str, stage: str) -> bool:
        """True while ``stage``'s consumer group still has records of ``topic`` to read."""
        if self.lag is None:
            return False
        return bool(await self.lag(topic, group_id(stage)))

    async def _republish(
        self, table: Table, query: Select[Any], topic: str, make_event: Callable[[Any], Event]
    ) -> int:
        now = clock.now()
        query = (
            query.add_columns(table.c.updated_at, table.c.republished_at, table.c.republish_after)
            .where(table.c.updated_at < now - self.after, _not_in_flight(table, now))
            .order_by(table.c.id)
            .limit(BATCH)
        )
        async with self.db.transaction() as conn:
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(of=table, skip_locked=True)
            rows = (await conn.execute(query)).all()
            for r in rows:
                await enqueue(conn, topic, r.patient_key, make_event(r))
                await conn.execute(
                    update(table)
                    .where(table.c.id == r.id)
                    .values(republished_at=now, republish_after=now + self._window(r))
                )
        return len(rows)

    def _window(self, row: Any) -> timedelta:
        """How long the event republished now counts as in flight."""
        if row.republished_at is None or row.updated_at > row.republished_at:
            return self.after  # first time, or the row moved since: start again
        window = 2 * (row.republish_after - row.republished_at)
        return max(self.after, min(window, self.after * MAX_WINDOW_FACTOR))

    async def _backlog(self) -> int:
        async with self.db.read() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).select_from(
                            select(outbox.c.id)
                            .where(outbox.c.published_at.is_(None))
                            .limit(BACKLOG + 1)
                            .subquery()
                        )
                    )
                ).scalar_one()
            )

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


def _not_in_flight(table: Table, now: datetime) -> Any:
    """Never republished, its window is over, or the row moved since it was."""
    return or_(
        table.c.republish_after.is_(None),
        table.c.republish_after <= now,
        and_(table.c.republished_at.is_not(None), table.c.updated_at > table.c.republished_at),
    )


def _messages(status: str) -> Select[Any]:
    return select(messages.c.id, messages.c.patient_key).where(messages.c.status == status)


def _by_id(make: Callable[[str], Event]) -> Callable[[Any], Event]:
    return lambda row: make(row.id)


def _settle_event(row: Any) -> Event:
    # A fresh id each time: settling is idempotent, and an old id may already be claimed.
    return Event(
        id=f"message.settle:{row.id}:{clock.now().timestamp()}",
        type="message.settle",
        message_id=row.id,
    )
