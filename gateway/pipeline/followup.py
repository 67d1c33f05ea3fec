"""Follow-up: what happens to a delivery that is not receipted in time.

A delivery sent by a channel with application receipts (FHIR, HL7 v2) and not receipted is
resent after ``resend_after`` (30 minutes, as MedCom does), at most ``max_resends`` times,
then falls back to the next channel in the recipient's list (FHIR → HL7 v2 → inbox → fax
→ letter). A delivery whose receipt clock (``deliveries.due_at``, set at routing from
``mappings/deadlines/``) runs out escalates along the configured chain, one step each
``step`` hours, and its first escalation raises a deviation. A delivery held for consent
escalates the same way at its deadline.

:func:`plan` decides, without I/O; :class:`FollowUp` is the loop that asks it about every
delivery whose ``next_check_at`` has come, and carries out its answer. Time comes from
:mod:`gateway.clock`, so tests move it instead of waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.logs import error_fields
from gateway.pipeline import clocks, escalation
from gateway.pipeline.channels import ChannelRegistry
from gateway.pipeline.deadlines import DEADLINES_FILE, Deadlines, Escalation
from gateway.pipeline.delivery import attempt_event, record_attempt
from gateway.pipeline.ledger import State
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, messages

log = structlog.get_logger("brygga.followup")
LIMIT = 200


class Action(StrEnum):
    RESEND = "resend"
    FALLBACK = "fallback"
    FAIL = "fail"  # no channel left: the delivery failed, and that escalates at once
    ESCALATE = "escalate"


@dataclass(frozen=True, slots=True)
class Policy:
    resend_after: timedelta = timedelta(minutes=30)
    max_resends: int = 2
    escalation: Escalation = Escalation()


@dataclass(frozen=True, slots=True)
class Situation:
    """What the ledger knows of one delivery."""

    state: State
    application_receipts: bool  # does its current channel answer with an application receipt?
    attempts: int  # sends on the current channel
    last_attempt_at: datetime | None
    last_outcome: str  # of the last attempt on this channel: delivered, unavailable, rejected…
    due_at: datetime | None
    escalation_level: int
    has_fallback: bool  # is there another channel after the current one?
    needs_person: bool = False  # does its receipt clock run until a person's kvittens?


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    next_check_at: datetime | None


def receipted(state: State, application_receipts: bool, needs_person: bool = False) -> bool:
    """Has the recipient receipted? Its system's application receipt, or a person's kvittens
    in the inbox (reading alone is not a kvittens). Where the routine asks for a kvittens
    (``needs_person``), an application receipt proves delivery only (decision 0019)."""
    if state is State.ACKNOWLEDGED:
        return True
    return application_receipts and not needs_person and state in (State.RECEIVED, State.READ)


def plan(s: Situation, now: datetime, policy: Policy) -> Plan:
    """What to do now about a delivery, and when to look at it again."""
    actions: list[Action] = []
    later: list[datetime] = []
    if s.state is State.DENIED or s.state is State.PARKED:
        return Plan((), None)
    done = receipted(s.state, s.application_receipts, s.needs_person)
    # Sent and not yet taken (still routed), or taken by a channel that owes a receipt.
    waiting = s.state is State.ROUTED or (
        s.state is State.DELIVERED
        and s.application_receipts
        and not receipted(s.state, s.application_receipts)
    )
    if waiting and s.last_attempt_at is not None:
        resend_at = s.last_attempt_at + policy.resend_after
        if s.last_outcome == "rejected" or s.attempts > policy.max_resends:
            actions.append(Action.FALLBACK if s.has_fallback else Action.FAIL)
        elif now < resend_at:
            later.append(resend_at)
        else:
            actions.append(Action.RESEND)
    chain = policy.escalation
    if Action.FAIL in actions or s.state is State.FAILED:
        if s.escalation_level == 0:  # a failed delivery escalates at once, once
            actions.append(Action.ESCALATE)
    elif not done and s.due_at is not None and s.escalation_level < len(chain.chain):
        # Late: the first step at the deadline, each next one a step later.
        step_at = s.due_at + chain.step * s.escalation_level
        if now < step_at:
            later.append(step_at)
        else:
            actions.append(Action.ESCALATE)
            if s.escalation_level + 1 < len(chain.chain):  # each step has its full time
                later.append(now + chain.step)
    return Plan(tuple(actions), min(later) if later else None)


class FollowUp:
    """The loop: every ``interval`` seconds, act on the deliveries whose time has come."""

    def __init__(
        self,
        db: Database,
        channels: ChannelRegistry,
        escalations: escalation.Escalator,
        policy: Policy,
        interval_seconds: float = 5.0,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.db = db
        self.channels = channels
        self.escalations = escalations
        self.policy = policy
        self.interval = interval_seconds
        self.deadlines = deadlines or Deadlines.load(DEADLINES_FILE)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                count = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again next round
                log.warning("followup.retry", **error_fields(exc))
                continue
            if count:
                log.info("followup.acted", deliveries=count)

    async def run_once(self) -> int:
        """Act on every delivery due now, and on every process clock run out (decision
        0019); the number acted on."""
        now = clock.now()
        async with self.db.transaction() as conn:
            late_clocks = await clocks.check_due(conn, self.deadlines, now)
        async with self.db.read() as conn:
            due = list(
                (
                    await conn.execute(
                        select(deliveries.c.id)
                        .where(deliveries.c.next_check_at <= now)
                        .order_by(deliveries.c.next_check_at)
                        .limit(LIMIT)
                    )
                ).scalars()
            )
        for delivery_id in due:
            async with self.db.transaction() as conn:
                await self._follow(conn, delivery_id, now)
        return len(due) + late_clocks

    async def _follow(self, conn: AsyncConnection, delivery_id: str, now: datetime) -> None:
        query = (
            select(
                deliveries.c.id,
                deliveries.c.message_id,
                deliveries.c.recipient_hsa_id,
                deliveries.c.channel,
                deliveries.c.state,
                deliveries.c.attempts,
                deliveries.c.due_at,
                deliveries.c.due_rule,
                deliveries.c.escalation_level,
                deliveries.c.next_check_at,
                deliveries.c.superseded_by,
                deliveries.c.retracted_by,
                messages.c.patient_key,
            )
            .join(messages, messages.c.id == deliveries.c.message_id)
            .where(deliveries.c.id == delivery_id)
        )
        if conn.dialect.name == "postgresql":  # two workers never act on one delivery at once
            query = query.with_for_update(of=deliveries, skip_locked=True)
        row = (await conn.execute(query)).one_or_none()
        if row is None or row.next_check_at is None or row.next_check_at > now:
            return  # another worker took it, or it moved on since
        if row.superseded_by or row.retracted_by:  # the newer version (or the cancellation)
            await conn.execute(  # carries the obligation now, with a clock of its own
                update(deliveries).where(deliveries.c.id == delivery_id).values(next_check_at=None)
            )
            return
        channel = self.channels.get(row.channel) if row.channel else None
        last = (
            await conn.execute(
                select(delivery_attempts.c.at, delivery_attempts.c.outcome)
                .where(
                    delivery_attempts.c.delivery_id == delivery_id,
                    delivery_attempts.c.channel == (row.channel or ""),
                )
                .order_by(delivery_attempts.c.id.desc())
                .limit(1)
            )
        ).one_or_none()
        situation = Situation(
            state=State(row.state),
            application_receipts=bool(channel and channel.application_receipts),
            attempts=row.attempts,
            last_attempt_at=last.at if last else None,
            last_outcome=last.outcome if last else "",
            due_at=row.due_at,
            escalation_level=row.escalation_level,
            has_fallback=True,
            needs_person=self.deadlines.needs_person(row.due_rule),
        )
        decided = plan(situation, now, self.policy)
        fallback = None
        if Action.FALLBACK in decided.actions:  # only now worth finding (it reads the message)
            fallback = await self.escalations.next_channel(
                conn, row.recipient_hsa_id, row.message_id, row.channel
            )
            if fallback is None:
                decided = plan(replace(situation, has_fallback=False), now, self.policy)
        sending = Action.RESEND in decided.actions or fallback is not None
        values: dict[str, object] = {
            # A send asks the deliver stage, which sets the next look; this one is for an
            # event lost on the way.
            "next_check_at": now + self.policy.resend_after if sending else decided.next_check_at
        }
        if fallback is not None:
            values |= {"channel": fallback, "attempts": 0, "updated_at": now}
            await record_attempt(
                conn,
                delivery_id,
                row.channel,
                row.attempts,
                "fallback",
                f"Ingen mottagningskvittens via {row.channel} efter {row.attempts} "
                f"försök: skickas via {fallback}",
                now,
            )
        await conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(values))
        for action in decided.actions:
            if action is Action.RESEND:
                await attempt_event(
                    conn,
                    row.patient_key,
                    row.message_id,
                    delivery_id,
                    row.channel,
                    row.attempts + 1,
                )
            elif action is Action.FALLBACK:
                assert fallback is not None
                await attempt_event(conn, row.patient_key, row.message_id, delivery_id, fallback, 1)
            elif action is Action.FAIL:
                await self.escalations.fail(
                    conn, delivery_id, row.message_id, row.patient_key, row.channel, now
                )
            elif action is Action.ESCALATE:
                await self.escalations.escalate(conn, delivery_id, now)
