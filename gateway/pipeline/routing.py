"""Routing stage: one delivery per recipient, each with the best channel the recipient has.

Recipients are the parties the message names (listed clinic, care team) whose role the
routing rules (``mappings/routing/*.toml``) say must receive this event, looked up in the
directory. A party missing from the directory becomes a failed delivery that operations can
see, never a silent drop.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.directory import Directory
from gateway.model.bundle import read_bundle
from gateway.model.events import LusEvent
from gateway.pipeline import ledger
from gateway.pipeline.channels import ChannelRegistry
from gateway.pipeline.consent import park_message
from gateway.pipeline.ledger import State
from gateway.pipeline.stage import Stage
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages


@dataclass(frozen=True, slots=True)
class Rule:
    receivers: frozenset[str]
    for_information: frozenset[str]


class RoutingRules:
    def __init__(self, rules: dict[LusEvent, Rule]) -> None:
        self._rules = rules

    def rule(self, event: LusEvent) -> Rule:
        return self._rules.get(event, Rule(frozenset(), frozenset()))

    @classmethod
    def load(cls, path: Path) -> RoutingRules:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        rules = {}
        for name, entry in data.items():
            try:
                event = LusEvent(name)
            except ValueError:
                raise ValueError(f"{path.name}: [{name}] is not a LUS event") from None
            rules[event] = Rule(
                frozenset(entry.get("receivers", [])), frozenset(entry.get("for_information", []))
            )
        return cls(rules)


def delivery_event(message_id: str, delivery_id: str) -> Event:
    return Event(
        id=f"delivery.requested:{delivery_id}",
        type="delivery.requested",
        message_id=message_id,
        delivery_id=delivery_id,
    )


class RouteStage(Stage):
    name = "route"
    topic = topics.EVENTS
    handles = frozenset({"message.permitted"})

    def __init__(
        self, db: Database, directory: Directory, rules: RoutingRules, channels: ChannelRegistry
    ) -> None:
        super().__init__(db)
        self.directory = directory
        self.rules = rules
        self.channels = channels

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        row = (
            await conn.execute(
                select(messages.c.status, messages.c.canonical, messages.c.received_at).where(
                    messages.c.id == event.message_id
                )
            )
        ).one()
        if row.status != "permitted":
            return
        view = read_bundle(json.loads(row.canonical))
        rule = self.rules.rule(view.event)
        now = clock.now()
        seen: set[str] = set()
        for party in view.parties:
            if party.hsa_id in seen or party.hsa_id == view.sender_hsa_id:
                continue
            if party.role not in rule.receivers and party.role not in rule.for_information:
                continue
            seen.add(party.hsa_id)
            org = self.directory.get(party.hsa_id)
            channel = self.channels.best(org.channels) if org else None
            delivery_id = str(uuid.uuid4())
            await conn.execute(
                deliveries.insert().values(
                    id=delivery_id,
                    message_id=event.message_id,
                    recipient_hsa_id=party.hsa_id,
                    recipient_name=org.name if org else party.name or party.hsa_id,
                    role=party.role,
                    for_information=party.role not in rule.receivers,
                    channel=channel,
                    state=State.ACCEPTED.value,
                    created_at=now,
                    updated_at=now,
                )
            )
            await ledger.record(
                conn, delivery_id, event.message_id, key, State.ACCEPTED, at=row.received_at
            )
            if channel is None:
                reason = (
                    "Mottagaren finns inte i katalogen"
                    if org is None
                    else "Mottagaren saknar en kanal som gatewayen kan leverera till"
                )
                await ledger.record(
                    conn, delivery_id, event.message_id, key, State.FAILED, detail=reason, at=now
                )
                continue
            await ledger.record(conn, delivery_id, event.message_id, key, State.ROUTED, at=now)
            await enqueue(
                conn, topics.DELIVERIES, key, delivery_event(event.message_id, delivery_id)
            )
        await conn.execute(
            update(messages)
            .where(messages.c.id == event.message_id)
            .values(status="routed" if seen else "unroutable", updated_at=now)
        )

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        await park_message(conn, event.message_id)
