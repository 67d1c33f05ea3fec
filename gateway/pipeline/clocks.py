"""The routine's clocks enforced on the messages themselves, and receipts as the routine means
them (decision 0019).

Process clocks (``mappings/deadlines/lus.toml``, ``[clocks.*]``) run per stay (episode) and
rule in ``lus_clocks``: a message starts one (the admission notice, ready-for-discharge, the
planned discharge date, the discharge), a later message stops it (fast vårdkontakt, the SIP
invitation or its refusal, the discharge information, services started), a cancellation
cancels it. A clock stopped late, or still running at its due time, is a deviation to the
party responsible, and shows in the statistics. Stops are timed by the gateway's own receipt
of the stopping message (``messages.received_at``): exact and not the sender's say.

Receipts: the receipt clock of a notice for a unit staffed around the clock counts elapsed
hours; a notice for a unit closed right now goes to its on-call unit at once; a KVITTENS
message is a person's kvittens of the notices its sender received in that stay.

Called from routing (:func:`after_routing`, :func:`receipt_due`) and follow-up
(:func:`check_due`); the return messages' own API calls :func:`after_routing` the same way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.audit import AuditEntry
from gateway.directory import Directory, Organisation
from gateway.model.bundle import BundleView, resources_by_ref
from gateway.model.events import LusEvent
from gateway.pipeline import deviations, ledger
from gateway.pipeline.deadlines import Deadlines, ProcessClock
from gateway.pipeline.escalation import Escalator
from gateway.pipeline.ledger import State
from gateway.store.sql import insert_ignore
from gateway.store.tables import deliveries, lus_clocks, lus_event_times, messages

RUNNING, MET, LATE, CANCELLED = "running", "met", "late", "cancelled"
DEVIATION_KIND = "missed-deadline"


def receipt_due(
    deadlines: Deadlines, event: LusEvent, org: Organisation | None, now: datetime
) -> datetime | None:
    """When the recipient's receipt is due: the event's clock as the recipient's municipality
    (by its code) counts it, in elapsed hours for a unit staffed around the clock (no opening
    hours in the directory: night patrol, SÄBO)."""
    return deadlines.receipt_due(
        event.value,
        now,
        org.municipality if org else "",
        around_the_clock=bool(org and not org.hours),
    )


@dataclass(frozen=True, slots=True)
class Facts:
    """The times a message gives the clocks (read from its canonical Bundle)."""

    admitted_at: datetime | None
    discharged_at: datetime | None
    planned_discharge: datetime | None
    ready_at: datetime | None
    occurred_at: datetime | None


def facts(bundle: dict[str, Any], view: BundleView) -> Facts:
    """Admission (Encounter.period.start, PV1-44), discharge (Encounter.period.end, the
    discharge event's PV1-45), the planned discharge date (CarePlan.period.end) and the
    physician's ready-for-discharge decision (EVN-6)."""
    res = resources_by_ref(bundle)
    period = res.get("Encounter/encounter", {}).get("period", {})
    planned = res.get("CarePlan/careplan", {}).get("period", {}).get("end")
    return Facts(
        admitted_at=_at(period.get("start")),
        discharged_at=_at(period.get("end")),
        planned_discharge=_at(planned),
        ready_at=view.ready_at,
        occurred_at=view.occurred_at,
    )


def _at(text: Any) -> datetime | None:
    if not isinstance(text, str) or "T" not in text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=clock.STOCKHOLM)


