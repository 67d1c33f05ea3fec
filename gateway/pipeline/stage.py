"""A pipeline stage: a Kafka consumer group whose every effect is exactly-once.

Each record is handled in one database transaction that first claims the event id in
``processed_events``; a duplicate (redelivery, republish by the reconciler) claims nothing
and does nothing. Offsets are committed only after the transaction: a crash replays, the
claim absorbs it. A handler that keeps failing parks the event on ``brygga.deadletter`` so
its partition moves on. A database that is away (restarting, unreachable) is no fault of the
event: the stage waits for it and tries the same record again, counting no attempt; if even
parking fails the stage likewise waits and retries rather than skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from typing import ClassVar

import structlog
from aiokafka.structs import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import kafka, topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event, open_record
from gateway.crypto import columns
from gateway.crypto.columns import FieldCipher
from gateway.crypto.envelope import DecryptionError
from gateway.logs import error_fields
from gateway.store.db import Database
from gateway.store.retry import in_transaction, is_unavailable
from gateway.store.sql import insert_ignore
from gateway.store.tables import processed_events

log = structlog.get_logger("brygga.stage")
STOP_TIMEOUT = 5.0
UNAVAILABLE_FIRST_WAIT = 0.2  # seconds; doubled while the database stays away
UNAVAILABLE_MAX_WAIT = 5.0


class Stage(ABC):
    """Subclasses name their topic and event types and implement ``handle``."""

    name: ClassVar[str]
    topic: ClassVar[str]
    handles: ClassVar[frozenset[str]]

    def __init__(self, db: Database) -> None:
        self.db = db

    @abstractmethod
    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        """Do the stage's work inside ``conn``'s transaction; raise to roll back."""

    def wants(self, event: Event) -> bool:
        """Whether ``event`` can change anything here. One that cannot is skipped before any
        transaction: most receipts the receipts stage reads are not terminal, and a claim
        and commit for each cost more than all the rest of its work."""
        return True

    async def park(  # noqa: B027 - optional hook, not abstract
        self, conn: AsyncConnection, event: Event, key: str, error: str
    ) -> None:
        """Mark the entity behind a poison event as parked. Default: nothing beyond the DLQ."""


class StageRunner:
    def __init__(
        self,
        stage: Stage,
        bootstrap: str,
        *,
        fetch_wait_ms: int,
        max_attempts: int,
        session_timeout_ms: int = 10000,
        cipher: FieldCipher | None = None,
    ) -> None:
        self.session_timeout_ms = session_timeout_ms
        self.cipher = cipher  # None: the process's keyring
        self.stage = stage
        self.bootstrap = bootstrap
        self.fetch_wait_ms = fetch_wait_ms
        self.max_attempts = max_attempts
        self.ready = asyncio.Event()
        self.handled = 0

    async def run(self) -> None:
        """Consume forever; if the consumer itself fails (broker away), start it again."""
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stage.restarting", stage=self.stage.name, **error_fields(exc))
                await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        consumer = kafka.consumer(
            self.bootstrap,
            self.stage.topic,
            kafka.group_id(self.stage.name),
            self.fetch_wait_ms,
            self.session_timeout_ms,
        )
        await consumer.start()
        self.ready.set()
        log.info("stage.started", stage=self.stage.name, topic=self.stage.topic)
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    for record in records:
                        await self._process(record)
                if batch:
                    try:
                        await consumer.commit()
                    except Exception as exc:  # rebalance or broker restart: replay is safe
                        log.info("stage.commit_skipped", stage=self.stage.name, **error_fields(exc))
        finally:
            self.ready.clear()
            # Leaving the group can wait for a broker mid-rebalance; never hold up shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), STOP_TIMEOUT)

    async def _process(self, record: ConsumerRecord) -> None:
        key = record.key.decode() if record.key else ""
        try:
            event = await open_record(
                self.cipher or columns.current(), record.topic, record.key, record.value
            )
        except (DecryptionError, ValueError, KeyError, TypeError) as exc:
            # Not sealed for this topic and key (or not by this gateway): dropped. Work that
            # was really pending is republished by the reconciler from the database.
            log.warning("stage.unreadable_record", stage=self.stage.name, **error_fields(exc))
            return
        if event.type not in self.stage.handles or not self.stage.wants(event):
            return
        while True:
            last = await self._attempts(event, key)
            if last is None:
                self.handled += 1
                return
            try:
                await self._park(event, key, type(last).__name__)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("stage.park_failed", stage=self.stage.name, **error_fields(exc))
                await asyncio.sleep(1.0)

    async def _attempts(self, event: Event, key: str) -> Exception | None:
        """Handle ``event``; None when done, else the last of ``max_attempts`` failures.

        A database that is away (restarting, unreachable) is not the event's fault: the stage
        waits for it, with growing pauses, as long as it takes, and counts no attempt."""
        attempt, away_wait = 0, UNAVAILABLE_FIRST_WAIT
        while True:
            try:
                await self._handle_once(event, key)
                return None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_unavailable(exc):
                    log.warning(
                        "stage.database_unavailable",
                        stage=self.stage.name,
                        event_id=event.id,
                        wait_s=away_wait,
                        **error_fields(exc),
                    )
                    await asyncio.sleep(away_wait)
                    away_wait = min(away_wait * 2, UNAVAILABLE_MAX_WAIT)
                    continue
                attempt += 1
                log.warning(
                    "stage.attempt_failed",
                    stage=self.stage.name,
                    event_id=event.id,
                    attempt=attempt,
                    **error_fields(exc),
                )
                if attempt >= self.max_attempts:
                    return exc
                await asyncio.sleep(0.1 * attempt)

    async def _handle_once(self, event: Event, key: str) -> None:
        """One attempt; a deadlock or serialization failure is retried here, at once, and
        does not count towards parking (the transaction was rolled back whole)."""

        async def handle(conn: AsyncConnection) -> None:
            if await self._claim(conn, event):
                await self.stage.handle(conn, event, key)

        await in_transaction(self.stage.db, handle)

    async def _park(self, event: Event, key: str, error: str) -> None:
        parked = await in_transaction(
            self.stage.db, lambda conn: self._park_in(conn, event, key, error)
        )
        if parked:
            log.error("stage.parked", stage=self.stage.name, event_id=event.id, error=error)

    async def _park_in(self, conn: AsyncConnection, event: Event, key: str, error: str) -> bool:
        if not await self._claim(conn, event):
            return False
        await self.stage.park(conn, event, key, error)
        await enqueue(
            conn,
            topics.DEADLETTER,
            key,
            Event(
                id=f"parked:{self.stage.name}:{event.id}",
                type="event.parked",
                message_id=event.message_id,
                delivery_id=event.delivery_id,
                data={"stage": self.stage.name, "event_id": event.id, "error": error},
            ),
        )
        return True

    async def _claim(self, conn: AsyncConnection, event: Event) -> bool:
        return await insert_ignore(
            conn,
            processed_events,
            {"consumer": self.stage.name, "event_id": event.id, "processed_at": clock.now()},
        )
