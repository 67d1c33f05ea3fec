"""Drive the pipeline's stages in-process, without Kafka, for service-level tests."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from gateway.bus.keys import PatientKeyer
from gateway.bus.topics import DELIVERIES, Event
from gateway.directory import Directory
from gateway.model.bundle import CanonicalMessage, CareParty, ConsentBasis
from gateway.model.events import LusEvent
from gateway.model.identifiers import parse_identity_number
from gateway.pipeline.channels import ChannelRegistry, InboxChannel
from gateway.pipeline.consent import ConsentStage, accepted_event, permitted_event
from gateway.pipeline.deadlines import DEADLINES_FILE, Deadlines
from gateway.pipeline.delivery import DeliverStage
from gateway.pipeline.escalation import Escalator
from gateway.pipeline.followup import FollowUp, Policy
from gateway.pipeline.gate import delivery_event
from gateway.pipeline.intake import Intake
from gateway.pipeline.returns import RETURNS_FILE
from gateway.pipeline.routing import RouteStage, RoutingRules
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, outbox
from mappings import MAPPINGS_DIR
from tests.support import STOCKHOLM, personnummer

KEYER = PatientKeyer(b"k" * 32)
HOME_CARE = "SE5566778899-HT01"
NIGHT = "SE5561234567-HT02"
REHAB = "SE2321000016-R040"
HOSPITAL = "SE2321000016-H001"


def parties(*hsa: str) -> list[CareParty]:
    """Care parties of the demo directory, each with its routing role."""
    roles = {HOME_CARE: "hemtjanst", NIGHT: "hemtjanst-natt", REHAB: "rehab"}
    return [CareParty(roles[h], h) for h in hsa]


def canonical(
    n: int = 1,
    *,
    consent: str | None = "samtycke",
    protected: bool = False,
    family: str = "Tolvansson",
    event: LusEvent = LusEvent.INSKRIVNINGSMEDDELANDE,
    encounter_id: str = "",
    parties: list[CareParty] | None = None,
) -> CanonicalMessage:
    at = datetime(2026, 11, 23, 9, 30, tzinfo=STOCKHOLM)
    return CanonicalMessage(
        event=event,
        occurred_at=at,
        encounter_id=encounter_id,
        sender_hsa_id=HOSPITAL,
        sender_name="Södersjukhuset",
        patient_ids=[parse_identity_number(personnummer(n))],
        family=family,
        given="Tolvan",
        protected_identity=protected,
        admitted_at=at,
        listed_clinic=CareParty("listed-clinic", "SE2321000016-V010", "VC"),
        care_parties=parties
        if parties is not None
        else [
            CareParty("hemtjanst", HOME_CARE, "HT"),
            CareParty("rehab", "SE9999999999-NONE", "Okänd rehab"),
        ],
        consent=ConsentBasis(consent, at) if consent else None,
    )


class Pipeline:
    """The stages wired as in runtime.py, called directly instead of through Kafka."""

    def __init__(
        self,
        db: Database,
        channels: ChannelRegistry | None = None,
        directory: Directory | None = None,
    ) -> None:
        self.db = db
        channels = channels or ChannelRegistry([InboxChannel()])
        directory = directory or Directory.load(directory_path(Settings()))
        deadlines = Deadlines.load(DEADLINES_FILE)
        self.intake = Intake(db, KEYER)
        self.consent = ConsentStage(db)
        self.route = RouteStage(
            db,
            directory,
            RoutingRules.load(MAPPINGS_DIR / "routing" / "lus.toml", RETURNS_FILE),
            channels,
            KEYER,
            deadlines,
        )
        self.deliver = DeliverStage(db, channels, directory)
        self.followup = FollowUp(
            db,
            channels,
            Escalator(directory, channels, deadlines.escalation),
            Policy(escalation=deadlines.escalation),
        )
        self._seen_outbox = 0

    async def follow_up(self) -> int:
        """One round of follow-up, then every delivery it asked for (resends, fallbacks,
        escalations), as the deliver stage would take them from Kafka."""
        acted = await self.followup.run_once()
        await self.drain()
        return acted

    async def drain(self) -> None:
        """Hand the outbox's new ``delivery.requested`` events to the deliver stage."""
        while True:
            async with self.db.read() as conn:
                rows = (
                    await conn.execute(
                        select(outbox.c.id, outbox.c.payload)
                        .where(outbox.c.id > self._seen_outbox, outbox.c.topic == DELIVERIES)
                        .order_by(outbox.c.id)
                    )
                ).all()
            if not rows:
                return
            for r in rows:
                self._seen_outbox = max(self._seen_outbox, r.id)
                await self._step(self.deliver, Event.from_json(r.payload))

    async def run(self, message: CanonicalMessage, control_id: str) -> str:
        """Intake, consent, routing and delivery of one message."""
        mid = await self.route_message(message, control_id)
        await self.deliver_routed(mid)
        return mid

    async def route_message(self, message: CanonicalMessage, control_id: str) -> str:
        """Intake, consent and routing only: deliveries stop in routed, held or denied."""
        accepted = await self.intake.accept(
            source="TEST|X",
            control_id=control_id,
            raw=b"raw",
            message=message,
            answer=lambda mid: mid.encode(),
        )
        mid = accepted.message_id
        await self.route_accepted(mid)
        async with self.db.read() as conn:  # its deliveries are run by deliver_routed
            self._seen_outbox = (
                await conn.execute(select(func.max(outbox.c.id)))
            ).scalar_one() or 0
        return mid

    async def route_accepted(self, message_id: str) -> None:
        """Consent and routing of a message intake has stored."""
        await self._step(self.consent, accepted_event(message_id))
        await self._step(self.route, permitted_event(message_id))

    async def deliver_routed(self, message_id: str) -> list[str]:
        """Run the delivery stage for the message's deliveries waiting in ``routed``."""
        async with self.db.read() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(deliveries.c.id).where(
                            deliveries.c.message_id == message_id, deliveries.c.state == "routed"
                        )
                    )
                ).scalars()
            )
        for delivery_id in ids:
            await self._step(self.deliver, delivery_event(message_id, delivery_id))
        return ids

    async def states(self, message_id: str) -> dict[str, str]:
        """recipient HSA-id -> delivery state."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(deliveries.c.recipient_hsa_id, deliveries.c.state).where(
                        deliveries.c.message_id == message_id
                    )
                )
            ).all()
        return {r.recipient_hsa_id: r.state for r in rows}

    async def _step(self, stage: Any, event: Event) -> None:
        async with self.db.transaction() as conn:
            key = (
                await conn.execute(
                    select(messages.c.patient_key).where(messages.c.id == event.message_id)
                )
            ).scalar_one()
            await stage.handle(conn, event, key)

    async def status(self, message_id: str) -> str:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(messages.c.status, messages.c.canonical).where(
                        messages.c.id == message_id
                    )
                )
            ).one()
        assert json.loads(row.canonical)["type"] == "message"
        return str(row.status)
