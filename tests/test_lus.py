"""LUS cases and needs (decision 0017, 001:2599-2610): the ZLU marker, the routing by needs,
and the not-lus state, in-process on both databases."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from adapters.takecare.hl7in import MAPPING, Hl7Rejection, parse
from adapters.takecare.mappings_cli import parse_case
from gateway import clock
from gateway.demo import admission
from gateway.model.bundle import (
    EJ_BEDOMD,
    INGA_BEHOV,
    OPPENVARD,
    SOCIALTJANST,
    CanonicalMessage,
    CareParty,
    read_bundle,
    to_bundle,
)
from gateway.model.events import LusEvent
from gateway.pipeline.lus import NOT_LUS
from gateway.pipeline.routing import Recipient, RoutingRules
from gateway.pipeline.stats import Month, monthly
from gateway.store.db import Database
from gateway.store.tables import deliveries, deviations, messages
from mappings import MAPPINGS_DIR
from tests.conftest import FixedClock, RunningClock
from tests.inprocess import HOME_CARE, NIGHT, REHAB, Pipeline, canonical

GOLDEN = MAPPINGS_DIR / "takecare" / "golden"
CLINIC = "SE2321000016-V010"
BISTAND = "SE2120001637-B020"
NOW = datetime(2026, 11, 23, 9, 30, tzinfo=clock.STOCKHOLM)
BOTH = (SOCIALTJANST, OPPENVARD)
EVERYONE = [
    CareParty("hemtjanst", HOME_CARE, "HT"),
    CareParty("hemtjanst-natt", NIGHT, "Natt"),
    CareParty("bistand", BISTAND, "Bistånd"),
    CareParty("rehab", REHAB, "Rehab"),
]


@pytest.fixture(autouse=True)
def _in_office_hours(office_hours: RunningClock) -> RunningClock:
    """A notice for a unit closed at the hour the test runs would go to its on-call unit at
    once (decision 0019), which these tests are not about."""
    return office_hours


def stay(
    n: int,
    needs: tuple[str, ...] | None,
    event: LusEvent = LusEvent.INSKRIVNINGSMEDDELANDE,
    consent: str | None = "samtycke",
    parties: list[CareParty] = EVERYONE,
) -> CanonicalMessage:
    """A message of patient ``n``'s stay naming ``parties`` (every kind), with ``needs``."""
    msg = canonical(n, event=event, encounter_id=f"V{n}", parties=parties, consent=consent)
    return dataclasses.replace(msg, lus_needs=needs)


# --------------------------------------------------------------------------- the marker


CODES = sorted(MAPPING.lus_needs)


@given(code=st.sampled_from(CODES), upper=st.booleans(), required=st.booleans())
def test_every_zlu_code_parses_to_its_needs_and_round_trips(
    code: str, upper: bool, required: bool
) -> None:
    raw = admission("LUS-1", NOW, lus_needs=code if upper else code.lower())
    msg = parse(raw, lus_marker="required" if required else "optional").canonical
    assert msg.lus_needs == MAPPING.lus_needs[code]
    assert read_bundle(to_bundle(msg, "m")).lus_needs == frozenset(MAPPING.lus_needs[code])


@given(code=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8))
def test_an_unknown_zlu_code_is_rejected_naming_zlu_2(code: str) -> None:
    if code.upper() in MAPPING.lus_needs:
        return
    with pytest.raises(Hl7Rejection) as raised:
        parse(admission("LUS-2", NOW, lus_needs=code))
    assert (raised.value.segment, raised.value.field, raised.value.hl7_error_code) == (
        "ZLU",
        2,
        103,
    )
    assert raised.value.text == "ZLU-2: LUS needs code not in the needs map"  # never the value


@pytest.mark.parametrize(("marker", "expected"), [("optional", None), ("required", (EJ_BEDOMD,))])
def test_without_zlu_the_connection_decides(marker: str, expected: tuple[str, ...] | None) -> None:
    msg = parse(admission("LUS-3", NOW), lus_marker=marker).canonical
    assert msg.lus_needs == expected
    view = read_bundle(to_bundle(msg, "m"))
    assert view.lus_needs == (frozenset(expected) if expected else None)


def test_an_empty_zlu_2_is_rejected() -> None:
    raw = admission("LUS-4", NOW).replace(b"\rZSC", b"\rZLU|1|\rZSC")
    with pytest.raises(Hl7Rejection) as raised:
        parse(raw)
    assert (raised.value.segment, raised.value.field, raised.value.hl7_error_code) == (
        "ZLU",
        2,
        101,
    )


