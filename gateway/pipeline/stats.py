"""Monthly figures per municipality and city district, as municipalities and the region follow
them (DOMAIN.md, "Statistics"). Pure query and computation; the HTTP route is
:mod:`gateway.api.routes_stats`, and docs/operations.md ("Statistics") says how each figure
is counted.

Counts that are plain grouping run in SQL (the same statements on SQLite and PostgreSQL);
figures that need the calendar (Stockholm days, the LUS clocks) and the median run here in
Python over the month's rows. No figure carries patient data: only counts, minutes, days and
the municipality and district codes.

Month: the calendar month in Europe/Stockholm, so 2026-11-30 23:30 local time (22:30 UTC)
is November and 2026-12-01 00:30 local time (2026-11-30 23:30 UTC) is December.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from gateway import clock
from gateway.clock import STOCKHOLM
from gateway.model.events import LusEvent
from gateway.pipeline.deadlines import Deadlines, default_deadlines
from gateway.pipeline.escalation import ON_CALL_ROLE
from gateway.pipeline.ledger import State
from gateway.pipeline.lus import NOT_LUS
from gateway.store.tables import (
    deliveries,
    delivery_attempts,
    deviations,
    lus_clocks,
    lus_event_times,
    messages,
    receipt_events,
)

SIP_RULE = "kallelse-sip"
FIRST_YEAR, LAST_YEAR = 2000, 2999  # beyond, a month's bounds leave the calendar's range
_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
# The events that make up a stay's clock: ready, its cancellation, SIP, discharge, its cancellation.
_STAY_EVENTS = (
    LusEvent.UTSKRIVNINGSKLAR,
    LusEvent.MAKULERA_UTSKRIVNINGSKLAR,
    LusEvent.KALLELSE_SIP,
    LusEvent.SIP_AVBOJD,
    LusEvent.UTSKRIVNINGSMEDDELANDE,
    LusEvent.MAKULERA_UTSKRIVNING,
)

Place = tuple[str, str | None]  # (municipality, district or None)


class MonthError(ValueError):
    """The month is not YYYY-MM; the message says how to write it."""


@dataclass(frozen=True, slots=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        found = _MONTH.fullmatch(text.strip())
        if not found:
            raise MonthError("month must be a calendar month written YYYY-MM, e.g. 2026-11")
        if not FIRST_YEAR <= int(found[1]) <= LAST_YEAR:
            raise MonthError(f"month must lie in the years {FIRST_YEAR}-{LAST_YEAR}")
        return cls(int(found[1]), int(found[2]))

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def next_first_day(self) -> date:
        return date(self.year + self.month // 12, self.month % 12 + 1, 1)

    def bounds(self) -> tuple[datetime, datetime]:
        """[start, end) of the month: local midnights in Stockholm, as aware datetimes."""
        return (
            datetime.combine(self.first_day, time(0), STOCKHOLM),
            datetime.combine(self.next_first_day, time(0), STOCKHOLM),
        )

    def holds(self, moment: datetime) -> bool:
        start, end = self.bounds()
        return start <= moment < end


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@dataclass
class Figures:
    """One (municipality, district): the month's figures."""

    municipality: str
    district: str | None
    ack_in_time: int = 0
    ack_due: int = 0
    ack_pending: int = 0  # not acknowledged yet, and its clock still runs
    read_minutes: list[float] = field(default_factory=list)
    sip_in_time: int = 0
    sip_stays: int = 0
    sip_pending: int = 0  # no invitation yet, and the 3 days are not over
    stay_days: list[int] = field(default_factory=list)
    exempt_days: list[int] = field(default_factory=list)  # no SIP called (001:1525)
    channels: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0
    escalations: int = 0
    on_call_at_once: int = 0  # notices for a closed unit sent to its on-call unit at once
    deviations_open: int = 0
    deviations_answered: int = 0
    clocks: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        days = self.stay_days
        return {
            "municipality": self.municipality,
            "district": self.district,
            "notices_acknowledged_in_time": {
                "in_time": self.ack_in_time,
                "due": self.ack_due,
                "pending": self.ack_pending,
                "share": share(self.ack_in_time, self.ack_due),
            },
            "minutes_to_read": {
                "read": len(self.read_minutes),
                "median": round(statistics.median(self.read_minutes), 1)
                if self.read_minutes
                else None,
            },
            "sip_invited_within_3_days": {
                "in_time": self.sip_in_time,
                "stays": self.sip_stays,
                "pending": self.sip_pending,
                "share": share(self.sip_in_time, self.sip_stays),
            },
            "days_ready_to_discharge": {
                **_days(days),
                "exempt_no_sip": _days(self.exempt_days),
                "payable": _days(_payable(days, self)),
            },
            "deliveries_by_channel": dict(sorted(self.channels.items())),
            "fallbacks": self.fallbacks,
            "escalations": self.escalations,
            "on_call_at_once": self.on_call_at_once,
            "deviations": {"open": self.deviations_open, "answered": self.deviations_answered},
            "clocks": {
                rule: {**c, "share": share(c["in_time"], c["due"])}
                for rule, c in sorted(self.clocks.items())
            },
        }


