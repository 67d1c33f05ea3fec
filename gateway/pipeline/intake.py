"""Intake: store an inbound message and its first event in one transaction, then answer.

The answer (an HL7 ACK, a FHIR response) is built before commit and stored with the message,
so a duplicate (same source and control id) gets exactly the answer the original got, and
the source hears "accepted" only once the message is durable.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway import clock
from gateway.bus import topics
from gateway.bus.keys import PatientKeyer
from gateway.bus.outbox import outbox_row
from gateway.model.bundle import DEFAULT_SOURCE_ENDPOINT, CanonicalMessage, bundle_json, to_bundle
from gateway.pipeline.consent import accepted_event
from gateway.store.batch import BatchWriter
from gateway.store.db import Database
from gateway.store.tables import messages

log = structlog.get_logger("brygga.intake")


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
    answer: bytes
    duplicate: bool


@dataclass(slots=True)
class _Pending:
    """One message waiting for the next group commit."""

    row: dict[str, Any]
    event: dict[str, Any]
    future: asyncio.Future[None]


class Intake:
    """Stores inbound messages with group commit.

    Every message is its own unit (its own ACK, its own outcome), but the messages that
    arrive while a commit is in flight are written together in the next transaction: one
    multi-row insert and one fsync for all of them. Nothing waits on purpose, so a lone
    message is written at once; under load the batches grow by themselves. A batch that
    fails is retried one message per transaction, so one bad message (or a resend racing
    its original) never costs the others their ACK.
    """

    MAX_BATCH = 256

    def __init__(
        self, db: Database, keyer: PatientKeyer, source_endpoint: str = DEFAULT_SOURCE_ENDPOINT
    ) -> None:
        self.db = db
        self.keyer = keyer
        self.source_endpoint = source_endpoint  # MessageHeader.source.endpoint of each Bundle
        self._batches = BatchWriter(db)
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None

    async def accept(
        self,
        *,
        source: str,
        control_id: str,
        raw: bytes,
        message: CanonicalMessage,
        answer: Callable[[str], bytes],
    ) -> Accepted:
        """Store the message; ``answer(message_id)`` builds the positive answer to store.

        Returns once the message is committed. Raises whatever the database raised when it
        could not commit: the caller answers with a negative acknowledgement and the source
        resends.
        """
        message_id = str(uuid.uuid4())
        pid = message.primary_id
        patient_key = self.keyer.key(pid.system, pid.value)
        # Versions and cancellations of one stay are linked by the sender's visit number. A
        # referral stands on its own: it is not a version of the stay's planning information,
        # and cancelling a discharge does not withdraw it.
        episode_key = (
            self.keyer.key("episode", f"{message.sender_hsa_id}|{message.encounter_id}")
            if message.encounter_id and message.referral is None
            else None
        )
        reply = answer(message_id)
        now = clock.now()
        row = {
            "id": message_id,
            "source": source,
            "control_id": control_id,
            "event": message.event.value,
            "patient_key": patient_key,
            "episode_key": episode_key,
            "raw": raw,
            "canonical": bundle_json(to_bundle(message, message_id, self.source_endpoint)),
            "ack": reply,
            "status": "accepted",
            "received_at": now,
            "updated_at": now,
        }
        event = outbox_row(topics.EVENTS, patient_key, accepted_event(message_id))
        pending = _Pending(row, event, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queue(), name="intake-writer")
        try:
            await pending.future
        except IntegrityError:
            # Seen before (a resend, or a race on another connection): answer as it was.
            existing = await self._existing(source, control_id)
            if existing:
                return existing
            raise
        log.info("intake.accepted", message_id=message_id, lus_event=message.event.value)
        return Accepted(message_id, reply, duplicate=False)

    async def _write_queue(self) -> None:
        while self._queue:
            batch = self._queue[: self.MAX_BATCH]
            del self._queue[: self.MAX_BATCH]
            try:
                await self._insert(batch)
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0], exc)
                    continue
                for pending in batch:  # find out which one failed; the rest commit
                    try:
                        await self._insert([pending])
                    except Exception as one:
                        _settle(pending, one)
                    else:
                        _settle(pending, None)
                continue
            for pending in batch:
                _settle(pending, None)

    async def _insert(self, batch: list[_Pending]) -> None:
        await self._batches.write([p.row for p in batch], [p.event for p in batch])

    async def _existing(self, source: str, control_id: str) -> Accepted | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(messages.c.id, messages.c.ack).where(
                        messages.c.source == source, messages.c.control_id == control_id
                    )
                )
            ).first()
        if row is None:
            return None
        log.info("intake.duplicate", message_id=row.id)
        return Accepted(row.id, row.ack or b"", duplicate=True)


def _settle(pending: _Pending, error: BaseException | None) -> None:
    """Resolve one message's future, unless its sender already gave up waiting."""
    if pending.future.done():
        return
    if error is None:
        pending.future.set_result(None)
    else:
        pending.future.set_exception(error)
