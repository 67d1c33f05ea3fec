"""The routine's clocks enforced on the messages themselves, and receipts as the routine means
them (decision 0019).

Each clock on time and late through the real pipeline stages and the real database (SQLite and
PostgreSQL); time is the injectable clock, moved by the test. The parties' answers (fast
vårdkontakt, SIP invitation or refusal, services started, kvittens) are written as messages
through the same intake the return path uses, sent by the party itself: they name no visit of
the hospital's, so the clock is found by the patient.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, time, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.directory import Endpoint, Hours, Organisation
from gateway.model.bundle import CanonicalMessage, CareParty
from gateway.model.events import LusEvent as E
from gateway.pipeline import stats
from gateway.pipeline.channels import ChannelRegistry, InboxChannel
from gateway.pipeline.clocks import receipt_due
from gateway.pipeline.deadlines import default_deadlines
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import deliveries, deviations, lus_clocks, messages
from tests.conftest import FixedClock
from tests.inprocess import HOME_CARE, HOSPITAL, NIGHT, Pipeline, canonical, parties
from tests.support import STOCKHOLM
from tests.test_followup import CLINIC as TEST_CLINIC
from tests.test_followup import Scripted, directory

CLINIC = "SE2321000016-V010"  # the demo directory's listed clinic (office hours, no on-call)
BISTAND = "SE2120001637-B020"  # needs assessment: office hours, on-call Trygghetsjouren
ON_CALL = "SE2120001637-T050"
MAS = "SE2120001637-M060"


def local(month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=STOCKHOLM)


def stay_message(n: int, event: E, **changes: Any) -> CanonicalMessage:
    """A hospital message of patient ``n``'s stay (visit V-n), to the clinic, needs
    assessment (when named), day and night home care."""
    named = [*parties(HOME_CARE, NIGHT), CareParty("bistand", BISTAND, "Biståndsenheten")]
    base = canonical(n, event=event, encounter_id=f"V-{n}", parties=named)
    return replace(base, **changes)


def answer(n: int, event: E, sender: str) -> CanonicalMessage:
    """A party's answer about patient ``n``, from its own system (no hospital visit number)."""
    return replace(canonical(n, event=event, parties=[]), sender_hsa_id=sender)


async def send(
    pipeline: Pipeline, clock: FixedClock, message: CanonicalMessage, at: datetime, cid: str
) -> str:
    clock.at = at
    return await pipeline.run(message, cid)


async def clock_of(db: Database, n: int, rule: str) -> Any:
    async with db.read() as conn:
        keys = select(messages.c.patient_key).where(messages.c.control_id.like(f"{n}-%"))
        return (
            await conn.execute(
                select(lus_clocks).where(
                    lus_clocks.c.rule == rule, lus_clocks.c.patient_key.in_(keys.scalar_subquery())
                )
            )
        ).one()


async def deviations_for(
    db: Database, message_id: str, kind: str | None = "missed-deadline"
) -> list[tuple[str, str]]:
    """The message's deviations (of the routine's clocks, unless ``kind`` says otherwise:
    notices nobody receipts in these tests raise their own missed-receipt ones)."""
    async with db.read() as conn:
        rows = (
            await conn.execute(select(deviations).where(deviations.c.message_id == message_id))
        ).all()
    return sorted((r.kind, r.responsible_hsa_id) for r in rows if kind in (None, r.kind))


