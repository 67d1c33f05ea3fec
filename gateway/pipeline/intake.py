"""Intake: store an inbound message and its first event in one transaction, then answer.

The answer (an HL7 ACK, a FHIR response) is built before commit and stored with the message,
so a duplicate (same source and control id) gets exactly the answer the original got, and
the source hears "accepted" only once the message is durable.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway import clock
from gateway.bus import topics
from gateway.bus.keys import PatientKeyer
from gateway.bus.outbox import enqueue
from gateway.model.bundle import CanonicalMessage, to_bundle
from gateway.pipeline.consent import accepted_event
from gateway.store.db import Database
from gateway.store.tables import messages

log = structlog.get_logger("brygga.intake")


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
    answer: bytes
    duplicate: bool


class Intake:
    def __init__(self, db: Database, keyer: PatientKeyer) -> None:
        self.db = db
        self.keyer = keyer

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

        Raises whatever the database raises when it cannot commit: the caller answers with
        a negative acknowledgement and the source resends.
        """
        message_id = str(uuid.uuid4())
        pid = message.primary_id
        patient_key = self.keyer.key(pid.system, pid.value)
        # Versions and cancellations of one stay are linked by the sender's visit number.
        episode_key = (
            self.keyer.key("episode", f"{message.sender_hsa_id}|{message.encounter_id}")
            if message.encounter_id
            else None
        )
        reply = answer(message_id)
        now = clock.now()
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    messages.insert().values(
                        id=message_id,
                        source=source,
                        control_id=control_id,
                        event=message.event.value,
                        patient_key=patient_key,
                        episode_key=episode_key,
                        raw=raw,
                        canonical=json.dumps(to_bundle(message, message_id), ensure_ascii=False),
                        ack=reply,
                        status="accepted",
                        received_at=now,
                        updated_at=now,
                    )
                )
                await enqueue(conn, topics.EVENTS, patient_key, accepted_event(message_id))
        except IntegrityError:
            # Seen before (a resend, or a race on another connection): answer as it was.
            existing = await self._existing(source, control_id)
            if existing:
                return existing
            raise
        log.info("intake.accepted", message_id=message_id, lus_event=message.event.value)
        return Accepted(message_id, reply, duplicate=False)

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
