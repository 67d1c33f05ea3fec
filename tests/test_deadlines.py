"""The LUS clocks, table-driven: Friday afternoon, Easter, Christmas, midsummer, the nights the
clocks change, and a municipality's override. Times are Europe/Stockholm."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline.deadlines import STOCKHOLM, DeadlineError, Deadlines, Rule, is_weekday
from mappings import MAPPINGS_DIR

DEADLINES = Deadlines.load(MAPPINGS_DIR / "deadlines" / "lus.toml")


def at(text: str) -> datetime:
    """'2026-11-27 15:00' in Stockholm time."""
    return datetime.fromisoformat(text).replace(tzinfo=STOCKHOLM)


# (case, rule, start, municipality, due)
TABLE = [
    # 24 elapsed hours, whatever the day.
    (
        "admission on a Friday",
        "inskrivningsmeddelande",
        "2026-11-27 15:00",
        None,
        "2026-11-28 15:00",
    ),
    (
        "spring clock change: real hours",
        "inskrivningsmeddelande",
        "2026-03-28 10:00",
        None,
        "2026-03-29 11:00",
    ),
    (
        "autumn clock change: real hours",
        "inskrivningsmeddelande",
        "2026-10-24 10:00",
        None,
        "2026-10-25 09:00",
    ),
    # 24 hours that fall on weekdays.
    ("Friday afternoon", "kvittens-inskrivning", "2026-11-27 15:00", None, "2026-11-30 15:00"),
    (
        "Saturday: counting starts Monday 00:00",
        "kvittens-inskrivning",
        "2026-11-28 10:00",
        None,
        "2026-12-01 00:00",
    ),
    (
        "Maundy Thursday over Easter",
        "kvittens-inskrivning",
        "2026-04-02 15:00",
        None,
        "2026-04-07 15:00",
    ),
    (
        "julafton and the Christmas days",
        "kvittens-inskrivning",
        "2026-12-23 09:00",
        None,
        "2026-12-28 09:00",
    ),
    ("nyårsafton, nyårsdagen", "fast-vardkontakt", "2026-12-30 16:00", None, "2027-01-04 16:00"),
    ("midsommarafton", "fast-vardkontakt", "2026-06-18 12:00", None, "2026-06-22 12:00"),
    (
        "Friday before the spring change",
        "kvittens-inskrivning",
        "2026-03-27 15:00",
        None,
        "2026-03-30 15:00",
    ),
    # End of the 3rd calendar day, day 0 being the start's date.
    ("SIP: Friday", "kallelse-sip", "2026-11-27 15:00", None, "2026-11-30 23:59:59"),
    (
        "SIP: over Christmas (calendar days)",
        "kallelse-sip",
        "2026-12-23 08:00",
        None,
        "2026-12-26 23:59:59",
    ),
    # 12:00 the last weekday before the planned discharge.
    ("discharge Monday", "utskrivningsinformation", "2026-11-30 10:00", None, "2026-11-27 12:00"),
    (
        "discharge Tuesday after Easter",
        "utskrivningsinformation",
        "2026-04-07 10:00",
        None,
        "2026-04-02 12:00",
    ),
    (
        "discharge Monday 28 December",
        "utskrivningsinformation",
        "2026-12-28 09:00",
        None,
        "2026-12-23 12:00",
    ),
    # Working days, and a municipality's own rule.
    ("home care: 3 working days", "hemtjanst-start", "2026-11-26 14:00", None, "2026-12-01 14:00"),
    (
        "home care: ordered on a Sunday",
        "hemtjanst-start",
        "2026-11-29 20:00",
        None,
        "2026-12-03 00:00",
    ),
    (
        "home care: Huddinge, 24 h every day",
        "hemtjanst-start",
        "2026-11-27 15:00",
        "0126",
        "2026-11-28 15:00",
    ),
    (
        "home care: Stockholm over Christmas",
        "hemtjanst-start",
        "2026-12-23 10:00",
        "0180",
        "2026-12-30 10:00",
    ),
    (
        "a municipality without an override uses the rule",
        "kallelse-sip",
        "2026-11-27 15:00",
        "0126",
        "2026-11-30 23:59:59",
    ),
]


@pytest.mark.parametrize(
    ("case", "rule", "start", "municipality", "due"), TABLE, ids=[t[0] for t in TABLE]
)
def test_the_clocks(case: str, rule: str, start: str, municipality: str | None, due: str) -> None:
    assert DEADLINES.due(rule, at(start), municipality) == at(due), case


def test_the_calendar() -> None:
    assert not is_weekday(date(2026, 6, 19))  # midsommarafton
    assert not is_weekday(date(2026, 12, 24)) and not is_weekday(date(2026, 12, 31))
    assert not is_weekday(date(2026, 5, 14))  # Kristi himmelsfärd
    assert not is_weekday(date(2025, 6, 6))  # nationaldagen on a Friday
    assert not is_weekday(date(2026, 1, 6))  # trettondedag jul
    assert is_weekday(date(2026, 4, 2)) and not is_weekday(date(2026, 4, 3))  # Långfredag
    assert is_weekday(date(2026, 11, 27))


def test_unknown_rules_and_municipalities_are_named() -> None:
    with pytest.raises(DeadlineError, match="no rule 'x'; rules: fast-vardkontakt"):
        DEADLINES.rule("x")
    with pytest.raises(DeadlineError, match="no municipality 'Y'; known: 0126"):
        DEADLINES.rule("kallelse-sip", "Y")
    with pytest.raises(DeadlineError, match="needs a time zone"):
        DEADLINES.due("kallelse-sip", datetime(2026, 11, 27, 15, 0))


def test_a_bad_rule_file_says_where(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text('[rules.x]\nkind = "fortnights"\n', encoding="utf-8")
    with pytest.raises(DeadlineError, match="bad.toml: rule x: kind must be one of"):
        Deadlines.load(bad)
    bad.write_text('[rules.x]\nkind = "elapsed_hours"\n[municipalities.M.y]\nkind = "x"\n')
    with pytest.raises(DeadlineError, match=r"\[municipalities.M.y\] overrides no rule"):
        Deadlines.load(bad)
    rule = '[rules.x]\nkind = "elapsed_hours"\n'
    for text, message in (
        ('[kvittens]\nby_a_person = ["y"]\n', r"\[kvittens\] by_a_person names no rule \['y'\]"),
        ('[clocks.y]\nstarts = ["kvittens"]\n', r"\[clocks.y\] names no rule"),
        ('[clocks.x]\nstarts = ["ankomst"]\n', r"\[clocks.x\] starts: no event \['ankomst'\]"),
        ("[clocks.x]\nstarts = []\n", r"\[clocks.x\] starts no event"),
        (
            '[clocks.x]\nstarts = ["kvittens"]\nresponsible = "mas"\n',
            r"\[clocks.x\] responsible must be one of",
        ),
    ):
        bad.write_text(rule + text, encoding="utf-8")
        with pytest.raises(DeadlineError, match=message):
            Deadlines.load(bad)


def test_the_shipped_clocks_and_kvittens() -> None:
    """The routine's clocks as decision 0019 records them."""
    assert DEADLINES.kvittens.by_a_person == frozenset({"kvittens-inskrivning"})
    assert {
        n: (sorted(c.starts), sorted(c.stops), c.responsible) for n, c in DEADLINES.clocks.items()
    } == {
        "inskrivningsmeddelande": (["inskrivningsmeddelande"], [], "sender"),
        "fast-vardkontakt": (["inskrivningsmeddelande"], ["fast-vardkontakt"], "primary-care"),
        "kallelse-sip": (["utskrivningsklar"], ["kallelse-sip", "sip-avbojd"], "primary-care"),
        "utskrivningsinformation": (
            ["planeringsunderlag", "utskrivningsklar"],
            ["utskrivningsmeddelande"],
            "sender",
        ),
        "hemtjanst-start": (["utskrivningsmeddelande"], ["insatser-startade"], "home-care"),
    }