def _days(days: list[int]) -> dict[str, Any]:
    return {
        "stays": len(days),
        "days": sum(days),
        "average": round(sum(days) / len(days), 2) if days else None,
    }


def _payable(days: list[int], figures: Figures) -> list[int]:
    """The stays the municipality's payment counts: all but those exempt for want of a SIP
    (``stay_days`` holds every stay, ``exempt_days`` the exempt ones among them)."""
    rest = list(days)
    for d in figures.exempt_days:
        rest.remove(d)
    return rest


class _Table:
    def __init__(self) -> None:
        self.rows: dict[Place, Figures] = {}

    def at(self, municipality: str, district: str | None) -> Figures:
        key = (municipality, district or None)
        if key not in self.rows:
            self.rows[key] = Figures(municipality, district or None)
        return self.rows[key]

    def sorted(self) -> list[Figures]:
        return [self.rows[k] for k in sorted(self.rows, key=lambda k: (k[0], k[1] or ""))]


@dataclass
class _Query:
    """One answer being computed: the month, the filter, the time now, the rows so far."""

    conn: AsyncConnection
    month: Month
    municipality: str | None
    now: datetime
    table: _Table = field(default_factory=_Table)

    def __post_init__(self) -> None:
        self.start, self.end = self.month.bounds()


def _in(column: ColumnElement[Any], start: datetime, end: datetime) -> ColumnElement[bool]:
    return and_(column >= start, column < end)


def _event_time_in(start: datetime, end: datetime) -> ColumnElement[bool]:
    """The message's event time (``occurred_at``, else ``received_at``) is in [start, end)."""
    return or_(
        _in(messages.c.occurred_at, start, end),
        and_(messages.c.occurred_at.is_(None), _in(messages.c.received_at, start, end)),
    )