async def test_the_admission_notice_within_24_hours_of_admission(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    # Admitted Monday 09:30 (PV1-44), the notice at 11:30: in time.
    on_time = await send(
        p, fixed_clock, stay_message(1, E.INSKRIVNINGSMEDDELANDE), local(11, 23, 11, 30), "1-a"
    )
    c = await clock_of(db, 1, "inskrivningsmeddelande")
    assert (c.status, c.responsible_hsa_id) == ("met", HOSPITAL)
    assert c.due_at == local(11, 24, 9, 30) and c.stopped_at == local(11, 23, 11, 30)
    assert await deviations_for(db, on_time) == []
    # Admitted Sunday 08:00, the notice Monday 11:30: 27.5 elapsed hours, flagged against
    # the admission time, a deviation to the ward at once.
    late = stay_message(2, E.INSKRIVNINGSMEDDELANDE, admitted_at=local(11, 22, 8))
    late_id = await send(p, fixed_clock, late, local(11, 23, 11, 30), "2-a")
    c = await clock_of(db, 2, "inskrivningsmeddelande")
    assert (c.status, c.started_at, c.due_at) == ("late", local(11, 22, 8), local(11, 23, 8))
    assert await deviations_for(db, late_id) == [("missed-deadline", HOSPITAL)]
    # A second version of the notice neither restarts nor raises again.
    await send(p, fixed_clock, late, local(11, 23, 12), "2-b")
    async with db.read() as conn:
        raised = (await conn.execute(select(deviations))).all()
    assert [r.kind for r in raised] == ["missed-deadline"]


async def test_fast_vardkontakt_within_24_weekday_hours(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    # Monday 11:30: due Tuesday 11:30; the clinic names one Tuesday 10:00.
    await send(
        p, fixed_clock, stay_message(3, E.INSKRIVNINGSMEDDELANDE), local(11, 23, 11, 30), "3-a"
    )
    c = await clock_of(db, 3, "fast-vardkontakt")
    assert (c.status, c.responsible_hsa_id, c.due_at) == ("running", CLINIC, local(11, 24, 11, 30))
    await send(p, fixed_clock, answer(3, E.FAST_VARDKONTAKT, CLINIC), local(11, 24, 10), "3-b")
    assert (await clock_of(db, 3, "fast-vardkontakt")).status == "met"

    # Friday 15:00: the weekend does not count, due Monday 15:00; nobody is named.
    notice = await send(
        p,
        fixed_clock,
        stay_message(4, E.INSKRIVNINGSMEDDELANDE, admitted_at=local(11, 27, 14)),
        local(11, 27, 15),
        "4-a",
    )
    fixed_clock.at = local(11, 30, 14, 59)
    await p.follow_up()
    assert (await clock_of(db, 4, "fast-vardkontakt")).status == "running"
    assert await deviations_for(db, notice) == []
    fixed_clock.at = local(11, 30, 15)
    await p.follow_up()
    assert (await clock_of(db, 4, "fast-vardkontakt")).status == "late"
    assert await deviations_for(db, notice) == [("missed-deadline", CLINIC)]
    # Named an hour late: the stop is recorded, the deviation is not raised twice.
    await send(p, fixed_clock, answer(4, E.FAST_VARDKONTAKT, CLINIC), local(11, 30, 16), "4-b")
    c = await clock_of(db, 4, "fast-vardkontakt")
    assert (c.status, c.stopped_at) == ("late", local(11, 30, 16))
    assert await deviations_for(db, notice) == [("missed-deadline", CLINIC)]


async def test_the_sip_invitation_within_3_days_of_the_physicians_decision(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)

    # EVN-6: the physician judged the patient ready on Wednesday 14:00; the message came
    # Thursday. Day 0 is Wednesday: due at the end of Saturday.
    def ready(n: int) -> CanonicalMessage:
        return stay_message(n, E.UTSKRIVNINGSKLAR, ready_at=local(11, 25, 14))

    for n in (5, 6, 7, 8):
        await send(p, fixed_clock, ready(n), local(11, 26, 10), f"{n}-a")
        c = await clock_of(db, n, "kallelse-sip")
        assert (c.started_at, c.due_at) == (local(11, 25, 14), local(11, 28, 23, 59, 59))
        assert c.responsible_hsa_id == CLINIC
    await send(p, fixed_clock, answer(5, E.KALLELSE_SIP, CLINIC), local(11, 28, 23), "5-b")
    await send(p, fixed_clock, answer(6, E.SIP_AVBOJD, CLINIC), local(11, 27, 9), "6-b")
    await send(
        p, fixed_clock, stay_message(8, E.MAKULERA_UTSKRIVNINGSKLAR), local(11, 27, 9), "8-b"
    )
    fixed_clock.at = local(11, 29, 0, 0, 1)
    await p.follow_up()
    assert [(await clock_of(db, n, "kallelse-sip")).status for n in (5, 6, 7, 8)] == [
        "met",  # invited at 23:00 on day 3
        "met",  # offered and declined: recorded as such
        "late",
        "cancelled",  # no longer ready: nobody owes an invitation
    ]
    async with db.read() as conn:
        raised = (
            await conn.execute(select(deviations).where(deviations.c.kind == "missed-deadline"))
        ).all()
    assert [(r.kind, r.responsible_hsa_id) for r in raised] == [("missed-deadline", CLINIC)]
    assert "Kallelse till SIP" in raised[0].summary and "2026-11-28 23:59" in raised[0].summary


async def test_discharge_information_by_noon_the_weekday_before(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    planned = {9: local(12, 2, 10), 10: local(12, 2, 10), 11: local(12, 2, 10)}
    for n, when in planned.items():
        plan = stay_message(n, E.PLANERINGSUNDERLAG, expected_discharge=when)
        await send(p, fixed_clock, plan, local(11, 26, 10), f"{n}-a")
        assert (await clock_of(db, n, "utskrivningsinformation")).due_at == local(12, 1, 12)
    # Patient 10's planned date moves to Friday: the rule follows it (Thursday 12:00).
    moved = stay_message(10, E.PLANERINGSUNDERLAG, expected_discharge=local(12, 4, 10))
    await send(p, fixed_clock, moved, local(11, 30, 10), "10-b")
    assert (await clock_of(db, 10, "utskrivningsinformation")).due_at == local(12, 3, 12)

    def out(n: int, at: datetime) -> CanonicalMessage:
        return stay_message(n, E.UTSKRIVNINGSMEDDELANDE, discharged_at=at)

    await send(p, fixed_clock, out(9, local(12, 2, 10)), local(12, 1, 11, 59), "9-b")
    await send(p, fixed_clock, out(10, local(12, 4, 10)), local(12, 2, 13), "10-c")
    late = await send(p, fixed_clock, out(11, local(12, 2, 10)), local(12, 2, 9), "11-b")
    assert [(await clock_of(db, n, "utskrivningsinformation")).status for n in (9, 10, 11)] == [
        "met",
        "met",
        "late",  # on the day of discharge
    ]
    first = (await clock_of(db, 11, "utskrivningsinformation")).started_by
    assert await deviations_for(db, first) == [("missed-deadline", HOSPITAL)]
    assert late  # the discharge itself was delivered as usual


async def test_home_care_starts_within_the_municipalitys_time(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    # Discharged Wednesday 2 Dec 10:00; Stockholm city: three working days, Monday 10:00.
    for n in (12, 13):
        out = stay_message(n, E.UTSKRIVNINGSMEDDELANDE, discharged_at=local(12, 2, 10))
        await send(p, fixed_clock, out, local(12, 2, 10, 5), f"{n}-a")
        c = await clock_of(db, n, "hemtjanst-start")
        assert (c.responsible_hsa_id, c.municipality, c.due_at) == (
            HOME_CARE,
            "0180",
            local(12, 7, 10),
        )
    await send(p, fixed_clock, answer(12, E.INSATSER_STARTADE, HOME_CARE), local(12, 4, 9), "12-b")
    fixed_clock.at = local(12, 7, 10)
    assert await p.follow_up() >= 1
    assert (await clock_of(db, 12, "hemtjanst-start")).status == "met"
    late = await clock_of(db, 13, "hemtjanst-start")
    assert late.status == "late"
    assert await deviations_for(db, late.started_by) == [("missed-deadline", HOME_CARE)]


async def test_a_system_receipt_is_not_a_persons_kvittens(
    db: Database, fixed_clock: FixedClock
) -> None:
    """The admission notice's receipt clock runs until a person's kvittens; the planning
    information's stops at the application receipt as before."""
    fhir = Scripted("fhir", State.RECEIVED)
    clinic = (Endpoint("fhir", "http://vc.example/fhir"),)
    p = Pipeline(db, ChannelRegistry([fhir, InboxChannel()]), directory(clinic))

    def notice(n: int) -> CanonicalMessage:
        base = canonical(n, encounter_id=f"V-{n}", parties=[])
        return replace(base, listed_clinic=replace(base.listed_clinic, hsa_id=TEST_CLINIC))

    t0 = local(11, 23, 9)
    kvitterad = await send(p, fixed_clock, notice(20), t0, "20-a")
    bara_mottagen = await send(p, fixed_clock, notice(21), t0, "21-a")
    for mid in (kvitterad, bara_mottagen):
        async with db.read() as conn:
            d = (
                await conn.execute(
                    select(deliveries).where(
                        deliveries.c.message_id == mid, deliveries.c.recipient_hsa_id == TEST_CLINIC
                    )
                )
            ).one()
        # Received by its system; the clinic here has no opening hours (around the clock),
        # so its 24 weekday hours are 24 elapsed hours.
        assert (d.state, d.due_rule, d.due_at) == (
            "received",
            "kvittens-inskrivning",
            t0 + timedelta(hours=24),
        )
        assert d.next_check_at == d.due_at  # delivered, not read: looked at again then
    # Patient 20's clinic sends its kvittens (a KVITTENS message from its system).
    await send(p, fixed_clock, answer(20, E.KVITTENS, TEST_CLINIC), t0 + timedelta(hours=3), "20-b")
    fixed_clock.at = t0 + timedelta(hours=24)
    await p.follow_up()
    async with db.read() as conn:
        rows = {
            r.message_id: r
            for r in (
                await conn.execute(
                    select(deliveries).where(
                        deliveries.c.recipient_hsa_id == TEST_CLINIC,
                        deliveries.c.message_id.in_([kvitterad, bara_mottagen]),
                    )
                )
            ).all()
        }
    assert (rows[kvitterad].state, rows[kvitterad].escalation_level) == ("acknowledged", 0)
    assert rows[bara_mottagen].state == "received" and rows[bara_mottagen].escalation_level >= 1
    assert await deviations_for(db, kvitterad, "missed-receipt") == []
    assert [k for k, _ in await deviations_for(db, bara_mottagen, "missed-receipt")] == [
        "missed-receipt"
    ]


async def test_around_the_clock_units_count_elapsed_hours(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    # Friday 15:00, planning information: every party owes a receipt (24 weekday hours).
    mid = await send(
        p, fixed_clock, stay_message(30, E.PLANERINGSUNDERLAG), local(11, 27, 15), "30-a"
    )
    async with db.read() as conn:
        due = dict(
            (
                await conn.execute(
                    select(deliveries.c.recipient_hsa_id, deliveries.c.due_at).where(
                        deliveries.c.message_id == mid, deliveries.c.escalated_from.is_(None)
                    )
                )
            ).all()
        )
    assert due[NIGHT] == local(11, 28, 15)  # the night patrol works around the clock
    assert due[HOME_CARE] == local(11, 30, 15)  # day home care keeps opening hours
    assert due[CLINIC] == local(11, 30, 15)


async def test_a_closed_unit_s_notice_goes_to_its_on_call_unit_at_once(
    db: Database, fixed_clock: FixedClock
) -> None:
    p = Pipeline(db)
    # Monday 18:00: the needs assessment (08-17) is closed; Trygghetsjouren is told now.
    mid = await send(
        p, fixed_clock, stay_message(40, E.INSKRIVNINGSMEDDELANDE), local(11, 23, 18), "40-a"
    )
    # Monday 10:00: open, nobody else is told.
    open_mid = await send(
        p, fixed_clock, stay_message(41, E.INSKRIVNINGSMEDDELANDE), local(11, 23, 10), "41-a"
    )
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(deliveries).where(deliveries.c.message_id.in_([mid, open_mid]))
            )
        ).all()
    by = {(r.message_id, r.recipient_hsa_id): r for r in rows}
    jour = by[(mid, ON_CALL)]
    assert (jour.role, jour.for_information, jour.created_at) == ("jour", False, local(11, 23, 18))
    assert jour.escalated_from == by[(mid, BISTAND)].id and jour.state == "delivered"
    assert (open_mid, ON_CALL) not in by
    assert {k for k in by if k[0] == open_mid} == {
        (open_mid, h) for h in (CLINIC, BISTAND, HOME_CARE, NIGHT)
    }
    # At the deadline (24 weekday hours: Tuesday 18:00) the chain finds the on-call unit
    # told already and goes on (the MAS, or the ward once the MAS has it), with the deviation.
    fixed_clock.at = local(11, 24, 18)
    await p.follow_up()
    async with db.read() as conn:
        after = (await conn.execute(select(deliveries).where(deliveries.c.message_id == mid))).all()
    late = next(r for r in after if r.recipient_hsa_id == BISTAND)
    steps = [r for r in after if r.escalated_from == late.id]
    assert late.escalation_level >= 1
    assert sorted(r.role for r in steps)[0] == "eskalering"
    assert [r.recipient_hsa_id for r in steps if r.role == "jour"] == [ON_CALL]  # still once
    assert ON_CALL not in {r.recipient_hsa_id for r in steps if r.role == "eskalering"}
    assert ("missed-receipt", MAS) in await deviations_for(db, mid, "missed-receipt")
    async with db.read() as conn:
        figures = await stats.monthly(conn, stats.Month(2026, 11), now=local(11, 30, 12))
    skh = next(g for g in figures["groups"] if g["district"] == "Skärholmen")
    async with db.read() as conn:  # both notices went unreceipted, each escalated
        every = (await conn.execute(select(deliveries.c.role))).scalars().all()
    escalated = sum(1 for role in every if role == "eskalering")
    assert (skh["on_call_at_once"], skh["escalations"]) == (1, escalated)


@settings(deadline=None)  # the first call loads the holiday calendar
@given(
    st.datetimes(
        min_value=datetime(2026, 1, 1),
        max_value=datetime(2027, 12, 31),
        timezones=st.just(STOCKHOLM),
    )
)
def test_around_the_clock_is_elapsed_and_never_later_than_weekday_hours(start: datetime) -> None:
    night = Organisation(NIGHT, "Natt", "home-care-night", "0180")
    office = replace(night, hours=(Hours(frozenset(range(5)), time(8), time(17)),))
    event = E.INSKRIVNINGSMEDDELANDE
    elapsed = receipt_due(default_deadlines(), event, night, start)
    weekdays = receipt_due(default_deadlines(), event, office, start)
    assert elapsed is not None and weekdays is not None
    assert elapsed - start == timedelta(hours=24)  # real hours, across clock changes too
    assert elapsed <= weekdays
