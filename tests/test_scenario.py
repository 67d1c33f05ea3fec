"""One care episode, six recipients, three weeks of December, on real sockets and the database.

The listed clinic's FHIR endpoint is down (resends, then its HL7 v2 endpoint, also down, then
the inbox), needs assessment answers over FHIR (once only later, so a resend is shown once),
the SÄBO nurse's system takes HL7 v2, day home care and rehab read and acknowledge in the
inbox, and the night home-care provider never reads (escalation to the on-call unit, the MAS
and the ward, and one deviation per late notice). The discharge date moves twice; a weekend,
julafton and juldagen fall inside the clocks. Time is the injectable clock; the stand-in
receivers are real HTTP and MLLP servers (tests/standins.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from adapters.fhir.channel import FhirMessagingChannel
from adapters.hl7v2.channel import Hl7v2MllpChannel
from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.clock import STOCKHOLM
from gateway.directory import Directory, Endpoint, Hours, Municipality, Organisation
from gateway.model.bundle import CanonicalMessage, CareParty, ConsentBasis
from gateway.model.events import LusEvent
from gateway.model.identifiers import parse_identity_number
from gateway.pipeline import clocks
from gateway.pipeline.channels import ChannelRegistry, InboxChannel
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, deviations, lus_clocks, messages
from tests.conftest import FixedClock
from tests.inprocess import KEYER, Pipeline
from tests.standins import FhirReceiver, MllpReceiver, response_bundle
from tests.support import personnummer

pytestmark = pytest.mark.slow

WARD = "SE2321000016-H001"
CLINIC = "SE2321000016-V010"
BISTAND = "SE2120001637-B020"
DAY = "SE5566778899-HT01"
NIGHT = "SE5561234567-HT02"
SABO = "SE2120001637-S030"
REHAB = "SE2321000016-R040"
ON_CALL = "SE2120001637-J001"
MAS = "SE2120001637-M001"
SIX = (CLINIC, BISTAND, DAY, NIGHT, SABO, REHAB)
ROLES = {BISTAND: "bistand", DAY: "hemtjanst", NIGHT: "hemtjanst-natt", SABO: "sabo"}
ROLES[REHAB] = "rehab"


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=STOCKHOLM)


class Receivers:
    def __init__(self) -> None:
        self.clinic_fhir = FhirReceiver().start()
        self.clinic_hl7 = MllpReceiver().start()
        self.bistand = FhirReceiver().start()
        self.sabo = MllpReceiver().start()

    def stop(self) -> None:
        for r in (self.clinic_fhir, self.clinic_hl7, self.bistand, self.sabo):
            r.stop()


def directory(r: Receivers) -> Directory:
    day_hours = (Hours(frozenset(range(5)), time(8), time(17)),)
    return Directory(
        [
            Organisation(WARD, "Södersjukhuset, Geriatrik avd 51", "hospital", "0180"),
            Organisation(
                CLINIC,
                "Vårdcentral Skärholmen",
                "primary-care",
                "0180",
                (
                    Endpoint("fhir", r.clinic_fhir.url),
                    Endpoint("hl7v2", r.clinic_hl7.address),
                    Endpoint("inbox"),
                ),
                hours=day_hours,  # office hours: its receipt clock counts weekday hours
            ),
            Organisation(
                BISTAND,
                "Biståndsenheten Skärholmen",
                "needs-assessment",
                "0180",
                (Endpoint("fhir", r.bistand.url),),
                "Skärholmen",
                day_hours,
                ON_CALL,
            ),
            Organisation(  # day home care: staffed 07-22 every day, so weekday-hour clocks
                DAY,
                "Omsorgshuset Hemtjänst AB",
                "home-care",
                "0180",
                district="Skärholmen",
                hours=(Hours(frozenset(range(7)), time(7), time(22), holidays=True),),
            ),
            Organisation(
                NIGHT,
                "Nattpatrullen Söder",
                "home-care-night",
                "0180",
                district="Skärholmen",
                on_call=ON_CALL,
            ),
            Organisation(
                SABO,
                "Bäckgårdens vård- och omsorgsboende",
                "sabo",
                "0180",
                (Endpoint("hl7v2", r.sabo.address),),
                "Skärholmen",
            ),
            Organisation(REHAB, "Primärvårdsrehab Skärholmen", "rehab", "0180"),
            Organisation(ON_CALL, "Trygghetsjouren", "on-call", "0180"),
            Organisation(MAS, "MAS Stockholms stad", "municipal-health-care", "0180"),
        ],
        [Municipality("0180", "Stockholm", mas=MAS, deviations=MAS)],
    )


def message(event: LusEvent, when: datetime, **extra: Any) -> CanonicalMessage:
    return CanonicalMessage(
        event=event,
        occurred_at=when,
        encounter_id="VB-2026-4711",
        sender_hsa_id=WARD,
        sender_name="Södersjukhuset, Geriatrik avd 51",
        patient_ids=[parse_identity_number(personnummer(4711))],
        family="Tolvansson",
        given="Tolvan",
        admitted_at=at(18, 11),
        listed_clinic=CareParty("listed-clinic", CLINIC, "Vårdcentral Skärholmen"),
        care_parties=[CareParty(role, hsa, "") for hsa, role in ROLES.items()],
        consent=ConsentBasis("samtycke", at(18, 11)),
        **extra,
    )


class Episode:
    def __init__(
        self, db: Database, clock: FixedClock, client: httpx.AsyncClient, keys: TokenKeys
    ) -> None:
        self.receivers = Receivers()
        channels = ChannelRegistry([FhirMessagingChannel(), Hl7v2MllpChannel(), InboxChannel()])
        self.pipeline = Pipeline(db, channels, directory(self.receivers))
        self.db, self.clock, self.client, self.keys = db, clock, client, keys
        self.sent: dict[str, str] = {}  # name -> message id

    async def send(self, name: str, event: LusEvent, when: datetime, **extra: Any) -> str:
        await self.advance(when)
        mid = await self.pipeline.run(message(event, when, **extra), name)
        self.sent[name] = mid
        return mid

    async def advance(self, to: datetime) -> None:
        """Move the clock to ``to``, running the follow-up at every moment it has work."""
        for _ in range(1000):
            async with self.db.read() as conn:
                nxt = (
                    await conn.execute(
                        select(func.min(deliveries.c.next_check_at)).where(
                            deliveries.c.next_check_at <= to
                        )
                    )
                ).scalar_one()
            if nxt is None:
                break
            self.clock.at = max(self.clock.at, nxt)
            await self.pipeline.follow_up()
        self.clock.at = to

    def auth(self, org: str, role: str = "staff") -> dict[str, str]:
        token = self.keys.issue(org, role, "Anna Svensson", "Undersköterska")
        return {"Authorization": "Bearer " + token}

    async def delivery(self, name: str, org: str) -> Any:
        async with self.db.read() as conn:
            return (
                await conn.execute(
                    select(deliveries).where(
                        deliveries.c.message_id == self.sent[name],
                        deliveries.c.recipient_hsa_id == org,
                    )
                )
            ).one()

    async def acknowledge(self, name: str, org: str, when: datetime) -> None:
        await self.advance(when)
        d = await self.delivery(name, org)
        opened = await self.client.get(f"/api/v1/inbox/{d.id}", headers=self.auth(org))
        assert opened.status_code == 200, opened.text
        r = await self.client.post(
            f"/api/v1/inbox/{d.id}/acknowledge",
            headers=self.auth(org),
        )
        assert r.status_code == 200, r.text

    async def attempts(self, name: str, org: str) -> list[tuple[str, int, str, datetime]]:
        d = await self.delivery(name, org)
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(delivery_attempts)
                    .where(delivery_attempts.c.delivery_id == d.id)
                    .order_by(delivery_attempts.c.id)
                )
            ).all()
        return [(a.channel, a.attempt, a.outcome, a.at.astimezone(STOCKHOLM)) for a in rows]


@pytest.fixture
async def episode(db: Database, fixed_clock: FixedClock, tmp_path: Path) -> AsyncIterator[Episode]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    fixed_clock.at = at(18, 13)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        e = Episode(db, fixed_clock, client, keys)
        try:
            yield e
        finally:
            e.receivers.stop()


async def test_a_care_episode_with_six_recipients(episode: Episode) -> None:
    e, r = episode, episode.receivers
    r.clinic_fhir.down = r.clinic_hl7.down = True

    # Friday 14:00: the admission notice. The clinic's FHIR endpoint is down: two resends,
    # then HL7 v2 (down too), then the inbox, where someone acknowledges it on Monday.
    await e.send("inskrivning", LusEvent.INSKRIVNINGSMEDDELANDE, at(18, 14))
    await e.advance(at(18, 18))
    assert [
        (c, n, o, t.strftime("%H:%M")) for c, n, o, t in await e.attempts("inskrivning", CLINIC)
    ] == [
        ("fhir", 1, "unavailable", "14:00"),
        ("fhir", 2, "unavailable", "14:30"),
        ("fhir", 3, "unavailable", "15:00"),
        ("fhir", 3, "fallback", "15:30"),
        ("hl7v2", 1, "unavailable", "15:30"),
        ("hl7v2", 2, "unavailable", "16:00"),
        ("hl7v2", 3, "unavailable", "16:30"),
        ("hl7v2", 3, "fallback", "17:00"),
        ("inbox", 1, "delivered", "17:00"),
    ]
    clinic = await e.delivery("inskrivning", CLINIC)
    # 24 hours counted on weekdays from Friday 14:00: Monday 14:00.
    assert clinic.due_at == at(21, 14) and clinic.state == "delivered"
    r.clinic_fhir.down = r.clinic_hl7.down = False  # back for the rest of the stay
    await e.acknowledge("inskrivning", CLINIC, at(21, 9))
    assert (await e.delivery("inskrivning", BISTAND)).state == "received"
    # Its system's receipt proves delivery only: the admission notice needs a person's
    # kvittens (decision 0019), which its system sends back on Monday (a KVITTENS message,
    # as the return path records it).
    await e.advance(at(21, 9, 30))
    async with e.db.transaction() as conn:
        episode = (
            await conn.execute(
                select(messages.c.episode_key).where(messages.c.id == e.sent["inskrivning"])
            )
        ).scalar_one()
        await clocks.person_kvittens(conn, episode, BISTAND, at(21, 9, 30))
    assert (await e.delivery("inskrivning", BISTAND)).state == "acknowledged"
    assert (await e.delivery("inskrivning", NIGHT)).for_information  # no receipt owed

    # The planning information, and the discharge date moving twice (28th, 23rd, 29th).
    for name, when, planned in (
        ("planering-1", at(21, 10), at(28, 10)),
        ("planering-2", at(21, 15), at(23, 10)),
        ("planering-3", at(22, 9), at(29, 10)),
    ):
        await e.send(name, LusEvent.PLANERINGSUNDERLAG, when, expected_discharge=planned)
        for org in (DAY, REHAB):
            await e.acknowledge(name, org, when + timedelta(hours=1))
    for name in ("planering-1", "planering-2"):  # superseded: reached all six, not chased
        olds = [await e.delivery(name, org) for org in SIX]
        assert all(d.superseded_by for d in olds) and all(d.escalation_level == 0 for d in olds)

    # Tuesday 11:00 ready for discharge: the SIP clock runs to the end of Friday 25th
    # (julafton and juldagen inside it). Needs assessment's system answers 202 this time,
    # and only later: it is resent after 30 minutes and shown once.
    r.bistand.asynchronous = True
    await e.send("klar", LusEvent.UTSKRIVNINGSKLAR, at(22, 11), ready_at=at(22, 10, 45))
    await e.advance(at(22, 11, 45))
    assert len(r.bistand.received) - len(r.bistand.shown) == 1  # the resend, recognised
    klar = await e.delivery("klar", BISTAND)
    answer = response_bundle(klar.id, "ok", sender_hsa_id=BISTAND, event_code="utskrivningsklar")
    posted = await e.client.post(
        "/fhir/$process-message", json=answer, headers=e.auth(BISTAND, "integration")
    )
    assert posted.status_code == 200, posted.text
    r.bistand.asynchronous = False
    for org in (DAY, REHAB):
        await e.acknowledge("klar", org, at(22, 13))

    # Wednesday: the SIP invitation. Its receipt clock skips julafton, juldagen and the
    # weekend: due Monday 28th 10:00.
    await e.send("sip", LusEvent.KALLELSE_SIP, at(23, 10))
    assert (await e.delivery("sip", DAY)).due_at == at(28, 10)
    for org in (DAY, REHAB):
        await e.acknowledge("sip", org, at(23, 11))

    # Tuesday 29th: discharged.
    await e.send(
        "utskrivning",
        LusEvent.UTSKRIVNINGSMEDDELANDE,
        at(29, 10),
        discharged_at=at(29, 10),
        encounter_status="finished",
    )
    for org in (DAY, REHAB):
        await e.acknowledge("utskrivning", org, at(29, 12))
    await e.advance(at(31, 23))

    # --- the ledger: every recipient of every current notice, and how it ended ---
    final = {}
    for name in ("inskrivning", "planering-3", "klar", "sip", "utskrivning"):
        final[name] = {org: (await e.delivery(name, org)).state for org in SIX}
    want = {CLINIC: "received", BISTAND: "received", SABO: "received", NIGHT: "delivered"}
    want |= {DAY: "acknowledged", REHAB: "acknowledged"}
    for name in ("planering-3", "klar", "sip", "utskrivning"):
        assert final[name] == want, name
    assert final["inskrivning"][CLINIC] == "acknowledged"
    # The night provider never read anything: each notice it owed a receipt for went up the
    # chain (on-call, MAS, the ward: each got the message) and raised one deviation.
    late = ("planering-3", "klar", "sip", "utskrivning")
    for name in late:
        night = await e.delivery(name, NIGHT)
        assert night.escalation_level == 3, name
        for target in (ON_CALL, MAS, WARD):
            up = await e.delivery(name, target)
            assert (up.role, up.escalated_from) == ("eskalering", night.id)
    async with e.db.read() as conn:
        raised = (await conn.execute(select(deviations))).all()
    receipts_missed = [d for d in raised if d.kind == "missed-receipt"]
    assert sorted((d.kind, d.responsible_hsa_id, d.status) for d in receipts_missed) == [
        ("missed-receipt", MAS, "open")
    ] * len(late)
    async with e.db.read() as conn:
        clock_rows = (await conn.execute(select(lus_clocks))).all()
    # The routine's own clocks (decision 0019): the notice came within 24 h of admission, the
    # SIP invitation within 3 days; no fast vårdkontakt was named, the discharge information
    # came on the day of discharge (due 12:00 the weekday before), and home care has not
    # reported its start (due in January).
    assert sorted((c.rule, c.status, c.responsible_hsa_id) for c in clock_rows) == [
        ("fast-vardkontakt", "late", CLINIC),
        ("hemtjanst-start", "running", DAY),
        ("inskrivningsmeddelande", "met", WARD),
        ("kallelse-sip", "met", CLINIC),
        ("utskrivningsinformation", "late", WARD),
    ]
    assert sorted((d.kind, d.responsible_hsa_id) for d in raised if d not in receipts_missed) == [
        ("missed-deadline", WARD),
        ("missed-deadline", CLINIC),
    ]
    # Seven messages; the SÄBO system and needs assessment showed each once, resent or not.
    assert (len(r.sabo.received), len(r.sabo.shown)) == (7, 7)
    assert (len(r.bistand.received), len(r.bistand.shown)) == (8, 7)
    assert len(r.clinic_fhir.shown) == 6  # the admission went by the inbox

    # --- the statistics of December ---
    stats = await e.client.get("/api/v1/stats?month=2026-12", headers=e.auth(MAS, "ops"))
    assert stats.status_code == 200, stats.text
    groups = {g["district"]: g for g in stats.json()["groups"]}
    assert set(groups) == {None, "Skärholmen"}
    # Skärholmen: needs assessment 5 receipts owed (system receipts), SÄBO 4, day home care 4
    # (kvittens), night 4, all late. The rest of 0180: the clinic 5 (a kvittens for the
    # admission, then system receipts), rehab 4; the escalations owe none.
    assert groups["Skärholmen"] == {
        "municipality": "0180",
        "district": "Skärholmen",
        "notices_acknowledged_in_time": {"in_time": 13, "due": 17, "pending": 0, "share": 0.7647},
        "minutes_to_read": {"read": 6, "median": 60.0},
        "sip_invited_within_3_days": {"in_time": 1, "stays": 1, "pending": 0, "share": 1.0},
        # Ready Tuesday 22nd, discharged Tuesday 29th: 8 calendar days, day 0 included.
        "days_ready_to_discharge": {
            "stays": 1,
            "days": 8,
            "average": 8.0,
            "exempt_no_sip": {"stays": 0, "days": 0, "average": None},
            "payable": {"stays": 1, "days": 8, "average": 8.0},
        },
        "deliveries_by_channel": {"fhir": 7, "hl7v2": 7, "inbox": 14},
        "fallbacks": 0,
        "escalations": 12,  # four late notices, three steps each
        "on_call_at_once": 0,
        "deviations": {"open": 5, "answered": 0},  # and the late discharge information
        "clocks": {
            "inskrivningsmeddelande": {
                "in_time": 1,
                "late": 0,
                "due": 1,
                "pending": 0,
                "share": 1.0,
            },
            "utskrivningsinformation": {
                "in_time": 0,
                "late": 1,
                "due": 1,
                "pending": 0,
                "share": 0.0,
            },
        },
    }
    assert groups[None] == {
        "municipality": "0180",
        "district": None,
        "notices_acknowledged_in_time": {"in_time": 9, "due": 9, "pending": 0, "share": 1.0},
        "minutes_to_read": {"read": 7, "median": 60.0},
        "sip_invited_within_3_days": {"in_time": 0, "stays": 0, "pending": 0, "share": None},
        "days_ready_to_discharge": {
            "stays": 0,
            "days": 0,
            "average": None,
            "exempt_no_sip": {"stays": 0, "days": 0, "average": None},
            "payable": {"stays": 0, "days": 0, "average": None},
        },
        # The clinic's six by FHIR; the inbox: its admission, rehab's 7, and the 12
        # escalation notices to the on-call unit, the MAS and the ward.
        "deliveries_by_channel": {"fhir": 6, "inbox": 20},
        "fallbacks": 2,  # the admission: FHIR to HL7 v2, HL7 v2 to the inbox
        "escalations": 0,
        "on_call_at_once": 0,
        "deviations": {"open": 1, "answered": 0},  # the clinic's fast vårdkontakt, late
        "clocks": {
            "fast-vardkontakt": {"in_time": 0, "late": 1, "due": 1, "pending": 0, "share": 0.0},
            "kallelse-sip": {"in_time": 1, "late": 0, "due": 1, "pending": 0, "share": 1.0},
        },
    }
