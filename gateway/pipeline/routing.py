"""Routing stage: one delivery per recipient, each with the best channel the recipient has.

Recipients are the parties the message names (listed clinic, care team) whose role the
routing rules (``mappings/routing/*.toml``) say must receive this event, looked up in the
directory. A party missing from the directory becomes a failed delivery that operations can
see, never a silent drop.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.audit import AuditEntry
from gateway.bus import topics
from gateway.bus.keys import PatientKeyer
from gateway.bus.topics import Event
from gateway.directory import Directory, DirectorySource, Organisation
from gateway.directory import store as directory_store
from gateway.directory.residence import PostcodeTable, Residence, ResidenceLookup
from gateway.model.bundle import ADDRESS, LUS_NEEDS, BundleView, read_bundle
from gateway.model.consent import Decision, Outcome, decide
from gateway.model.consent import Recipient as ConsentRecipient
from gateway.model.events import LusEvent
from gateway.pipeline import clocks, gate, ledger, lus, returns
from gateway.pipeline.channels import ChannelRegistry
from gateway.pipeline.consent import announce_status, park_message
from gateway.pipeline.deadlines import DEADLINES_FILE, Deadlines
from gateway.pipeline.escalation import Escalator
from gateway.pipeline.ledger import State
from gateway.pipeline.stage import Stage
from gateway.store.db import Database
from gateway.store.sql import lock_rows
from gateway.store.tables import consents, deliveries, messages


@dataclass(frozen=True, slots=True)
class Rule:
    receivers: frozenset[str]
    for_information: frozenset[str]


@dataclass(frozen=True, slots=True)
class ContentRule:
    """Content that decides on its own who gets a message: the parties of ``receivers`` get
    any message carrying it (and must act on it); ``withheld_from`` never see it."""

    receivers: frozenset[str]
    withheld_from: frozenset[str]


class RoutingRules:
    def __init__(
        self,
        rules: dict[LusEvent, Rule],
        content: dict[str, ContentRule] | None = None,
        lasting: frozenset[str] = frozenset(),
        overrides: dict[str, dict[LusEvent, Rule]] | None = None,
        needs: dict[frozenset[str], Rule] | None = None,
        residence: dict[str, str] | None = None,
    ) -> None:
        self._rules = rules
        # role -> directory kind: the unit of that kind serving where the patient lives
        # receives in that role, whether or not the message names it ([residence])
        self.residence = residence or {}
        self.content = content or {}
        self.lasting = lasting  # roles of providers that serve the patient beyond one stay
        self._overrides = overrides or {}  # per municipality code: its own rules
        self.needs = needs or {}  # the patient's needs -> the roles still told ([needs.*])

    def by_needs(
        self, recipients: dict[str, Recipient], needs: frozenset[str]
    ) -> dict[str, Recipient]:
        """Narrow the recipients to the patient's needs after discharge (001:2604-2610):
        a role the needs' rule does not list is not told, a ``for_information`` role is
        told for information only. Needs without a rule (both) leave the recipients be."""
        rule = self.needs.get(needs)
        if rule is None:
            return recipients
        return {
            hsa_id: r if r.role in rule.receivers else dataclasses.replace(r, for_information=True)
            for hsa_id, r in recipients.items()
            if r.role in rule.receivers or r.role in rule.for_information
        }

    def rule(self, event: LusEvent, municipality: str = "") -> Rule:
        """The rule for ``event``, as the recipient's municipality has it if it has its own."""
        own = self._overrides.get(municipality, {})
        return own.get(event) or self._rules.get(event, Rule(frozenset(), frozenset()))

    def must_receive(self, role: str, contents: frozenset[str]) -> bool:
        return any(role in self.content[c].receivers for c in contents if c in self.content)

    def withheld(self, role: str, contents: frozenset[str]) -> frozenset[str]:
        """The contents of a message that a party of ``role`` must not be sent."""
        return frozenset(
            c for c in contents if c in self.content and role in self.content[c].withheld_from
        )

    @classmethod
    def load(cls, path: Path, *more: Path) -> RoutingRules:
        """The rules of ``path``; each of ``more`` (the return messages' rules,
        ``returns.toml``) adds the events it names, and may not name one twice."""
        rules = cls._load_one(path)
        for extra in more:
            added = cls._load_one(extra)
            twice = set(added._rules) & set(rules._rules)
            if twice:
                raise ValueError(f"{extra.name}: {sorted(twice)} are already in {path.name}")
            rules._rules.update(added._rules)
        return rules

    @classmethod
    def _load_one(cls, path: Path) -> RoutingRules:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        data.pop("returns", None)  # gateway/pipeline/returns.py reads it
        content = {
            name: ContentRule(
                frozenset(entry.get("receivers", [])), frozenset(entry.get("withheld_from", []))
            )
            for name, entry in data.pop("content", {}).items()
        }
        lasting = frozenset(data.pop("relations", {}).get("roles", []))
        needs = {
            frozenset(name.split("+")): Rule(
                frozenset(entry.get("receivers", [])), frozenset(entry.get("for_information", []))
            )
            for name, entry in data.pop("needs", {}).items()
        }
        for combination in needs:
            if not combination <= set(LUS_NEEDS):
                raise ValueError(f"{path.name}: [needs.{'+'.join(sorted(combination))}]: unknown")
        residence = {str(k): str(v) for k, v in data.pop("residence", {}).items()}
        overrides = {
            str(code): _event_rules(path, entries, f"municipalities.{code}.")
            for code, entries in data.pop("municipalities", {}).items()
        }
        return cls(_event_rules(path, data), content, lasting, overrides, needs, residence)