async def monthly(
    conn: AsyncConnection,
    month: Month,
    municipality: str | None = None,
    deadlines: Deadlines | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The month's figures per (municipality, district), optionally for one municipality."""
    q = _Query(conn, month, municipality, now or clock.now())
    deadlines = deadlines or default_deadlines()
    await _acknowledged_in_time(q, deadlines)
    await _minutes_to_read(q)
    await _stays(q, deadlines)
    await _clocks(q)
    await _plain_counts(q)
    return {
        "month": str(month),
        "time_zone": "Europe/Stockholm",
        "from": q.start.isoformat(),
        "until": q.end.isoformat(),
        "municipality": municipality,
        "groups": [f.as_dict() for f in q.table.sorted()],
        # Region-wide: a message of no LUS case has no recipient, so no municipality here.
        "not_lus_messages": None if municipality else await _not_lus(q),
    }


async def _not_lus(q: _Query) -> int:
    """Messages of the month about patients who are no LUS case (decision 0017): counted
    apart, in no group, since nothing was sent for them."""
    stmt = select(func.count()).where(messages.c.status == NOT_LUS, _event_time_in(q.start, q.end))
    return int((await q.conn.execute(stmt)).scalar_one())


def _where_town(column: ColumnElement[Any], municipality: str | None) -> ColumnElement[bool]:
    return column == municipality if municipality else column.is_not(None)


async def _acknowledged_in_time(q: _Query, deadlines: Deadlines) -> None:
    """Deliveries that must be acted on and whose receipt fell due in the month: how many
    were receipted at or before ``due_at``. Not for-information copies, not escalations
    (they are the follow-up's own notices), not notices a cancellation retracted or a newer
    version superseded. "In time" counts only deadlines that have passed or were met: a
    notice not receipted whose clock still runs is pending, not due (decision 0019)."""
    start, end, municipality, now = q.start, q.end, q.municipality, q.now
    # The receipt: the recipient system's application receipt or a person's kvittens,
    # whichever came first (decision 0010); where the routine asks for a kvittens, only a
    # person's kvittens (decision 0019).
    r = receipt_events.c

    def first(states: list[str], name: str) -> Any:
        return (
            select(r.delivery_id, func.min(r.at).label("at"))
            .where(r.state.in_(states))
            .group_by(r.delivery_id)
            .subquery(name)
        )

    any_ack = first([State.RECEIVED.value, State.ACKNOWLEDGED.value], "ack")
    person = first([State.ACKNOWLEDGED.value], "kvittens")
    d = deliveries.c
    by_person = sorted(deadlines.kvittens.by_a_person) or [""]
    ack_at = case((d.due_rule.in_(by_person), person.c.at), else_=any_ack.c.at)
    in_time = func.sum(case((ack_at <= d.due_at, 1), else_=0))
    pending = func.sum(case((and_(ack_at.is_(None), d.due_at > now), 1), else_=0))
    stmt = (
        select(d.municipality, d.district, func.count(), in_time, pending)
        .select_from(
            deliveries.outerjoin(any_ack, any_ack.c.delivery_id == d.id).outerjoin(
                person, person.c.delivery_id == d.id
            )
        )
        .where(
            d.for_information.is_(False),
            d.escalated_from.is_(None),
            d.retracted_by.is_(None),
            d.superseded_by.is_(None),  # the newest version carries the obligation
            d.due_at.is_not(None),
            _in(d.due_at, start, end),
            _where_town(d.municipality, municipality),
        )
        .group_by(d.municipality, d.district)
    )
    for town, district, total, on_time, waiting in await q.conn.execute(stmt):
        row = q.table.at(town, district)
        row.ack_pending = int(waiting or 0)
        row.ack_due, row.ack_in_time = total - row.ack_pending, int(on_time or 0)


async def _clocks(q: _Query) -> None:
    """The routine's process clocks that fell due in the month, per rule: in time, late,
    pending (still running, due not passed) and due (passed or met: what "in time" counts
    against). Cancelled clocks are no one's obligation."""
    c = lus_clocks.c
    stmt = select(c.municipality, c.district, c.rule, c.status, c.due_at, c.stopped_at).where(
        _in(c.due_at, q.start, q.end),
        c.status != "cancelled",
        _where_town(c.municipality, q.municipality),
    )
    for town, district, rule, status, due_at, stopped_at in await q.conn.execute(stmt):
        counts = q.table.at(town, district).clocks.setdefault(
            rule, {"in_time": 0, "late": 0, "due": 0, "pending": 0}
        )
        if stopped_at is not None and stopped_at <= due_at:
            counts["in_time"] += 1
            counts["due"] += 1
        elif stopped_at is None and due_at > q.now and status == "running":
            counts["pending"] += 1
        else:
            counts["late"] += 1
            counts["due"] += 1


async def _minutes_to_read(q: _Query) -> None:
    """Every delivery delivered in the month and read: minutes from the ``delivered`` receipt
    to the ``read`` receipt; the median per place (computed here: SQLite has no median)."""
    start, end, municipality = q.start, q.end, q.municipality
    delivered, read = receipt_events.alias("delivered"), receipt_events.alias("read")
    d = deliveries.c
    stmt = (
        select(d.municipality, d.district, delivered.c.at, read.c.at)
        .select_from(
            deliveries.join(
                delivered,
                and_(delivered.c.delivery_id == d.id, delivered.c.state == State.DELIVERED.value),
            ).join(read, and_(read.c.delivery_id == d.id, read.c.state == State.READ.value))
        )
        .where(_in(delivered.c.at, start, end), _where_town(d.municipality, municipality))
    )
    for town, district, delivered_at, read_at in await q.conn.execute(stmt):
        minutes = max((read_at - delivered_at).total_seconds(), 0) / 60
        q.table.at(town, district).read_minutes.append(minutes)


async def _plain_counts(q: _Query) -> None:
    start, end, municipality = q.start, q.end, q.municipality
    d = deliveries.c
    # Deliveries created in the month, by the channel they were last sent by (never sent:
    # held, denied or failed before a channel was chosen, so not counted here).
    stmt = (
        select(d.municipality, d.district, d.channel, func.count())
        .where(
            _in(d.created_at, start, end),
            d.channel.is_not(None),
            _where_town(d.municipality, municipality),
        )
        .group_by(d.municipality, d.district, d.channel)
    )
    for town, district, channel, n in await q.conn.execute(stmt):
        q.table.at(town, district).channels[channel] = n

    # Fallbacks: attempts in the month that gave up a channel for the next one.
    stmt = (
        select(d.municipality, d.district, func.count())
        .select_from(delivery_attempts.join(deliveries, delivery_attempts.c.delivery_id == d.id))
        .where(
            delivery_attempts.c.outcome == "fallback",
            _in(delivery_attempts.c.at, start, end),
            _where_town(d.municipality, municipality),
        )
        .group_by(d.municipality, d.district)
    )
    for town, district, n in await q.conn.execute(stmt):
        q.table.at(town, district).fallbacks = n

    # Escalations created in the month, counted where the late delivery's recipient is (an
    # escalation to the sending ward has no municipality of its own).
    # A notice for a closed unit sent to its on-call unit at once is counted apart.
    late = deliveries.alias("late")
    esc = deliveries.alias("esc")
    stmt = (
        select(late.c.municipality, late.c.district, esc.c.role, func.count())
        .select_from(esc.join(late, esc.c.escalated_from == late.c.id))
        .where(_in(esc.c.created_at, start, end), _where_town(late.c.municipality, municipality))
        .group_by(late.c.municipality, late.c.district, esc.c.role)
    )
    for town, district, role, n in await q.conn.execute(stmt):
        row = q.table.at(town, district)
        if role == ON_CALL_ROLE:
            row.on_call_at_once += n
        else:
            row.escalations += n

    # Deviations raised in the month, by their status now.
    v = deviations.c
    stmt = (
        select(v.municipality, v.district, v.status, func.count())
        .where(_in(v.raised_at, start, end), _where_town(v.municipality, municipality))
        .group_by(v.municipality, v.district, v.status)
    )
    for town, district, status, n in await q.conn.execute(stmt):
        row = q.table.at(town, district)
        if status == "answered":
            row.deviations_answered += n
        else:
            row.deviations_open += n


@dataclass
class Stay:
    """One hospital stay's clock, from its messages in time order."""

    ready_at: datetime | None = None
    discharged_at: datetime | None = None
    sip_at: list[datetime] = field(default_factory=list)

    @classmethod
    def of(cls, events: Iterable[tuple[datetime, str]]) -> Stay:
        """A cancellation of ready-for-discharge stops its clock, and a later ready message
        starts it anew; a later version of a ready message does not move the start. The
        discharge is the latest discharge message not cancelled."""
        stay = cls()
        for at, event in sorted(events):
            if event == LusEvent.UTSKRIVNINGSKLAR and stay.ready_at is None:
                stay.ready_at = at
            elif event == LusEvent.MAKULERA_UTSKRIVNINGSKLAR:
                stay.ready_at = None
            elif event == LusEvent.UTSKRIVNINGSMEDDELANDE:
                stay.discharged_at = at
            elif event == LusEvent.MAKULERA_UTSKRIVNING:
                stay.discharged_at = None
            elif event in (LusEvent.KALLELSE_SIP, LusEvent.SIP_AVBOJD):
                stay.sip_at.append(at)  # a SIP offered and declined was offered in time too
        return stay

    def exempt(self, sip_due: datetime) -> bool:
        """No SIP called (001:1525): the municipality's payment does not apply when the
        fast vårdkontakt had not called the SIP by its deadline and the patient was still
        in hospital then (decision 0019)."""
        if self.discharged_at is None or self.discharged_at <= sip_due:
            return False
        return not any(at <= sip_due for at in self.sip_at)

    def days_ready(self) -> int | None:
        """Calendar days from ready-for-discharge to discharge, day 0 included.

        The regional payment model counts "kalenderdagar inklusive dag noll" (001:1501; the
        table at 001:1508-1513: "1,3 kalenderdagar inkl. dag 0"): the day the patient was
        judged ready is day 0 and counts as a day, and every calendar day after it up to and
        including the day of discharge counts too, weekends and holidays alike. Ready and
        discharged the same day: 1; ready on Friday, discharged on Monday: 4.
        """
        if self.ready_at is None or self.discharged_at is None:
            return None
        if self.discharged_at < self.ready_at:
            return None
        ready = self.ready_at.astimezone(STOCKHOLM).date()
        out = self.discharged_at.astimezone(STOCKHOLM).date()
        return (out - ready).days + 1


async def _stays(q: _Query, deadlines: Deadlines) -> None:
    """SIP within 3 days (stays ready in the month) and days from ready to discharge (stays
    discharged in the month). A stay is an ``episode_key``; it belongs to the places of its
    messages' recipients (escalations aside)."""
    start, end, month, municipality = q.start, q.end, q.month, q.municipality
    m = messages.c
    candidates = (
        select(m.episode_key)
        .where(
            m.episode_key.is_not(None),
            m.event.in_([LusEvent.UTSKRIVNINGSKLAR.value, LusEvent.UTSKRIVNINGSMEDDELANDE.value]),
            _event_time_in(start, end),
        )
        .distinct()
        .scalar_subquery()
    )
    events: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    t = lus_event_times.c
    rows = await q.conn.execute(
        select(m.episode_key, m.event, m.occurred_at, m.received_at, t.message_id, t.at)
        .select_from(messages.outerjoin(lus_event_times, t.message_id == m.id))
        .where(m.episode_key.in_(candidates), m.event.in_([e.value for e in _STAY_EVENTS]))
    )
    for episode, event, occurred_at, received_at, timed, event_at in rows:
        if timed is None:  # stored before event times were kept: the message's own time
            events[episode].append((occurred_at or received_at, event))
        elif event_at is not None:  # the decision (EVN-6), the discharge event's own time
            events[episode].append((event_at, event))
        # else: discharge information sent as a document, not the discharge itself
    if not events:
        return

    d = deliveries.c
    places: dict[str, set[Place]] = defaultdict(set)
    rows = await q.conn.execute(
        select(m.episode_key, d.municipality, d.district)
        .select_from(deliveries.join(messages, d.message_id == m.id))
        .where(
            m.episode_key.in_(candidates),
            d.escalated_from.is_(None),
            _where_town(d.municipality, municipality),
        )
        .distinct()
    )
    for episode, town, district in rows:
        places[episode].add((town, district or None))

    for episode, history in events.items():
        stay = Stay.of(history)
        for town, district in _narrowest(places.get(episode, set())):
            row = q.table.at(town, district)
            if stay.ready_at is not None and month.holds(stay.ready_at):
                rule = deadlines.rule_for(SIP_RULE, town)
                due = rule.due(stay.ready_at)
                if any(at <= due for at in stay.sip_at):
                    row.sip_in_time += 1
                    row.sip_stays += 1
                elif not stay.sip_at and q.now <= due:  # not due yet: pending, not counted
                    row.sip_pending += 1
                else:
                    row.sip_stays += 1
            if stay.discharged_at is not None and month.holds(stay.discharged_at):
                days = stay.days_ready()
                if days is not None:
                    row.stay_days.append(days)
                    assert stay.ready_at is not None
                    if stay.exempt(deadlines.rule_for(SIP_RULE, town).due(stay.ready_at)):
                        row.exempt_days.append(days)


def _narrowest(places: set[Place]) -> set[Place]:
    """A stay seen by a district's units and by units of the same municipality without a
    district is counted in the district only, so no municipality counts it twice."""
    with_district = {town for town, district in places if district}
    return {(t, d) for t, d in places if d or t not in with_district}
