"""The LUS clocks: when each message or receipt is due, counted as DOMAIN.md says.

Pure functions over a calendar (Swedish public holidays, plus midsommarafton, julafton and
nyårsafton) in Europe/Stockholm time. The rules are data (``mappings/deadlines/lus.toml``),
and a municipality may override any of them. ``brygga clock`` previews a due time.

Counting kinds:

- ``elapsed_hours``: real hours (24 h from 10:00 the Saturday before the spring clock change
  end at 11:00 on the Sunday).
- ``weekday_hours``: only the time inside weekdays counts (Friday 15:00 + 24 h → Monday 15:00).
- ``end_of_calendar_day``: 23:59:59 on the Nth calendar day after the start (its date is day 0).
- ``noon_weekday_before``: 12:00 on the last weekday before the start's date (a planned
  discharge date).
- ``working_days``: the same clock time on the Nth weekday after the start (from 00:00 of the
  next weekday when the start is not on a weekday).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import holidays

from gateway.clock import STOCKHOLM
from gateway.model.events import LusEvent
from mappings import MAPPINGS_DIR

KINDS = (
    "elapsed_hours",
    "weekday_hours",
    "end_of_calendar_day",
    "noon_weekday_before",
    "working_days",
)


DEADLINES_FILE = MAPPINGS_DIR / "deadlines" / "lus.toml"


class DeadlineError(ValueError):
    """A rule file or a question the engine cannot answer; the message says which."""


@lru_cache(maxsize=64)
def _holidays(year: int) -> frozenset[date]:
    public = holidays.country_holidays("SE", years=year, include_sundays=False)
    midsummer_day = next(d for d, name in public.items() if "Midsummer" in name)
    eves = {midsummer_day - timedelta(days=1), date(year, 12, 24), date(year, 12, 31)}
    return frozenset(public) | eves


def is_weekday(day: date) -> bool:
    """Monday to Friday and not a Swedish public holiday or one of the three eves."""
    return day.weekday() < 5 and day not in _holidays(day.year)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    amount: float = 0
    description: str = ""

    def due(self, start: datetime) -> datetime:
        """When this clock runs out for ``start`` (aware), in Stockholm time."""
        if start.tzinfo is None:
            raise DeadlineError("the start needs a time zone (ISO 8601 with an offset)")
        local = start.astimezone(STOCKHOLM)
        if self.kind == "elapsed_hours":
            return _utc(start) + timedelta(hours=self.amount)
        if self.kind == "weekday_hours":
            return _weekday_hours(local, self.amount)
        if self.kind == "end_of_calendar_day":
            day = local.date() + timedelta(days=int(self.amount))
            return datetime.combine(day, time(23, 59, 59), STOCKHOLM)
        if self.kind == "noon_weekday_before":
            day = local.date() - timedelta(days=1)
            while not is_weekday(day):
                day -= timedelta(days=1)
            return datetime.combine(day, time(12, 0), STOCKHOLM)
        if self.kind == "working_days":
            return _working_days(local, int(self.amount))
        raise DeadlineError(f"rule {self.name}: unknown kind {self.kind!r}")


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _next_midnight(local: datetime) -> datetime:
    return datetime.combine(local.date() + timedelta(days=1), time(0), STOCKHOLM)


def _weekday_hours(local: datetime, hours: float) -> datetime:
    remaining = timedelta(hours=hours)
    moment = local
    for _ in range(3700):  # ten years of days: a guard, not a limit anyone reaches
        midnight = _next_midnight(moment)
        if is_weekday(moment.date()):
            available = _utc(midnight) - _utc(moment)  # real time, so 23 or 25 h on DST days
            if remaining <= available:
                return (_utc(moment) + remaining).astimezone(STOCKHOLM)
            remaining -= available
        moment = midnight
    raise DeadlineError("no weekday found within ten years")


def _working_days(local: datetime, n: int) -> datetime:
    if not is_weekday(local.date()):
        day = local.date() + timedelta(days=1)
        while not is_weekday(day):
            day += timedelta(days=1)
        local = datetime.combine(day, time(0), STOCKHOLM)
    day, counted = local.date(), 0
    while counted < n:
        day += timedelta(days=1)
        if is_weekday(day):
            counted += 1
    return datetime.combine(day, local.time(), STOCKHOLM)


ESCALATION_STEPS = ("on-call", "mas", "ward")


@dataclass(frozen=True, slots=True)
class Escalation:
    """Who is told when a receipt is late, in order, and how long each step waits."""

    chain: tuple[str, ...] = ESCALATION_STEPS
    step: timedelta = timedelta(hours=4)


RESPONSIBLE = ("sender", "primary-care", "home-care")


@dataclass(frozen=True, slots=True)
class ProcessClock:
    """One of the routine's own clocks (decision 0019): the events that start, stop and
    cancel it, and who answers for it when it runs out."""

    rule: str
    starts: frozenset[str]
    stops: frozenset[str] = frozenset()
    cancels: frozenset[str] = frozenset()
    responsible: str = "sender"


@dataclass(frozen=True, slots=True)
class Kvittens:
    """Receipts as the routine means them: which receipt clocks only a person's kvittens
    stops, and how a unit staffed around the clock counts weekday-hour clocks."""

    by_a_person: frozenset[str] = frozenset()
    around_the_clock: str = "elapsed_hours"


class Deadlines:
    """The rules, with each municipality's overrides (keyed by municipality code), which
    clock each receipt runs on, the escalation chain and the routine's process clocks."""

    def __init__(
        self,
        rules: dict[str, Rule],
        overrides: dict[str, dict[str, Rule]],
        receipts: dict[str, str] | None = None,
        escalation: Escalation | None = None,
        kvittens: Kvittens | None = None,
        clocks: dict[str, ProcessClock] | None = None,
    ) -> None:
        self._rules = rules
        self._overrides = overrides
        self.receipts = receipts or {}
        self.escalation = escalation or Escalation()
        self.kvittens = kvittens or Kvittens()
        self.clocks = clocks or {}

    def receipt_due(
        self,
        event: str,
        start: datetime,
        municipality: str = "",
        around_the_clock: bool = False,
    ) -> datetime | None:
        """When a receipt of an ``event`` message delivered at ``start`` is due, or None if
        no clock runs for it. A municipality without overrides uses the common rules; a
        recipient staffed around the clock counts weekday hours as elapsed hours."""
        name = self.receipts.get(event)
        if name is None:
            return None
        rule = self.rule_for(name, municipality)
        if around_the_clock and rule.kind == "weekday_hours":
            rule = Rule(rule.name, self.kvittens.around_the_clock, rule.amount, rule.description)
        return rule.due(start)

    def needs_person(self, rule_name: str | None) -> bool:
        """Does this receipt clock run until a person's kvittens (not an application
        receipt)?"""
        return bool(rule_name) and rule_name in self.kvittens.by_a_person

    def rule_for(self, name: str, municipality: str = "") -> Rule:
        """The municipality's own version of a rule, or the common one if it has none (the
        strict :meth:`rule` refuses a municipality it does not know: for the CLI)."""
        return self.rule(name, municipality if municipality in self._overrides else None)

    @property
    def names(self) -> list[str]:
        return sorted(self._rules)

    @property
    def municipalities(self) -> list[str]:
        return sorted(self._overrides)

    def rule(self, name: str, municipality: str | None = None) -> Rule:
        if municipality and municipality not in self._overrides:
            raise DeadlineError(
                f"no municipality {municipality!r}; known: {', '.join(self.municipalities)}"
            )
        if municipality and name in self._overrides[municipality]:
            return self._overrides[municipality][name]
        if name not in self._rules:
            raise DeadlineError(f"no rule {name!r}; rules: {', '.join(self.names)}")
        return self._rules[name]

    def due(self, name: str, start: datetime, municipality: str | None = None) -> datetime:
        return self.rule(name, municipality).due(start)

    @classmethod
    def load(cls, path: Path) -> Deadlines:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        rules = {n: _rule(path, n, e) for n, e in data.get("rules", {}).items()}
        overrides: dict[str, dict[str, Rule]] = {}
        for municipality, entries in data.get("municipalities", {}).items():
            for n, e in entries.items():
                if n not in rules:
                    raise DeadlineError(
                        f"{path.name}: [municipalities.{municipality}.{n}] overrides no rule"
                    )
                overrides.setdefault(municipality, {})[n] = _rule(path, n, e)
        receipts = {str(k): str(v) for k, v in data.get("receipts", {}).items()}
        for event, name in receipts.items():
            if name not in rules:
                raise DeadlineError(f"{path.name}: [receipts] {event} = {name!r} names no rule")
        esc = data.get("escalation", {})
        chain = tuple(esc.get("chain", ESCALATION_STEPS))
        if unknown := set(chain) - set(ESCALATION_STEPS):
            raise DeadlineError(
                f"{path.name}: [escalation] chain: unknown step(s) {sorted(unknown)}; "
                f"steps: {', '.join(ESCALATION_STEPS)}"
            )
        step = esc.get("step_hours", 4)
        if not isinstance(step, int | float) or step <= 0:
            raise DeadlineError(f"{path.name}: [escalation] step_hours must be a number > 0")
        return cls(
            rules,
            overrides,
            receipts,
            Escalation(chain, timedelta(hours=step)),
            _kvittens(path, data.get("kvittens", {}), rules),
            {n: _clock(path, n, e, rules) for n, e in data.get("clocks", {}).items()},
        )