starts = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(STOCKHOLM)
)


@given(starts, st.integers(1, 72))
def test_weekday_hours_never_end_sooner_and_end_on_a_weekday(start: datetime, hours: int) -> None:
    weekday = Rule("w", "weekday_hours", hours).due(start)
    elapsed = Rule("e", "elapsed_hours", hours).due(start)
    assert weekday >= elapsed
    end = weekday.astimezone(STOCKHOLM)
    # It ends inside a weekday, or exactly at the midnight that closes one.
    assert is_weekday(end.date()) or (
        end.time() == datetime.min.time() and is_weekday(end.date() - timedelta(days=1))
    )


@given(starts)
def test_discharge_information_is_due_on_a_weekday_before_the_date(start: datetime) -> None:
    due = DEADLINES.due("utskrivningsinformation", start)
    assert is_weekday(due.date()) and due.date() < start.astimezone(STOCKHOLM).date()
    assert (due.hour, due.minute) == (12, 0)
    assert start.astimezone(STOCKHOLM).date() - due.date() <= timedelta(days=10)


def test_brygga_clock_prints_the_due_time_last() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "clock",
            "kvittens-inskrivning",
            "2026-11-27T15:00:00+01:00",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "2026-11-30T15:00:00+01:00"
    override = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "clock",
            "hemtjanst-start",
            "2026-11-27T15:00:00+01:00",
            "--municipality",
            "0126",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert override.stdout.strip().splitlines()[-1] == "2026-11-28T15:00:00+01:00"
    bad = subprocess.run(
        [sys.executable, "-m", "gateway", "clock", "kallelse-sip", "fredag"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not ISO 8601" in bad.stdout