@pytest.mark.parametrize(
    ("case", "needs"),
    [
        ("adt_a01_lus_social", {SOCIALTJANST}),
        ("adt_a01_lus_primary", {OPPENVARD}),
        ("adt_a01_lus_both", set(BOTH)),
        ("adt_a01_not_lus", {INGA_BEHOV}),
        ("adt_a01_lus_unmarked_required", {EJ_BEDOMD}),  # connection.toml: required
        ("adt_a08_lus_marked_required", {SOCIALTJANST}),
        ("adt_a01_full", None),  # no ZLU on a feed of LUS cases only
    ],
)
def test_the_golden_cases_carry_their_needs(case: str, needs: set[str] | None) -> None:
    expected = json.loads((GOLDEN / f"{case}.json").read_text("utf-8"))
    assert read_bundle(expected).lus_needs == (frozenset(needs) if needs else None)
    parsed = parse_case(GOLDEN / f"{case}.hl7", MAPPING).canonical
    assert read_bundle(to_bundle(parsed, "m")).lus_needs == (frozenset(needs) if needs else None)


# --------------------------------------------------------------------------- routing by needs


async def recipients(db: Database, message_id: str) -> dict[str, bool]:
    """recipient HSA-id -> for information."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(deliveries.c.recipient_hsa_id, deliveries.c.for_information).where(
                deliveries.c.message_id == message_id
            )
        )
        return {r.recipient_hsa_id: bool(r.for_information) for r in rows}


@pytest.mark.parametrize(
    ("needs", "expected"),
    [
        # 001:2604-2606: primary care only -> only primary care is told (rehab, as the
        # admission notice's rule has it, for information).
        ((OPPENVARD,), {CLINIC: False, REHAB: True}),
        # 001:2606-2610: social services only -> the municipality, primary care for information.
        (
            (SOCIALTJANST,),
            {BISTAND: False, HOME_CARE: True, NIGHT: True, CLINIC: True, REHAB: True},
        ),
        # Both: the event's rules as they stand (home care, night patrol, rehab informed).
        (BOTH, {BISTAND: False, CLINIC: False, HOME_CARE: True, NIGHT: True, REHAB: True}),
        # A feed of LUS cases only, no marker: as before markers existed, both needs.
        (None, {BISTAND: False, CLINIC: False, HOME_CARE: True, NIGHT: True, REHAB: True}),
    ],
    ids=["primary-care-only", "social-services-only", "both", "unmarked-optional"],
)
async def test_the_needs_decide_who_is_told(
    db: Database, needs: tuple[str, ...] | None, expected: dict[str, bool]
) -> None:
    pipeline = Pipeline(db)
    mid = await pipeline.route_message(stay(1, needs), "N-1")
    assert await pipeline.status(mid) == "routed"
    assert await recipients(db, mid) == expected


async def test_needs_narrow_the_later_messages_of_the_stay(db: Database) -> None:
    """The discharge of a stay judged primary care only reaches primary care only, though
    its own rule names everyone and the discharge carries no marker."""
    pipeline = Pipeline(db)
    await pipeline.route_message(stay(2, (OPPENVARD,)), "S-1")
    later = await pipeline.route_message(stay(2, None, LusEvent.UTSKRIVNINGSMEDDELANDE), "S-2")
    assert await recipients(db, later) == {CLINIC: False, REHAB: False}


RULES = RoutingRules.load(MAPPINGS_DIR / "routing" / "lus.toml")
ROLES = ["listed-clinic", "rehab", "bistand", "hemtjanst", "hemtjanst-natt", "sabo"]
PRIMARY_CARE = {"listed-clinic", "rehab"}


@given(
    chosen=st.dictionaries(
        st.from_regex(r"SE[0-9]{10}-[A-Z0-9]{4}", fullmatch=True),
        st.tuples(st.sampled_from(ROLES), st.booleans()),
        max_size=8,
    ),
    needs=st.sets(st.sampled_from(BOTH), min_size=1),
)
def test_needs_only_narrow_and_follow_the_routine(
    chosen: dict[str, tuple[str, bool]], needs: set[str]
) -> None:
    """Whatever the event rule chose: the needs never add a recipient nor make a copy for
    information one to act on; primary care only reaches primary care only; social services
    only reach primary care for information only; both change nothing (001:2604-2610)."""
    before = {h: Recipient(h, "", role, info) for h, (role, info) in chosen.items()}
    after = RULES.by_needs(before, frozenset(needs))
    assert set(after) <= set(before)
    assert all(after[h].for_information or not before[h].for_information for h in after)
    if needs == {OPPENVARD}:
        assert {r.role for r in after.values()} <= PRIMARY_CARE
        assert set(after) == {h for h, r in before.items() if r.role in PRIMARY_CARE}
    elif needs == {SOCIALTJANST}:
        assert set(after) == set(before)
        assert all(r.for_information for r in after.values() if r.role in PRIMARY_CARE)
    else:
        assert after == before


# --------------------------------------------------------------------------- not a LUS case


@pytest.mark.parametrize("needs", [(INGA_BEHOV,), (EJ_BEDOMD,)], ids=["marked-ej", "unmarked"])
async def test_no_lus_case_ends_in_not_lus_with_nothing_sent(
    db: Database, needs: tuple[str, ...]
) -> None:
    pipeline = Pipeline(db)
    mid = await pipeline.route_message(stay(3, needs, consent=None), "X-1")
    assert await pipeline.status(mid) == NOT_LUS
    assert await recipients(db, mid) == {}


async def test_a_stay_stays_not_lus_until_a_message_marks_it(db: Database) -> None:
    """Decision 0017: a message that judges nothing takes the stay's latest judgement; a
    later marker turns the stay into a LUS case from that message on."""
    pipeline = Pipeline(db)
    first = await pipeline.route_message(stay(4, (INGA_BEHOV,)), "T-1")
    update = await pipeline.route_message(stay(4, None, LusEvent.PLANERINGSUNDERLAG), "T-2")
    assert [await pipeline.status(m) for m in (first, update)] == [NOT_LUS, NOT_LUS]
    marked = await pipeline.route_message(
        stay(4, (SOCIALTJANST,), LusEvent.PLANERINGSUNDERLAG), "T-3"
    )
    assert await pipeline.status(marked) == "routed"
    discharge = await pipeline.route_message(
        stay(4, (EJ_BEDOMD,), LusEvent.UTSKRIVNINGSMEDDELANDE), "T-4"
    )
    assert await pipeline.status(discharge) == "routed"
    assert set(await recipients(db, discharge)) == {BISTAND, HOME_CARE, NIGHT, CLINIC, REHAB}
    assert not (await recipients(db, discharge))[BISTAND]
    assert (await recipients(db, discharge))[CLINIC]  # primary care for information


# --------------------------------------------------------------------------- a mixed feed


FEED = 1000
LUS_MIX = [(SOCIALTJANST,), (OPPENVARD,), BOTH, BOTH]  # every 4th admission is a LUS case


@pytest.mark.slow  # about a minute per database: 1,000 messages, a transaction per stage
async def test_a_feed_of_every_admission_makes_notices_only_of_the_lus_cases(
    db: Database, fixed_clock: FixedClock
) -> None:
    """1,000 admissions on a feed of every admission (BRYGGA_TAKECARE_LUS_MARKER=required):
    one in four is marked a LUS case (some without consent, so held); the others are
    marked EJ or not marked. Only the LUS cases get deliveries; after every clock has run
    out, the rest have no hold, escalation or deviation, and the LUS cases do."""
    pipeline = Pipeline(db)
    fixed_clock.at = NOW
    lus_ids: set[str] = set()
    feed: list[tuple[CanonicalMessage, bool]] = []
    for n in range(FEED):
        if n % 4 == 0:
            needs = LUS_MIX[(n // 4) % len(LUS_MIX)]
            consent = None if n % 8 == 0 else "samtycke"
            feed.append((stay(100 + n, needs, consent=consent, parties=EVERYONE[2:3]), True))
        else:
            feed.append((stay(100 + n, (INGA_BEHOV,) if n % 2 else (EJ_BEDOMD,)), False))
    accepted = await asyncio.gather(
        *(
            pipeline.intake.accept(
                source="TEST|X",
                control_id=f"F-{n}",
                raw=b"raw",
                message=msg,
                answer=lambda mid: mid.encode(),
            )
            for n, (msg, _) in enumerate(feed)
        )
    )
    for a, (_, is_lus) in zip(accepted, feed, strict=True):
        await pipeline.route_accepted(a.message_id)
        if is_lus:
            lus_ids.add(a.message_id)
    # Every clock runs out: receipts are missed, held deliveries pass their deadline.
    fixed_clock.at = NOW + timedelta(days=30)
    assert await pipeline.follow_up()

    async with db.read() as conn:
        status: dict[str, int] = {
            s: n
            for s, n in await conn.execute(
                select(messages.c.status, func.count()).group_by(messages.c.status)
            )
        }
        with_deliveries = set(
            (await conn.execute(select(deliveries.c.message_id).distinct())).scalars()
        )
        deviated = set((await conn.execute(select(deviations.c.message_id).distinct())).scalars())
        held = set(
            (
                await conn.execute(
                    select(deliveries.c.message_id).where(deliveries.c.state == "held").distinct()
                )
            ).scalars()
        )
        escalated = set(
            (
                await conn.execute(
                    select(deliveries.c.message_id)
                    .where(deliveries.c.escalation_level > 0)
                    .distinct()
                )
            ).scalars()
        )
    assert status[NOT_LUS] == FEED - FEED // 4
    assert sum(n for s, n in status.items() if s != NOT_LUS) == FEED // 4
    assert with_deliveries == lus_ids  # only the LUS cases became notices
    assert held and held <= lus_ids  # the LUS cases without consent are held …
    assert deviated and deviated <= lus_ids  # … and their missed clocks raise deviations
    assert escalated <= lus_ids
    async with db.read() as conn:
        figures = await monthly(conn, Month.parse("2026-11"))
    assert figures["not_lus_messages"] == FEED - FEED // 4  # counted apart