@lru_cache(maxsize=1)
def default_deadlines() -> Deadlines:
    """The installation's rules (``mappings/deadlines/lus.toml``), read once."""
    return Deadlines.load(DEADLINES_FILE)


def _kvittens(path: Path, entry: dict[str, Any], rules: dict[str, Rule]) -> Kvittens:
    person = frozenset(str(n) for n in entry.get("by_a_person", []))
    if unknown := person - set(rules):
        raise DeadlineError(f"{path.name}: [kvittens] by_a_person names no rule {sorted(unknown)}")
    kind = str(entry.get("around_the_clock", "elapsed_hours"))
    if kind not in KINDS:
        raise DeadlineError(f"{path.name}: [kvittens] around_the_clock must be one of {KINDS}")
    return Kvittens(person, kind)


def _clock(path: Path, name: str, entry: dict[str, Any], rules: dict[str, Rule]) -> ProcessClock:
    if name not in rules:
        raise DeadlineError(f"{path.name}: [clocks.{name}] names no rule")
    responsible = str(entry.get("responsible", "sender"))
    if responsible not in RESPONSIBLE:
        raise DeadlineError(
            f"{path.name}: [clocks.{name}] responsible must be one of {list(RESPONSIBLE)}"
        )
    events = {e.value for e in LusEvent}
    sets = {k: frozenset(str(e) for e in entry.get(k, [])) for k in ("starts", "stops", "cancels")}
    for key, named in sets.items():
        if unknown := named - events:
            raise DeadlineError(f"{path.name}: [clocks.{name}] {key}: no event {sorted(unknown)}")
    if not sets["starts"]:
        raise DeadlineError(f"{path.name}: [clocks.{name}] starts no event")
    return ProcessClock(name, sets["starts"], sets["stops"], sets["cancels"], responsible)


def _rule(path: Path, name: str, entry: dict[str, object]) -> Rule:
    kind = str(entry.get("kind", ""))
    if kind not in KINDS:
        raise DeadlineError(f"{path.name}: rule {name}: kind must be one of {list(KINDS)}")
    amount = entry.get("amount", 0)
    if not isinstance(amount, int | float) or amount < 0:
        raise DeadlineError(f"{path.name}: rule {name}: amount must be a number ≥ 0")
    return Rule(name, kind, float(amount), str(entry.get("description", "")))
