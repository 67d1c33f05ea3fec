"""Escalation: telling the next person in the chain when a receipt is late or a delivery failed.

Each step of the chain (``mappings/deadlines/lus.toml``, ``[escalation]``) names a party: the
recipient's on-call unit, its municipality's MAS, or the sending ward. The step sends that
party the same message (a delivery with role ``eskalering``, through the gate and the party's
own channels) and records the step on the late delivery. The first step also raises a
deviation (:mod:`gateway.pipeline.deviations`). A delivery held for want of consent cannot be
shown to anyone else: it escalates to the sending ward's deviation inbox only, since only the
ward can record the consent or the menprövning.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.audit import AuditEntry
from gateway.directory import Directory, DirectorySource, Organisation
from gateway.model.bundle import read_bundle
from gateway.model.consent import Recipient
from gateway.pipeline import deviations, gate, ledger
from gateway.pipeline.channels import ChannelRegistry
from gateway.pipeline.deadlines import Escalation
from gateway.pipeline.delivery import record_attempt
from gateway.pipeline.ledger import State
from gateway.store.sql import insert_ignore
from gateway.store.tables import deliveries, messages

ROLE = "eskalering"
ON_CALL_ROLE = "jour"  # a notice for a closed unit, sent to its on-call unit at once


@dataclass(frozen=True, slots=True)
class Late:
    """A delivery that escalates, and what the escalator needs to know about it."""

    id: str
    message_id: str
    patient_key: str
    episode_key: str | None
    recipient: Organisation | None
    recipient_hsa_id: str
    recipient_name: str
    role: str
    state: State
    level: int
    due_at: datetime | None
    sender_hsa_id: str
    event: str
    protected_identity: bool
    directory: Directory  # as it was when the step was taken
    withheld: str | None = None  # what the late recipient is not sent: nor is who acts for it


class Escalator:
    def __init__(
        self, directory: DirectorySource, channels: ChannelRegistry, escalation: Escalation
    ) -> None:
        self.directory = directory
        self.channels = channels
        self.chain = escalation.chain

    async def next_channel(
        self, conn: AsyncConnection, hsa_id: str, message_id: str, current: str | None
    ) -> str | None:
        """The recipient's next channel after ``current`` that this gateway can use (and, for
        a patient with protected identity, one approved for it)."""
        org = (await self.directory.current(conn)).get(hsa_id)
        if org is None or current not in org.channels:
            return None
        rest = org.channels[org.channels.index(current) + 1 :]
        if not rest:
            return None
        return self.channels.best(rest, await _protected(conn, message_id))

    async def fail(
        self,
        conn: AsyncConnection,
        delivery_id: str,
        message_id: str,
        patient_key: str,
        channel: str,
        now: datetime,
    ) -> None:
        """No channel is left: the delivery failed, which is now its deadline."""
        await ledger.record(
            conn,
            delivery_id,
            message_id,
            patient_key,
            State.FAILED,
            detail=f"Ingen mottagningskvittens via {channel}, och ingen kanal kvar att försöka",
            at=now,
        )
        await conn.execute(
            update(deliveries).where(deliveries.c.id == delivery_id).values(due_at=now)
        )

    async def escalate(self, conn: AsyncConnection, delivery_id: str, now: datetime) -> None:
        late = await self._late(conn, delivery_id)
        if late.level == 0:
            await self._raise_deviation(conn, late, now)
        if late.state is State.HELD:  # nobody else may see it; the deviation told the ward
            await self._step_done(conn, late, len(self.chain), "ward", late.sender_hsa_id, now)
            return
        level = late.level
        while level < len(self.chain):
            step = self.chain[level]
            level += 1
            target = self._target(step, late)
            later: list[AuditEntry] = []  # the gate's entry, recorded with the step's, last
            if target and await self._send(conn, late, target, now, later):
                await self._step_done(conn, late, level, step, target, now, later)
                return
        await self._step_done(conn, late, level, "", "", now)  # nobody left to tell

    async def to_on_call(
        self, conn: AsyncConnection, delivery_id: str, now: datetime, audit_later: list[AuditEntry]
    ) -> bool:
        """The unit is closed now: send the notice to its on-call unit at once (decision
        0019). At the deadline the chain finds the on-call unit told already and goes on to
        the next step; the deviation is raised then as before. False if there is none."""
        late = await self._late(conn, delivery_id)
        target = late.recipient.on_call if late.recipient else ""
        if not target or not await self._send(conn, late, target, now, audit_later, ON_CALL_ROLE):
            return False
        org = late.directory.get(target)
        await record_attempt(
            conn,
            delivery_id,
            "",
            0,
            "on-call",
            f"Enheten är stängd: skickat till jouren {org.name if org else target} direkt",
            now,
        )
        return True

    def _target(self, step: str, late: Late) -> str:
        if step == "ward":
            return late.sender_hsa_id
        if late.recipient is None:
            return ""
        if step == "on-call":
            return late.recipient.on_call
        town = late.directory.municipality(late.recipient.municipality)
        return town.mas if town else ""

    async def _send(
        self,
        conn: AsyncConnection,
        late: Late,
        target: str,
        now: datetime,
        audit_later: list[AuditEntry],
        role: str = ROLE,
    ) -> bool:
        """A delivery of the message to ``target``; False if it already has one."""
        if target == late.recipient_hsa_id:
            return False
        org = late.directory.get(target)
        channel = self.channels.best(org.channels, late.protected_identity) if org else None
        if org is None or channel is None:
            return False
        escalation_id = str(uuid.uuid4())
        created = await insert_ignore(
            conn,
            deliveries,
            {
                "id": escalation_id,
                "message_id": late.message_id,
                "recipient_hsa_id": target,
                "recipient_name": org.name,
                "role": role,
                "for_information": False,
                "channel": channel,
                "state": State.ACCEPTED.value,
                "municipality": org.municipality or None,
                "district": org.district or None,
                "attempts": 0,
                "escalation_level": 0,
                "escalated_from": late.id,
                # the party acts for the late recipient: what that one is not sent (content
                # of its role, a protected identity's address), it is not sent either
                "withheld": late.withheld,
                "created_at": now,
                "updated_at": now,
            },
        )
        if not created:
            return False
        await ledger.record(
            conn,
            escalation_id,
            late.message_id,
            late.patient_key,
            State.ACCEPTED,
            detail=f"Jour: {late.recipient_name} är stängd"
            if role == ON_CALL_ROLE
            else f"Eskalering: {late.recipient_name} har inte kvitterat",
            at=now,
        )
        # The party acts for the late recipient: the gate judges it in that recipient's role.
        decision = await gate.decide_for(
            conn, late.patient_key, late.episode_key, Recipient(target, late.role), now
        )
        await gate.apply(
            conn, decision, escalation_id, late.message_id, late.patient_key, audit_later
        )
        return True

    async def _step_done(
        self,
        conn: AsyncConnection,
        late: Late,
        level: int,
        step: str,
        target: str,
        now: datetime,
        audit_earlier: Sequence[AuditEntry] = (),
    ) -> None:
        await conn.execute(
            update(deliveries).where(deliveries.c.id == late.id).values(escalation_level=level)
        )
        org = late.directory.get(target)
        name = org.name if org else target
        detail = (
            f"Eskalerad ({_STEPS.get(step, step)}) till {name}"
            if target
            else "Ingen att eskalera till: se avvikelsen"
        )
        await record_attempt(conn, late.id, "", level, "escalated", detail, now)
        await audit.record_many(  # last in the transaction: the chain's lock
            conn,
            [
                *audit_earlier,
                AuditEntry(
                    actor="followup",
                    actor_org="",
                    role=audit.SYSTEM_ROLE,
                    action="delivery.escalated",
                    purpose=audit.PURPOSE_LUS,
                    patient_key=late.patient_key,
                    subject=late.id,
                    detail=f"nivå {level}: {step or '-'} {target}",
                ),
            ],
        )

    async def _raise_deviation(self, conn: AsyncConnection, late: Late, now: datetime) -> None:
        if late.state is State.HELD:
            kind, responsible = "held-past-deadline", late.sender_hsa_id
            what = "hölls i väntan på samtycke eller menprövning när tidsfristen gick ut"
        elif late.state is State.FAILED:
            kind, responsible = "delivery-failed", self._deviation_inbox(late)
            what = "kunde inte levereras i någon av mottagarens kanaler"
        else:
            kind, responsible = "missed-receipt", self._deviation_inbox(late)
            due = late.due_at.astimezone(clock.STOCKHOLM) if late.due_at else now
            what = f"kvitterades inte före {due:%Y-%m-%d %H:%M}"
        town = late.recipient.municipality if late.recipient else ""
        district = late.recipient.district if late.recipient else ""
        await deviations.raise_deviation(
            conn,
            deviations.NewDeviation(
                message_id=late.message_id,
                delivery_id=late.id,
                patient_key=late.patient_key,
                kind=kind,
                responsible_hsa_id=responsible,
                municipality=town,
                district=district,
                summary=f"{late.event} till {_label(late)} {what}",
            ),
            now,
        )

    def _deviation_inbox(self, late: Late) -> str:
        """The municipality's deviation inbox for a municipal recipient; else the ward."""
        town = late.directory.municipality(late.recipient.municipality) if late.recipient else None
        return (town.deviations or town.mas) if town else late.sender_hsa_id

    async def _late(self, conn: AsyncConnection, delivery_id: str) -> Late:
        row = (
            await conn.execute(
                select(
                    deliveries.c.message_id,
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.role,
                    deliveries.c.state,
                    deliveries.c.escalation_level,
                    deliveries.c.due_at,
                    deliveries.c.withheld,
                    messages.c.patient_key,
                    messages.c.episode_key,
                    messages.c.canonical,
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.id == delivery_id)
            )
        ).one()
        view = read_bundle(json.loads(row.canonical))
        directory = await self.directory.current(conn)
        recipient = directory.get(row.recipient_hsa_id)
        return Late(
            id=delivery_id,
            message_id=row.message_id,
            patient_key=row.patient_key,
            episode_key=row.episode_key,
            recipient=recipient,
            recipient_hsa_id=row.recipient_hsa_id,
            # the directory's name, never one a message gave (decision 0012)
            recipient_name=recipient.name if recipient else row.recipient_hsa_id,
            role=row.role,
            state=State(row.state),
            level=row.escalation_level,
            due_at=row.due_at,
            sender_hsa_id=view.sender_hsa_id,
            event=view.event.display,
            protected_identity=view.protected_identity,
            directory=directory,
            withheld=row.withheld,
        )


_STEPS = {"on-call": "jour", "mas": "MAS", "ward": "avsändande avdelning"}


async def _protected(conn: AsyncConnection, message_id: str) -> bool:
    canonical = (
        await conn.execute(select(messages.c.canonical).where(messages.c.id == message_id))
    ).scalar_one()
    return read_bundle(json.loads(canonical)).protected_identity


def _label(late: Late) -> str:
    """The recipient as a deviation names it: the directory's name and HSA-id, or the
    HSA-id alone for a party the directory does not know."""
    if late.recipient_name == late.recipient_hsa_id:
        return late.recipient_hsa_id
    return f"{late.recipient_name} ({late.recipient_hsa_id})"
