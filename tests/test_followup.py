"""Follow-up: resends, fallback to the next channel, escalation at the deadline, deviations.

The pipeline runs in-process against the real database; time is the injectable clock, moved
by the test. The channels here are scripted stand-ins at the channel seam (the real FHIR and
HL7 v2 channels over sockets are covered in test_channels.py and the scenario test).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.directory import Directory, Endpoint, Hours, Municipality, Organisation
from gateway.model.bundle import (
    Attachment,
    CareParty,
    Coding,
    Document,
    MedicationEntry,
    resolve,
    resources_by_ref,
)
from gateway.model.events import LusEvent
from gateway.pipeline import views
from gateway.pipeline.channels import (
    ChannelRegistry,
    ChannelRejected,
    ChannelUnavailable,
    DeliveryContext,
    InboxChannel,
    Outcome,
)
from gateway.pipeline.deadlines import Escalation
from gateway.pipeline.followup import Action, Plan, Policy, Situation, plan
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, deviations
from tests.conftest import FixedClock
from tests.inprocess import HOME_CARE, HOSPITAL, KEYER, Pipeline, canonical

ATC = "http://www.whocc.no/atc"
CLINIC = "SE2321000016-V010"
ON_CALL = "SE2120001637-J001"
MAS = "SE2120001637-M001"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # Monday 09:00 in Stockholm


class Scripted:
    """A system channel at the seam: answers each send with the next scripted reply."""

    protected_identity = True
    application_receipts = True

    def __init__(self, name: str, *replies: State | Exception) -> None:
        self.name = name
        self.replies = list(replies)
        self.sent: list[DeliveryContext] = []

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        self.sent.append(ctx)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return Outcome(reply, "svar")


def directory(clinic: tuple[Endpoint, ...]) -> Directory:
    return Directory(
        [
            Organisation(HOSPITAL, "Geriatrik avd 51", "hospital", "0180"),
            Organisation(CLINIC, "Vårdcentral Skärholmen", "primary-care", "0180", clinic),
            Organisation(
                HOME_CARE,
                "Omsorgshuset Hemtjänst AB",
                "home-care",
                "0180",
                district="Skärholmen",
                hours=(Hours(frozenset(range(5)), *_hours("07:00", "22:00")),),
                on_call=ON_CALL,
            ),
            Organisation(ON_CALL, "Trygghetsjouren", "on-call", "0180"),
            Organisation(MAS, "MAS Stockholms stad", "municipal-health-care", "0180"),
        ],
        [Municipality("0180", "Stockholm", mas=MAS, deviations=MAS)],
    )


def _hours(opens: str, closes: str) -> tuple[Any, Any]:
    from datetime import time

    return time.fromisoformat(opens), time.fromisoformat(closes)


def planning(n: int, consent: str | None = "samtycke") -> Any:
    """Planning information: every party must receipt it (24 weekday hours)."""
    return canonical(
        n,
        event=LusEvent.PLANERINGSUNDERLAG,
        consent=consent,
        parties=[CareParty("hemtjanst", HOME_CARE, "HT")],
    )


async def rows(db: Database, message_id: str) -> dict[str, Any]:
    async with db.read() as conn:
        found = (
            await conn.execute(select(deliveries).where(deliveries.c.message_id == message_id))
        ).all()
    return {r.recipient_hsa_id: r for r in found}


async def attempts(db: Database, delivery_id: str) -> list[tuple[str, int, str]]:
    async with db.read() as conn:
        found = (
            await conn.execute(
                select(
                    delivery_attempts.c.channel,
                    delivery_attempts.c.attempt,
                    delivery_attempts.c.outcome,
                )
                .where(delivery_attempts.c.delivery_id == delivery_id)
                .order_by(delivery_attempts.c.id)
            )
        ).all()
    return [tuple(r) for r in found]  # type: ignore[misc]


async def open_deviations(db: Database) -> list[Any]:
    async with db.read() as conn:
        return list((await conn.execute(select(deviations))).all())


async def test_resends_then_falls_back_to_the_next_channel(
    db: Database, fixed_clock: FixedClock
) -> None:
    fhir = Scripted("fhir", ChannelUnavailable("HTTP 503 från mottagaren"))
    hl7 = Scripted("hl7v2", State.RECEIVED)
    clinic = (Endpoint("fhir", "http://vc.example/fhir"), Endpoint("hl7v2", "vc.example:2575"))
    pipeline = Pipeline(db, ChannelRegistry([fhir, hl7, InboxChannel()]), directory(clinic))
    mid = await pipeline.run(planning(501), "F-1")
    first = (await rows(db, mid))[CLINIC]
    assert first.state == "routed" and first.channel == "fhir"

    fixed_clock.at = T0 + timedelta(minutes=29)  # not yet: nothing to do
    assert await pipeline.follow_up() == 0
    for minutes in (30, 60):  # two resends, 30 minutes apart
        fixed_clock.at = T0 + timedelta(minutes=minutes)
        assert await pipeline.follow_up() == 1
    fixed_clock.at = T0 + timedelta(minutes=90)  # the third failure: fall back to HL7 v2
    await pipeline.follow_up()

    done = (await rows(db, mid))[CLINIC]
    assert (done.state, done.channel, done.next_check_at) == ("received", "hl7v2", None)
    assert await attempts(db, done.id) == [
        ("fhir", 1, "unavailable"),
        ("fhir", 2, "unavailable"),
        ("fhir", 3, "unavailable"),
        ("fhir", 3, "fallback"),
        ("hl7v2", 1, "received"),
    ]
    # Every send carried the same dedup key, so a receiver shows a resend once.
    assert {c.dedup_key for c in fhir.sent + hl7.sent} == {done.id}
    assert [c.attempt for c in fhir.sent] == [1, 2, 3]
    async with db.read() as conn:  # operations see every send in the ledger
        ledger = await views.message_ledger(conn, mid)
    assert ledger
    shown = next(d for d in ledger["deliveries"] if d["delivery_id"] == done.id)
    assert [(a["channel"], a["outcome"]) for a in shown["attempts"]][-2:] == [
        ("fhir", "fallback"),
        ("hl7v2", "received"),
    ]
    assert shown["due"]["rule"] == "kvittens" and shown["receipts"][-1]["state"] == "received"
    fixed_clock.at = T0 + timedelta(days=3)  # receipted: it never escalates
    await pipeline.follow_up()
    assert (await rows(db, mid))[CLINIC].escalation_level == 0


async def test_a_rejected_message_falls_back_at_once(db: Database, fixed_clock: FixedClock) -> None:
    fhir = Scripted("fhir", ChannelRejected("fatal-error: okänd mottagare"))
    clinic = (Endpoint("fhir", "http://vc.example/fhir"), Endpoint("inbox"))
    pipeline = Pipeline(db, ChannelRegistry([fhir, InboxChannel()]), directory(clinic))
    mid = await pipeline.run(planning(502), "F-2")
    await pipeline.follow_up()  # the same minute: no resend of what was refused
    done = (await rows(db, mid))[CLINIC]
    assert (done.state, done.channel) == ("delivered", "inbox")
    assert [a[2] for a in await attempts(db, done.id)] == ["rejected", "fallback", "delivered"]
    assert len(fhir.sent) == 1


async def test_no_channel_left_fails_and_raises_a_deviation(
    db: Database, fixed_clock: FixedClock
) -> None:
    fhir = Scripted("fhir", ChannelUnavailable("anslutning vägrad"))
    pipeline = Pipeline(
        db, ChannelRegistry([fhir, InboxChannel()]), directory((Endpoint("fhir", "http://x"),))
    )
    mid = await pipeline.run(planning(503), "F-3")
    for minutes in (30, 60, 90):
        fixed_clock.at = T0 + timedelta(minutes=minutes)
        await pipeline.follow_up()
    failed = (await rows(db, mid))[CLINIC]
    assert failed.state == "failed" and failed.escalation_level >= 1
    raised = [d for d in await open_deviations(db) if d.delivery_id == failed.id]
    # The clinic belongs to no municipal deviation inbox here: its municipality's is used.
    assert [(d.kind, d.responsible_hsa_id) for d in raised] == [("delivery-failed", MAS)]
    assert "503" not in raised[0].summary and "Tolvan" not in raised[0].summary


@pytest.fixture
async def api(db: Database, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TokenKeys]]:
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, keys


def bearer(keys: TokenKeys, org: str, role: str = "staff") -> dict[str, str]:
    return {"Authorization": "Bearer " + keys.issue(org, role, "Maria Larsson", "MAS")}


async def test_an_unread_notice_escalates_step_by_step_and_raises_one_deviation(
    db: Database, fixed_clock: FixedClock, api: tuple[httpx.AsyncClient, TokenKeys]
) -> None:
    client, keys = api
    clinic = (Endpoint("fhir", "http://vc.example/fhir"),)
    channels = ChannelRegistry([Scripted("fhir", State.RECEIVED), InboxChannel()])
    pipeline = Pipeline(db, channels, directory(clinic))
    mid = await pipeline.run(planning(504), "F-4")
    home = (await rows(db, mid))[HOME_CARE]
    # 24 hours counted on weekdays from Monday 09:00: Tuesday 09:00.
    assert home.due_at == T0 + timedelta(days=1) and home.due_rule == "kvittens"
    assert home.state == "delivered" and home.next_check_at == home.due_at

    fixed_clock.at = T0 + timedelta(days=1) - timedelta(seconds=1)
    assert await pipeline.follow_up() == 0
    steps = [(0, ON_CALL), (4, MAS), (8, HOSPITAL)]
    for hours, target in steps:
        fixed_clock.at = T0 + timedelta(days=1, hours=hours)
        await pipeline.follow_up()
        now = await rows(db, mid)
        assert now[target].role == "eskalering" and now[target].escalated_from == home.id
        assert now[target].state == "delivered" and now[target].due_at is None  # no cascade
    assert (await rows(db, mid))[HOME_CARE].escalation_level == 3
    fixed_clock.at = T0 + timedelta(days=3)
    await pipeline.follow_up()  # the chain is done: nobody more is told
    assert len(await rows(db, mid)) == 5  # clinic, home care, on-call, MAS, ward
    assert (await rows(db, mid))[CLINIC].escalation_level == 0  # it receipted

    steps_done = [a for a in await attempts(db, home.id) if a[2] == "escalated"]
    assert [a[1] for a in steps_done] == [1, 2, 3]
    # One deviation, in the municipality's deviation inbox, tracked until answered.
    raised = await open_deviations(db)
    assert [(d.kind, d.responsible_hsa_id, d.status) for d in raised] == [
        ("missed-receipt", MAS, "open")
    ]
    assert raised[0].district == "Skärholmen"
    listed = await client.get("/api/v1/deviations?status=open", headers=bearer(keys, MAS))
    assert listed.status_code == 200, listed.text
    assert [d["id"] for d in listed.json()] == [raised[0].id]
    assert "Planeringsunderlag" in listed.json()[0]["summary"]
    other = await client.get(f"/api/v1/deviations/{raised[0].id}", headers=bearer(keys, HOME_CARE))
    assert other.status_code == 404  # another organisation's deviation
    answered = await client.post(
        f"/api/v1/deviations/{raised[0].id}/answer",
        json={"text": "Hemtjänsten kontaktad per telefon", "name": "Dr. Nobody"},
        headers=bearer(keys, MAS),
    )
    assert answered.status_code == 200 and answered.json()["status"] == "answered"
    # Who answered is the token's person and unit, never the body's name.
    assert answered.json()["answered_by"] == f"Maria Larsson, MAS ({MAS})"
    issue = await client.get(f"/fhir/DetectedIssue/{raised[0].id}", headers=bearer(keys, MAS))
    assert issue.json()["status"] == "final" and issue.json()["resourceType"] == "DetectedIssue"
    ops = await client.get("/api/v1/deviations?status=answered", headers=bearer(keys, MAS, "ops"))
    assert [d["answer"] for d in ops.json()] == ["Hemtjänsten kontaktad per telefon"]
    bad = await client.get("/api/v1/deviations?status=closed", headers=bearer(keys, MAS))
    assert bad.status_code == 422 and "status" in bad.text


async def test_an_acknowledged_notice_does_not_escalate(
    db: Database, fixed_clock: FixedClock, api: tuple[httpx.AsyncClient, TokenKeys]
) -> None:
    client, keys = api
    channels = ChannelRegistry([Scripted("fhir", State.RECEIVED), InboxChannel()])
    pipeline = Pipeline(db, channels, directory((Endpoint("fhir", "http://vc.example"),)))
    mid = await pipeline.run(planning(505), "F-5")
    home = (await rows(db, mid))[HOME_CARE]
    fixed_clock.at = T0 + timedelta(hours=3)
    r = await client.post(
        f"/api/v1/inbox/{home.id}/acknowledge",
        headers=bearer(keys, HOME_CARE),
    )
    assert r.status_code == 200
    fixed_clock.at = T0 + timedelta(days=2)
    await pipeline.follow_up()
    now = await rows(db, mid)
    assert set(now) == {HOME_CARE, CLINIC} and now[HOME_CARE].escalation_level == 0
    assert now[HOME_CARE].next_check_at is None
    assert await open_deviations(db) == []


async def test_a_delivery_held_past_its_deadline_goes_to_the_wards_deviation_inbox(
    db: Database, fixed_clock: FixedClock
) -> None:
    pipeline = Pipeline(db, ChannelRegistry([InboxChannel()]), directory((Endpoint("inbox"),)))
    mid = await pipeline.run(planning(506, consent=None), "F-6")
    assert {r.state for r in (await rows(db, mid)).values()} == {"held"}
    fixed_clock.at = T0 + timedelta(days=1)
    await pipeline.follow_up()
    now = await rows(db, mid)
    assert set(now) == {HOME_CARE, CLINIC}  # nobody else is shown a notice without consent
    assert {r.escalation_level for r in now.values()} == {3}
    raised = await open_deviations(db)
    assert {(d.kind, d.responsible_hsa_id) for d in raised} == {("held-past-deadline", HOSPITAL)}
    assert len(raised) == 2  # one per held delivery


# --- the decision itself, without I/O -------------------------------------------------------

POLICY = Policy(
    timedelta(minutes=30), 2, Escalation(("on-call", "mas", "ward"), timedelta(hours=4))
)


def situation(**changes: Any) -> Situation:
    base: dict[str, Any] = {
        "state": State.DELIVERED,
        "application_receipts": True,
        "attempts": 1,
        "last_attempt_at": T0,
        "last_outcome": "delivered",
        "due_at": T0 + timedelta(days=1),
        "escalation_level": 0,
        "has_fallback": True,
    }
    return Situation(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "at", "expected"),
    [
        ({}, timedelta(minutes=10), Plan((), T0 + timedelta(minutes=30))),
        ({}, timedelta(minutes=30), Plan((Action.RESEND,), T0 + timedelta(days=1))),
        ({"attempts": 3}, timedelta(minutes=30), Plan((Action.FALLBACK,), T0 + timedelta(days=1))),
        (
            {"attempts": 3, "has_fallback": False},
            timedelta(minutes=30),
            Plan((Action.FAIL, Action.ESCALATE), None),
        ),
        (
            {"last_outcome": "rejected"},
            timedelta(0),
            Plan((Action.FALLBACK,), T0 + timedelta(days=1)),
        ),
        ({"state": State.RECEIVED}, timedelta(days=2), Plan((), None)),
        (
            {"state": State.READ, "application_receipts": False},
            timedelta(days=1),
            Plan((Action.ESCALATE,), T0 + timedelta(days=1, hours=4)),
        ),
        (
            {"state": State.ACKNOWLEDGED, "application_receipts": False},
            timedelta(days=1),
            Plan((), None),
        ),
        (
            {"state": State.HELD, "last_attempt_at": None},
            timedelta(hours=1),
            Plan((), T0 + timedelta(days=1)),
        ),
        (
            {"escalation_level": 2, "state": State.RECEIVED, "application_receipts": False},
            timedelta(days=1, hours=8),
            Plan((Action.ESCALATE,), None),
        ),
        ({"escalation_level": 3, "application_receipts": False}, timedelta(days=5), Plan((), None)),
        ({"state": State.DENIED}, timedelta(days=5), Plan((), None)),
        ({"state": State.FAILED, "escalation_level": 1}, timedelta(days=5), Plan((), None)),
    ],
)
def test_plan(changes: dict[str, Any], at: timedelta, expected: Plan) -> None:
    assert plan(situation(**changes), T0 + at, POLICY) == expected


@given(
    state=st.sampled_from(list(State)),
    receipts=st.booleans(),
    attempts=st.integers(0, 6),
    outcome=st.sampled_from(["delivered", "unavailable", "rejected", "received"]),
    level=st.integers(0, 3),
    fallback=st.booleans(),
    minutes=st.integers(0, 60 * 24 * 4),
    due=st.none() | st.integers(0, 60 * 24 * 2),
)
def test_plan_never_resends_beyond_the_limit_and_always_looks_ahead(
    state: State,
    receipts: bool,
    attempts: int,
    outcome: str,
    level: int,
    fallback: bool,
    minutes: int,
    due: int | None,
) -> None:
    s = situation(
        state=state,
        application_receipts=receipts,
        attempts=attempts,
        last_outcome=outcome,
        escalation_level=level,
        has_fallback=fallback,
        due_at=None if due is None else T0 + timedelta(minutes=due),
    )
    now = T0 + timedelta(minutes=minutes)
    decided = plan(s, now, POLICY)
    if Action.RESEND in decided.actions:
        assert attempts <= POLICY.max_resends and outcome != "rejected"
    if Action.FALLBACK in decided.actions:
        assert fallback
    assert decided.next_check_at is None or decided.next_check_at > now
    assert len(set(decided.actions)) == len(decided.actions)
    if state in (State.ACKNOWLEDGED, State.DENIED, State.PARKED):
        assert decided == Plan((), None)


# --- routing by content ----------------------------------------------------------------------

BISTAND = "SE2120001637-B020"
REHAB = "SE2321000016-R040"


async def test_content_reaches_the_nurse_and_devices_reach_rehab_but_not_needs_assessment(
    db: Database, fixed_clock: FixedClock, api: tuple[httpx.AsyncClient, TokenKeys]
) -> None:
    client, keys = api
    pipeline = Pipeline(db)  # the demo directory: everyone on the inbox
    message = canonical(
        507,
        event=LusEvent.INSKRIVNINGSMEDDELANDE,
        parties=[
            CareParty("hemtjanst", HOME_CARE, "HT"),
            CareParty("bistand", BISTAND, "Bistånd"),
            CareParty("rehab", REHAB, "Rehab"),
        ],
    )
    message.medications = [MedicationEntry(Coding(ATC, "N02BE01", "Paracetamol"), "1 x 3")]
    message.documents = [
        Document(
            "HJALPMEDEL",
            "Förskrivning av hjälpmedel",
            (Attachment("text/plain", "ZQ=="),),
            flags=("devices",),
        ),
    ]
    mid = await pipeline.run(message, "F-7")
    now = await rows(db, mid)
    # The admission notice is "för kännedom" for home care and rehab by the event's rule;
    # the medication list makes home care, the device prescription rehab, a receiver.
    assert now[HOME_CARE].for_information is False and now[REHAB].for_information is False
    assert now[BISTAND].withheld == "devices,medication"
    assert now[HOME_CARE].withheld is None and now[HOME_CARE].due_at is not None

    def kinds(notice: dict[str, Any]) -> set[str]:
        return {e["resource"]["resourceType"] for e in notice["bundle"]["entry"]}

    seen = await client.get(f"/api/v1/inbox/{now[BISTAND].id}", headers=bearer(keys, BISTAND))
    home = await client.get(f"/api/v1/inbox/{now[HOME_CARE].id}", headers=bearer(keys, HOME_CARE))
    assert seen.status_code == 200 and home.status_code == 200
    assert {"MedicationStatement", "DocumentReference"} <= kinds(home.json())
    assert not {"MedicationStatement", "DocumentReference"} & kinds(seen.json())
    header = next(
        e["resource"]
        for e in seen.json()["bundle"]["entry"]
        if e["resource"]["resourceType"] == "MessageHeader"
    )
    index = resources_by_ref(seen.json()["bundle"])
    focus = [resolve(index, f) for f in header.get("focus", [])]
    assert focus and None not in focus  # every focus resolves: none names a withheld entry
    assert not {"MedicationStatement", "DocumentReference"} & {r["resourceType"] for r in focus}


async def test_a_provider_the_patient_has_is_told_though_the_message_leaves_it_out(
    db: Database, fixed_clock: FixedClock
) -> None:
    """The night home-care provider named at admission gets the discharge information the
    hospital sent without it; a rehab unit of the stay is not carried over (not lasting)."""
    night = "SE5561234567-HT02"
    pipeline = Pipeline(db)
    first = canonical(
        508,
        encounter_id="V-508",
        parties=[CareParty("hemtjanst-natt", night, "Natt"), CareParty("rehab", REHAB, "R")],
    )
    await pipeline.run(first, "F-8")
    later = canonical(
        508,
        encounter_id="V-508",
        event=LusEvent.UTSKRIVNINGSMEDDELANDE,
        parties=[CareParty("hemtjanst", HOME_CARE, "HT")],
    )
    mid = await pipeline.run(later, "F-9")
    now = await rows(db, mid)
    assert night in now and now[night].role == "hemtjanst-natt" and not now[night].for_information
    assert REHAB not in now


async def test_a_municipality_routes_by_its_own_rules(
    db: Database, fixed_clock: FixedClock
) -> None:
    """Huddinge (0126) has its home care act on the admission notice; Stockholm only informs."""
    huddinge_care = "SE2120001234-HT09"
    base = directory((Endpoint("inbox"),))
    own = Organisation(huddinge_care, "Hemtjänsten Huddinge", "home-care", "0126")
    pipeline = Pipeline(db, directory=Directory([*base, own], base.municipalities))
    message = canonical(
        509,
        parties=[
            CareParty("hemtjanst", HOME_CARE, "HT"),
            CareParty("hemtjanst", huddinge_care, "H"),
        ],
    )
    now = await rows(db, await pipeline.run(message, "F-10"))
    assert now[HOME_CARE].for_information and now[HOME_CARE].due_at is None
    assert not now[huddinge_care].for_information
    # Its receipt clock: Huddinge has no override of kvittens-inskrivning, so the common one.
    assert now[huddinge_care].due_rule == "kvittens-inskrivning"
