"""Transactional outbox: events are written in the stage's own transaction, then relayed.

A stage never talks to Kafka directly. It calls :func:`enqueue` inside the transaction that
records its result; :class:`Relay` publishes committed rows in id order and marks them
published. A crash between the two publishes the row again later: consumers deduplicate on
the event id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus.kafka import topic_name
from gateway.bus.topics import Event, seal_record
from gateway.crypto.columns import FieldCipher
from gateway.logs import error_fields
from gateway.store.db import Database
from gateway.store.tables import outbox

log = structlog.get_logger("brygga.relay")
BATCH = 500
GATHER_SECONDS = 0.02


_INSERT = outbox.insert()  # one statement object: SQLAlchemy compiles and caches it once


def outbox_row(topic: str, key: str, event: Event) -> dict[str, Any]:
    """The parameters of one outbox row, for callers that insert many at once."""
    return {"topic": topic, "key": key, "payload": event.to_json(), "created_at": clock.now()}


async def enqueue(conn: AsyncConnection, topic: str, key: str, event: Event) -> None:
    await conn.execute(_INSERT, outbox_row(topic, key, event))


class Relay:
    """Publishes the outbox. Wakes on every local commit; polls for other processes' rows."""

    def __init__(
        self,
        db: Database,
        producer: AIOKafkaProducer,
        poll_seconds: float,
        cipher: FieldCipher,
    ) -> None:
        self.db = db
        self.cipher = cipher
        self.producer = producer
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        db.on_commit(self._wake.set)
        self.published = 0

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                sent = await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database away: retry, never give up
                log.warning("relay.retry", **error_fields(exc))
                await asyncio.sleep(1.0)
                continue
            if sent < BATCH:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                    # Let the commits of the next few milliseconds join this batch: one
                    # relay transaction per commit would cost as much as the commits.
                    await asyncio.sleep(GATHER_SECONDS)
                except TimeoutError:
                    pass

    async def publish_once(self) -> int:
        """Publish one batch in id order; mark it published only once the broker has it.

        PostgreSQL: the rows stay locked (FOR UPDATE) while they are sent, so a second relay
        waits and per-key order holds; inserts by intake are not blocked by row locks.
        SQLite: its one write lock must not be held while waiting for the broker (intake
        would stall), so read, send, then mark; a crash in between only resends.
        """
        if self.db.is_sqlite:
            async with self.db.read() as conn:
                rows = (await conn.execute(_PENDING)).all()
            if rows:
                await self._send(rows)
                async with self.db.transaction() as conn:
                    await _mark(conn, rows)
        else:
            async with self.db.transaction() as conn:
                rows = (await conn.execute(_PENDING.with_for_update())).all()
                if rows:
                    await self._send(rows)
                    await _mark(conn, rows)
        self.published += len(rows)
        return len(rows)

    async def _send(self, rows: Sequence[Row[Any]]) -> None:
        """Send sealed: the outbox row holds the event in the clear (ids and states only)."""
        futures = []
        for r in rows:
            topic = topic_name(r.topic)  # sealed for the topic it travels on
            value = seal_record(self.cipher, topic, r.key, r.payload)
            futures.append(await self.producer.send(topic, value, key=r.key.encode()))
        await asyncio.wait_for(asyncio.gather(*futures), timeout=30)


_PENDING = (
    select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload)
    .where(outbox.c.published_at.is_(None))
    .order_by(outbox.c.id)
    .limit(BATCH)
)


async def _mark(conn: AsyncConnection, rows: Sequence[Row[Any]]) -> None:
    await conn.execute(
        update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(published_at=clock.now())
    )
