"""Transactional outbox: events are written in the stage's own transaction, then relayed.

A stage never talks to Kafka directly. It calls :func:`enqueue` inside the transaction that
records its result; :class:`Relay` publishes committed rows in id order and marks them
published. A crash between the two publishes the row again later: consumers deduplicate on
the event id.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus.topics import Event
from gateway.logs import error_fields
from gateway.store.db import Database
from gateway.store.tables import outbox

log = structlog.get_logger("brygga.relay")
BATCH = 500


async def enqueue(conn: AsyncConnection, topic: str, key: str, event: Event) -> None:
    await conn.execute(
        outbox.insert().values(
            topic=topic, key=key, payload=event.to_json(), created_at=clock.now()
        )
    )


class Relay:
    """Publishes the outbox. Wakes on every local commit; polls for other processes' rows."""

    def __init__(self, db: Database, producer: AIOKafkaProducer, poll_seconds: float) -> None:
        self.db = db
        self.producer = producer
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        db.on_commit(self._wake.set)
        self.published = 0

    async def run(self) -> None:
        while True:
            try:
                sent = await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database away: retry, never give up
                log.warning("relay.retry", **error_fields(exc))
                await asyncio.sleep(1.0)
                continue
            if sent < BATCH:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                except TimeoutError:
                    pass

    async def publish_once(self) -> int:
        """Publish one batch in id order; mark it published only once the broker has it."""
        async with self.db.transaction() as conn:
            query = (
                select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload)
                .where(outbox.c.published_at.is_(None))
                .order_by(outbox.c.id)
                .limit(BATCH)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update()  # one relay at a time keeps per-key order
            rows = (await conn.execute(query)).all()
            if not rows:
                return 0
            futures = [
                await self.producer.send(r.topic, r.payload.encode(), key=r.key.encode())
                for r in rows
            ]
            await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
            await conn.execute(
                update(outbox)
                .where(outbox.c.id.in_([r.id for r in rows]))
                .values(published_at=clock.now())
            )
        self.published += len(rows)
        return len(rows)