async def after_routing(
    conn: AsyncConnection,
    escalator: Escalator,
    deadlines: Deadlines,
    message_id: str,
    patient_key: str,
    episode_key: str | None,
    bundle: dict[str, Any],
    view: BundleView,
    directory: Directory,
    now: datetime,
    audit_later: list[AuditEntry],
) -> None:
    """Everything the clocks do once a message's deliveries exist: closed units' on-call
    told at once, a KVITTENS recorded as a person's kvittens, process clocks started,
    stopped or cancelled."""
    await _closed_units_to_on_call(conn, escalator, message_id, directory, now, audit_later)
    received_at = (
        await conn.execute(select(messages.c.received_at).where(messages.c.id == message_id))
    ).scalar_one()
    if view.event is LusEvent.KVITTENS:
        await person_kvittens(conn, episode_key, view.sender_hsa_id, received_at, patient_key)
    event = view.event.value
    known = facts(bundle, view)
    await _event_time(conn, message_id, view.event, known)
    # A party's answer names no visit of the hospital's: its stay is found by the patient. A
    # hospital's message is found by its visit only, never another stay's.
    sender = directory.get(view.sender_hsa_id)
    by_patient = None if sender is not None and sender.kind == "hospital" else patient_key
    for pc in deadlines.clocks.values():
        if event in pc.stops:
            await _stop(conn, deadlines, episode_key, by_patient, pc.rule, message_id, received_at)
        if not episode_key:
            continue  # the hospital's messages carry the visit; nothing starts without it
        if event in pc.cancels:
            await _cancel(conn, episode_key, pc.rule, message_id, received_at)
        if event in pc.starts:
            await _start(
                conn,
                deadlines,
                pc,
                message_id,
                patient_key,
                episode_key,
                view,
                known,
                directory,
                received_at,
                now,
            )


async def _closed_units_to_on_call(
    conn: AsyncConnection,
    escalator: Escalator,
    message_id: str,
    directory: Directory,
    now: datetime,
    audit_later: list[AuditEntry],
) -> None:
    """A notice that must be acted on, for a unit closed right now, goes to its on-call unit
    at once rather than after a missed deadline (the directory's opening hours decide)."""
    rows = await conn.execute(
        select(deliveries.c.id, deliveries.c.recipient_hsa_id).where(
            deliveries.c.message_id == message_id,
            deliveries.c.for_information.is_(False),
            deliveries.c.escalated_from.is_(None),
            deliveries.c.due_at.is_not(None),
            deliveries.c.state == State.ROUTED.value,
        )
    )
    for delivery_id, hsa_id in rows.all():
        org = directory.get(hsa_id)
        if org and org.on_call and not org.staffed_at(now):
            await escalator.to_on_call(conn, delivery_id, now, audit_later)


async def person_kvittens(
    conn: AsyncConnection,
    episode_key: str | None,
    party: str,
    at: datetime,
    patient_key: str | None = None,
) -> None:
    """A party's KVITTENS is a person's kvittens of every notice it received in the stay
    (by the visit, else every notice of the patient's) and has not yet receipted so."""
    stay = (
        messages.c.episode_key == episode_key
        if episode_key
        else messages.c.patient_key == patient_key
    )
    rows = await conn.execute(
        select(deliveries.c.id, deliveries.c.message_id, messages.c.patient_key)
        .join(messages, messages.c.id == deliveries.c.message_id)
        .where(
            stay,
            deliveries.c.recipient_hsa_id == party,
            deliveries.c.due_at.is_not(None),
            deliveries.c.state.not_in([State.ACKNOWLEDGED.value, State.DENIED.value]),
        )
    )
    for delivery_id, message_id, key in rows.all():
        await ledger.record(
            conn,
            delivery_id,
            message_id,
            key,
            State.ACKNOWLEDGED,
            detail="Kvittens av person (kvittensmeddelande)",
            at=at,
        )


async def _event_time(
    conn: AsyncConnection, message_id: str, event: LusEvent, known: Facts
) -> None:
    """Statistics count ready-for-discharge from the physician's decision (EVN-6) and the
    discharge from the discharge event (Encounter.period.end), not from a document."""
    if event is LusEvent.UTSKRIVNINGSKLAR:
        at = known.ready_at or known.occurred_at
    elif event is LusEvent.UTSKRIVNINGSMEDDELANDE:
        at = known.discharged_at  # None: information sent as a document, no discharge
    else:
        return
    await insert_ignore(conn, lus_event_times, {"message_id": message_id, "at": at})