def _event_rules(path: Path, data: dict[str, Any], where: str = "") -> dict[LusEvent, Rule]:
    rules = {}
    for name, entry in data.items():
        try:
            event = LusEvent(name)
        except ValueError:
            raise ValueError(f"{path.name}: [{where}{name}] is not a LUS event") from None
        rules[event] = Rule(
            frozenset(entry.get("receivers", [])), frozenset(entry.get("for_information", []))
        )
    return rules


@dataclass(frozen=True, slots=True)
class Recipient:
    hsa_id: str
    name: str
    role: str
    for_information: bool
    unresolved: str = ""  # why no unit could be found (a failed delivery says so)


class RouteStage(Stage):
    name = "route"
    topic = topics.EVENTS
    handles = frozenset({"message.permitted"})

    def __init__(
        self,
        db: Database,
        directory: DirectorySource,
        rules: RoutingRules,
        channels: ChannelRegistry,
        keyer: PatientKeyer,
        deadlines: Deadlines | None = None,
        residence: ResidenceLookup | None = None,
    ) -> None:
        super().__init__(db)
        self.directory = directory
        self.rules = rules
        self.channels = channels
        self.keyer = keyer
        self.deadlines = deadlines or Deadlines.load(DEADLINES_FILE)
        self.residence = residence or PostcodeTable.load()
        self.escalator = Escalator(directory, channels, self.deadlines.escalation)

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        row = (
            await conn.execute(
                select(
                    messages.c.status,
                    messages.c.canonical,
                    messages.c.received_at,
                    messages.c.episode_key,
                ).where(messages.c.id == event.message_id)
            )
        ).one()
        if row.status != "permitted":
            return
        bundle = json.loads(row.canonical)
        view = read_bundle(bundle)
        directory = await self.directory.current(conn)
        recipients = await self._with_relations(
            conn, key, event.message_id, view, directory, bool(row.episode_key)
        )
        if returns.is_return(bundle):
            # A party's message answers the stay; it supersedes nothing of the hospital's.
            for hsa_id, role in returns.named_recipients(bundle):
                org = directory.get(hsa_id)
                recipients.setdefault(
                    hsa_id, Recipient(hsa_id, org.name if org else "", role, False)
                )
        else:
            # the municipality found from the patient's address first: the needs decide too
            recipients = await self._with_residence(view, directory, recipients)
            needs = await lus.needs_of(
                conn, view, key, event.message_id, row.episode_key, row.received_at
            )
            recipients = self.rules.by_needs(recipients, needs)
        if row.episode_key and not returns.is_return(bundle):
            recipients = await self._with_episode(
                conn, event.message_id, row.episode_key, view.event, recipients
            )
        if view.event is LusEvent.PATIENTSAMMANSLAGNING:
            recipients = await self._merge(conn, event.message_id, key, view, recipients)
        now = clock.now()
        records = await gate.records_for(conn, key)
        outcomes: dict[Outcome, str] = {}  # each outcome with the first reason given for it
        entries: list[AuditEntry] = []  # the gate's decisions, recorded last (the chain's lock)
        for recipient in recipients.values():
            decision = decide(
                records,
                ConsentRecipient(recipient.hsa_id, recipient.role),
                gate.PURPOSE,
                now,
                row.episode_key,
            )
            outcomes.setdefault(decision.outcome, decision.reason)
            await self._deliver_to(
                conn,
                event.message_id,
                key,
                recipient,
                row.received_at,
                now,
                decision,
                view,
                directory,
                entries,
            )
        # A party's return message goes back to the ward too (over the receipts path), so
        # it is routed even when no other party must know.
        status, reason = _status(outcomes, bool(recipients) or returns.to_ward(bundle))
        summary = _summary(outcomes)
        await conn.execute(
            update(messages)
            .where(messages.c.id == event.message_id)
            .values(
                status=status,
                occurred_at=view.occurred_at,
                consent_decision=summary.value if summary else None,
                consent_reason=outcomes[summary] if summary else None,
                updated_at=now,
            )
        )
        await clocks.after_routing(  # decision 0019: on-call at once, kvittens, process clocks
            conn,
            self.escalator,
            self.deadlines,
            event.message_id,
            key,
            row.episode_key,
            bundle,
            view,
            directory,
            now,
            entries,
        )
        await announce_status(conn, key, event.message_id, status, reason)
        await audit.record_many(conn, entries)

    async def _with_relations(
        self,
        conn: AsyncConnection,
        key: str,
        message_id: str,
        view: BundleView,
        directory: Directory,
        stay: bool,
    ) -> dict[str, Recipient]:
        """The parties the rules select, plus (for a message of a stay, not a referral) the
        providers the directory knows serve the patient in a role the rules select but the
        message leaves out: the night home-care provider is often missing from a discharge
        message. What the message names is remembered for the next one."""
        named = [p for p in view.parties if p.hsa_id != view.sender_hsa_id]
        await directory_store.remember(conn, key, named, message_id)
        chosen = self._by_rule(view, directory)
        if not stay:
            return chosen
        for role, hsa_id in await directory_store.providers(conn, key):
            if hsa_id in chosen or hsa_id == view.sender_hsa_id:
                continue
            rule = self._rule(view.event, hsa_id, directory)
            if role in self.rules.lasting and (
                role in rule.receivers or role in rule.for_information
            ):
                chosen[hsa_id] = Recipient(hsa_id, "", role, role not in rule.receivers)
        return chosen

    def _rule(self, event: LusEvent, hsa_id: str, directory: Directory) -> Rule:
        """The event's rule for this party: its municipality's own, if it has one."""
        org = directory.get(hsa_id)
        return self.rules.rule(event, org.municipality if org else "")

    def _by_rule(self, view: BundleView, directory: Directory) -> dict[str, Recipient]:
        """The parties the message names whose role the rules (of the party's municipality,
        if it has its own) select for this event, or whom its content must reach (a
        medication list reaches the nurses)."""
        chosen: dict[str, Recipient] = {}
        for party in view.parties:
            if party.hsa_id in chosen or party.hsa_id == view.sender_hsa_id:
                continue
            rule = self._rule(view.event, party.hsa_id, directory)
            must = party.role in rule.receivers or self.rules.must_receive(
                party.role, view.contents
            )
            if must or party.role in rule.for_information:
                chosen[party.hsa_id] = Recipient(party.hsa_id, party.name, party.role, not must)
        return chosen

    async def _with_residence(
        self, view: BundleView, directory: Directory, recipients: dict[str, Recipient]
    ) -> dict[str, Recipient]:
        """Add the municipal units that serve where the patient lives (``[residence]`` in the
        routing rules: the needs assessment of the municipality, or of the Stockholm city
        district), found from the folkbokföringsadress, not from the message's ROL
        (decision 0016). A unit the message names as well is told once. An address that
        cannot be placed, or a place without such a unit, is a failed delivery with the
        reason (unless the message names a unit in the role), never a silent drop. A
        message without an address is routed by what it names, as before; so is a referral,
        which is addressed to the provider it names."""
        if view.address is None or view.referral or not self.rules.residence:
            return recipients
        place = await self.residence.locate(view.patient_identifier, view.address)
        chosen = dict(recipients)
        named = {r.role for r in recipients.values()}
        rule = self.rules.rule(view.event, place.municipality if place else "")
        for role, kind in sorted(self.rules.residence.items()):
            if role not in rule.receivers and role not in rule.for_information:
                continue
            info = role not in rule.receivers
            org = directory.serving(kind, place.municipality, place.district) if place else None
            if org is not None:
                if org.hsa_id != view.sender_hsa_id:
                    chosen.setdefault(org.hsa_id, Recipient(org.hsa_id, org.name, role, info))
            elif role not in named:  # nobody in the role would be told: say so
                chosen.update([_unresolved(role, info, place)])
        return chosen

    async def _with_episode(
        self,
        conn: AsyncConnection,
        message_id: str,
        episode_key: str,
        event: LusEvent,
        recipients: dict[str, Recipient],
    ) -> dict[str, Recipient]:
        """Link the message to its care episode.

        A newer version of an event reaches everyone who had an earlier one, and the earlier
        notices are marked superseded. A cancellation goes to those who received what it
        retracts (or, if nobody did, to whom the rules say) and marks those notices retracted.
        """
        earlier_event = event.retracts or event
        earlier = (
            await conn.execute(
                select(
                    deliveries.c.id,
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.recipient_name,
                    deliveries.c.role,
                    deliveries.c.for_information,
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(
                    messages.c.episode_key == episode_key,
                    messages.c.event == earlier_event.value,
                    messages.c.id != message_id,
                    deliveries.c.state != State.FAILED.value,
                    deliveries.c.retracted_by.is_(None),
                )
                .order_by(deliveries.c.created_at)
            )
        ).all()
        if not earlier:
            return recipients
        marker = "retracted_by" if event.retracts else "superseded_by"
        await lock_rows(conn, deliveries, [d.id for d in earlier])
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_([d.id for d in earlier]), deliveries.c[marker].is_(None))
            .values({marker: message_id})
        )
        merged = {} if event.retracts else dict(recipients)
        for d in earlier:
            merged.setdefault(
                d.recipient_hsa_id,
                Recipient(d.recipient_hsa_id, d.recipient_name, d.role, d.for_information),
            )
        return merged

    async def _merge(
        self,
        conn: AsyncConnection,
        message_id: str,
        key: str,
        view: BundleView,
        recipients: dict[str, Recipient],
    ) -> dict[str, Recipient]:
        """Join the prior identity's history to this patient, and tell whoever knew it.

        The messages stored under the replaced identity (a reservnummer, a samordningsnummer)
        are moved to the surviving patient's key, so later versions, cancellations and
        deadlines see one history. The merge notice goes, for information, to every party
        that received a notice about either identity (plus whom the rules name).
        """
        prior = [self.keyer.key(system, value) for system, value in view.prior_identifiers]
        if prior:
            await directory_store.merge(conn, prior, key)
            for table in (messages, consents):
                await conn.execute(
                    update(table)
                    .where(table.c.patient_key.in_(prior))
                    .values(patient_key=key, updated_at=clock.now())
                )
        known = (
            await conn.execute(
                select(
                    deliveries.c.recipient_hsa_id, deliveries.c.recipient_name, deliveries.c.role
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(
                    messages.c.patient_key == key,
                    messages.c.id != message_id,
                    deliveries.c.state != State.FAILED.value,
                )
                .order_by(deliveries.c.created_at)
            )
        ).all()
        merged = dict(recipients)
        for d in known:
            merged.setdefault(
                d.recipient_hsa_id, Recipient(d.recipient_hsa_id, d.recipient_name, d.role, True)
            )
        return merged

    async def _deliver_to(
        self,
        conn: AsyncConnection,
        message_id: str,
        key: str,
        recipient: Recipient,
        received_at: datetime,
        now: datetime,
        decision: Decision,
        view: BundleView,
        directory: Directory,
        audit_later: list[AuditEntry],
    ) -> None:
        protected_identity = view.protected_identity
        org = directory.get(recipient.hsa_id)
        channel = self.channels.best(org.channels, protected_identity) if org else None
        delivery_id = str(uuid.uuid4())
        due_at = (
            None
            if recipient.for_information
            else self._receipt_due(view.event, org, now, directory)
        )
        await conn.execute(
            deliveries.insert().values(
                id=delivery_id,
                message_id=message_id,
                recipient_hsa_id=recipient.hsa_id,
                # A party missing from the directory is named by HSA-id only: the name the
                # message gives is patient-related text and stays in the encrypted message.
                recipient_name=org.name if org else recipient.hsa_id,
                role=recipient.role,
                for_information=recipient.for_information,
                channel=channel,
                state=State.ACCEPTED.value,
                municipality=org.municipality or None if org else None,
                district=org.district or None if org else None,
                attempts=0,
                due_rule=self._receipt_rule(view.event) if due_at else None,
                due_at=due_at,
                escalation_level=0,
                withheld=",".join(sorted(self._withheld(recipient.role, view))) or None,
                created_at=now,
                updated_at=now,
            )
        )
        await ledger.record(conn, delivery_id, message_id, key, State.ACCEPTED, at=received_at)
        if channel is None:
            if recipient.unresolved:
                reason = recipient.unresolved
            elif org is None:
                reason = "Mottagaren finns inte i katalogen"
            elif protected_identity and self.channels.best(org.channels):
                reason = "Skyddad identitet: mottagaren saknar en kanal godkänd för det"
            else:
                reason = "Mottagaren saknar en kanal som gatewayen kan leverera till"
            await ledger.record(
                conn, delivery_id, message_id, key, State.FAILED, detail=reason, at=now
            )
            await _check_at(conn, delivery_id, now)  # a failed delivery escalates at once
            return
        await gate.apply(conn, decision, delivery_id, message_id, key, audit_later)
        if decision.outcome is Outcome.HOLD and due_at is not None:
            await _check_at(conn, delivery_id, due_at)  # held past its deadline: escalate

    def _withheld(self, role: str, view: BundleView) -> frozenset[str]:
        """What a recipient of ``role`` is not sent: its role's rule, and for a protected
        identity the address, from everyone (decision 0016)."""
        withheld = self.rules.withheld(role, view.contents)
        if view.protected_identity and ADDRESS in view.contents:
            withheld |= {ADDRESS}
        return withheld

    def _receipt_due(
        self, event: LusEvent, org: Organisation | None, now: datetime, directory: Directory
    ) -> datetime | None:
        """When the recipient's receipt is due (decision 0019); for a party's return message,
        by the rule of the deadlines that returns.toml names."""
        due = clocks.receipt_due(self.deadlines, event, org, now)
        name = returns.rules().receipts.get(event.value)
        if due is None and name is not None:
            return self.deadlines.rule_for(name, org.municipality if org else "").due(now)
        return due

    def _receipt_rule(self, event: LusEvent) -> str | None:
        """The clock of a receipt: the deadlines' rule, or for a party's return message the
        one returns.toml names (a rule of the deadlines)."""
        return self.deadlines.receipts.get(event.value) or returns.rules().receipts.get(event.value)

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        await park_message(conn, event.message_id)


def _unresolved(role: str, info: bool, place: Residence | None) -> tuple[str, Recipient]:
    """A recipient for a role nobody could be found for where the patient lives, named by
    role and place only (a municipality code and district are no patient data on their own;
    the statistics carry them too); the address is never named."""
    if place is None:
        where = "okänd"
        reason = "Patientens kommun kunde inte bestämmas ur folkbokföringsadressen"
    else:
        where = "/".join(p for p in (place.municipality, place.district) if p)
        reason = f"Ingen enhet för {role} i katalogen för kommun {where}"
    hsa_id = f"{role}@{where}"
    return hsa_id, Recipient(hsa_id, "", role, info, reason)


async def _check_at(conn: AsyncConnection, delivery_id: str, when: datetime) -> None:
    await conn.execute(
        update(deliveries).where(deliveries.c.id == delivery_id).values(next_check_at=when)
    )


def _summary(outcomes: dict[Outcome, str]) -> Outcome | None:
    """The gate's decisions for the message as a whole: permit if anyone may be told."""
    return next((o for o in (Outcome.PERMIT, Outcome.HOLD, Outcome.DENY) if o in outcomes), None)


def _status(outcomes: dict[Outcome, str], any_recipient: bool) -> tuple[str, str]:
    """The message's status after routing, and what the sender is told."""
    if not any_recipient:
        return "unroutable", "Ingen mottagare i meddelandet motsvarar fördelningsreglerna"
    if Outcome.PERMIT in outcomes or not outcomes:
        return "routed", ""
    if Outcome.HOLD in outcomes:
        return "held", outcomes[Outcome.HOLD]
    return "denied", outcomes[Outcome.DENY]
