"""Drive the pipeline's stages in-process, without Kafka, for service-level tests."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select

from gateway.bus.keys import PatientKeyer
from gateway.bus.topics import Event
from gateway.directory import Directory
from gateway.model.bundle import CanonicalMessage, CareParty, ConsentBasis
from gateway.model.events import LusEvent
from gateway.model.identifiers import parse_identity_number
from gateway.pipeline.channels import ChannelRegistry, InboxChannel
from gateway.pipeline.consent import ConsentStage, accepted_event, permitted_event
from gateway.pipeline.delivery import DeliverStage
from gateway.pipeline.intake import Intake
from gateway.pipeline.routing import RouteStage, RoutingRules, delivery_event
from gateway.runtime import directory_path
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages
from mappings import MAPPINGS_DIR
from tests.support import STOCKHOLM, personnummer

KEYER = PatientKeyer(b"k" * 32)
HOME_CARE = "SE5566778899-HT01"
HOSPITAL = "SE2321000016-H001"


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

    def __init__(self, db: Database) -> None:
        self.db = db
        channels = ChannelRegistry([InboxChannel()])
        self.intake = Intake(db, KEYER)
        self.consent = ConsentStage(db)
        self.route = RouteStage(
            db,
            Directory.load(directory_path(Settings())),
            RoutingRules.load(MAPPINGS_DIR / "routing" / "lus.toml"),
            channels,
        )
        self.deliver = DeliverStage(db, channels)

    async def run(self, message: CanonicalMessage, control_id: str) -> str:
        accepted = await self.intake.accept(
            source="TEST|X",
            control_id=control_id,
            raw=b"raw",
            message=message,
            answer=lambda mid: mid.encode(),
        )
        mid = accepted.message_id
        await self._step(self.consent, accepted_event(mid))
        await self._step(self.route, permitted_event(mid))
        async with self.db.read() as conn:
            ids = (
                (
                    await conn.execute(
                        select(deliveries.c.id).where(
                            deliveries.c.message_id == mid, deliveries.c.state == "routed"
                        )
                    )
                )
                .scalars()
                .all()
            )
        for delivery_id in ids:
            await self._step(self.deliver, delivery_event(mid, delivery_id))
        return mid

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