async def _clock_row(
    conn: AsyncConnection, episode_key: str | None, rule: str, patient_key: str | None = None
) -> Any:
    """The stay's clock; for a party's answer that names no visit of the hospital's (its
    own system's ids), the patient's latest clock of that rule still owed."""
    if episode_key:
        row = (
            await conn.execute(
                select(lus_clocks).where(
                    lus_clocks.c.episode_key == episode_key, lus_clocks.c.rule == rule
                )
            )
        ).one_or_none()
        if row is not None or patient_key is None:
            return row
    if patient_key is None:
        return None
    return (
        await conn.execute(
            select(lus_clocks)
            .where(
                lus_clocks.c.patient_key == patient_key,
                lus_clocks.c.rule == rule,
                lus_clocks.c.stopped_at.is_(None),
                lus_clocks.c.status.in_([RUNNING, LATE]),
            )
            .order_by(lus_clocks.c.started_at.desc())
            .limit(1)
        )
    ).one_or_none()


async def _cancel(
    conn: AsyncConnection, episode_key: str, rule: str, message_id: str, at: datetime
) -> None:
    await conn.execute(
        update(lus_clocks)
        .where(
            lus_clocks.c.episode_key == episode_key,
            lus_clocks.c.rule == rule,
            lus_clocks.c.status == RUNNING,
        )
        .values(status=CANCELLED, stopped_by=message_id, stopped_at=at)
    )


async def _stop(
    conn: AsyncConnection,
    deadlines: Deadlines,
    episode_key: str | None,
    patient_key: str | None,
    rule: str,
    message_id: str,
    at: datetime,
) -> None:
    """The step was taken: met if in time, else late (and its deviation, once)."""
    row = await _clock_row(conn, episode_key, rule, patient_key)
    if row is None or row.stopped_at is not None or row.status == CANCELLED:
        return
    status = MET if at <= row.due_at else LATE
    await conn.execute(
        update(lus_clocks)
        .where(lus_clocks.c.id == row.id)
        .values(status=status, stopped_by=message_id, stopped_at=at)
    )
    if status == LATE and row.deviation_id is None:
        await _raise(conn, deadlines, row, at)


async def _start(
    conn: AsyncConnection,
    deadlines: Deadlines,
    pc: ProcessClock,
    message_id: str,
    patient_key: str,
    episode_key: str,
    view: BundleView,
    known: Facts,
    directory: Directory,
    received_at: datetime,
    now: datetime,
) -> None:
    start = _start_time(pc.rule, known, now)
    if start is None:
        return
    party = await _responsible(conn, pc, message_id, view, directory)
    if party is None:
        return  # nobody to owe the step (e.g. no primary care among the recipients)
    hsa_id, org = party
    town = org.municipality if org else ""
    due = deadlines.rule_for(pc.rule, town).due(start)
    row = await _clock_row(conn, episode_key, pc.rule)
    values = {
        "started_by": message_id,
        "started_at": start,
        "due_at": due,
        "stopped_by": None,
        "stopped_at": None,
        "status": RUNNING,
        "responsible_hsa_id": hsa_id,
        "municipality": town or None,
        "district": (org.district if org else "") or None,
        "deviation_id": None,
    }
    if row is None:
        await insert_ignore(
            conn,
            lus_clocks,
            {
                "id": str(uuid.uuid4()),
                "episode_key": episode_key,
                "patient_key": patient_key,
                "rule": pc.rule,
            }
            | values,
        )
    elif row.status == CANCELLED:  # started anew after a cancellation
        await conn.execute(update(lus_clocks).where(lus_clocks.c.id == row.id).values(values))
    elif pc.rule == "utskrivningsinformation" and row.status == RUNNING and row.due_at != due:
        # the planned discharge date moved: the 12:00 rule follows it
        await conn.execute(
            update(lus_clocks)
            .where(lus_clocks.c.id == row.id)
            .values(started_by=message_id, started_at=start, due_at=due)
        )
    else:
        return  # a later version does not move a clock already running or done
    if pc.rule == "inskrivningsmeddelande":  # the notice is its own stop
        await _stop(conn, deadlines, episode_key, None, pc.rule, message_id, received_at)


def _start_time(rule: str, known: Facts, now: datetime) -> datetime | None:
    """Where each clock starts (DOMAIN.md, "How the clocks count"; decision 0019)."""
    if rule == "inskrivningsmeddelande":
        return known.admitted_at or known.occurred_at
    if rule == "kallelse-sip":
        return known.ready_at or known.occurred_at
    if rule == "utskrivningsinformation":
        return known.planned_discharge
    if rule == "hemtjanst-start":
        return known.discharged_at or known.occurred_at
    return now  # fast vårdkontakt: from the admission notice's delivery


async def _responsible(
    conn: AsyncConnection,
    pc: ProcessClock,
    message_id: str,
    view: BundleView,
    directory: Directory,
) -> tuple[str, Organisation | None] | None:
    """Who owes the step: the sending ward, or the recipient of the named kind."""
    if pc.responsible == "sender":
        sender = directory.get(view.sender_hsa_id)
        place = await _municipal_place(conn, message_id, directory)
        return view.sender_hsa_id, place or sender
    rows = await conn.execute(
        select(deliveries.c.recipient_hsa_id)
        .where(deliveries.c.message_id == message_id, deliveries.c.escalated_from.is_(None))
        .order_by(deliveries.c.for_information, deliveries.c.recipient_hsa_id)
    )
    for (hsa_id,) in rows.all():  # one who must act before one told for information
        org = directory.get(hsa_id)
        if org and org.kind == pc.responsible:
            return hsa_id, org
    return None


async def _municipal_place(
    conn: AsyncConnection, message_id: str, directory: Directory
) -> Organisation | None:
    """SEAM (issue 11, `who`): the patient's municipality and district from the Bundle. Until
    then a clock the ward owes is counted where its first municipal recipient is."""
    rows = await conn.execute(
        select(deliveries.c.recipient_hsa_id).where(
            deliveries.c.message_id == message_id, deliveries.c.escalated_from.is_(None)
        )
    )
    found = [directory.get(hsa_id) for (hsa_id,) in rows.all()]
    municipal = [o for o in found if o and o.kind != "hospital" and o.municipality]
    # the narrowest place first (a district's unit), then by HSA-id: the same on both databases
    municipal.sort(key=lambda o: (not o.district, o.hsa_id))
    return municipal[0] if municipal else None


async def check_due(conn: AsyncConnection, deadlines: Deadlines, now: datetime) -> int:
    """Every running clock past its due time is late now: raise its deviation. The number."""
    rows = (
        await conn.execute(
            select(lus_clocks).where(
                and_(lus_clocks.c.status == RUNNING, lus_clocks.c.due_at <= now)
            )
        )
    ).all()
    for row in rows:
        taken = await conn.execute(  # two follow-up workers: only the one that moves it raises
            update(lus_clocks)
            .where(lus_clocks.c.id == row.id, lus_clocks.c.status == RUNNING)
            .values(status=LATE)
        )
        if taken.rowcount == 1 and row.deviation_id is None:
            await _raise(conn, deadlines, row, now)
    return len(rows)


async def _raise(conn: AsyncConnection, deadlines: Deadlines, row: Any, now: datetime) -> None:
    rule = deadlines.rule_for(row.rule, row.municipality or "")
    due = row.due_at.astimezone(clock.STOCKHOLM)
    deviation_id = await deviations.raise_deviation(
        conn,
        deviations.NewDeviation(
            message_id=row.started_by,
            delivery_id=None,
            patient_key=row.patient_key,
            kind=DEVIATION_KIND,
            responsible_hsa_id=row.responsible_hsa_id,
            municipality=row.municipality or "",
            district=row.district or "",
            summary=f"{rule.description}: tidsfristen {due:%Y-%m-%d %H:%M} överskreds",
        ),
        now,
    )
    await conn.execute(
        update(lus_clocks).where(lus_clocks.c.id == row.id).values(deviation_id=deviation_id)
    )
