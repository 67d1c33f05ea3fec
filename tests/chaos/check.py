"""After a fault: wait for the pipeline to settle, then count what was lost, delivered twice
or left stuck, from the ledger and from what the recipients themselves received."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.demo import HOME_CARE
from gateway.store.db import Database
from gateway.store.tables import deliveries, delivery_attempts, messages, receipt_events
from tests.standins import FhirReceiver, MllpReceiver
from tests.support import GatewayProcess

CLINIC = "SE2321000016-V010"  # the listed clinic: a FHIR system of its own (stand-in)
BISTAND = "SE2120001637-B020"  # needs assessment: an HL7 v2 system (stand-in)
NIGHT = "SE5561234567-HT02"
INBOX_ORGS = (HOME_CARE, NIGHT)  # day and night home care read the web inbox
RECIPIENTS = 4  # each demo admission goes to these four
OPEN_STATES = ("accepted", "held", "routed")  # not yet handed to the recipient
OPEN_MESSAGES = ("accepted", "permitted")  # not yet routed
DEMO_DIRECTORY = Path(__file__).parents[2] / "mappings" / "directory" / "demo.toml"
VISIT = re.compile(r"V(C[A-Z]{2,3}\d{6})")  # the admission's visit number (PV1-19): V + MSH-10


class Recipients:
    """The stand-in systems of two recipients, and the directory file that points at them."""

    def __init__(self, root: Path) -> None:
        self.fhir = FhirReceiver().start()
        self.mllp = MllpReceiver().start()
        self.directory_file = root / "directory.toml"
        root.mkdir(parents=True, exist_ok=True)
        text = DEMO_DIRECTORY.read_text(encoding="utf-8")
        for hsa, channel, address in (
            (CLINIC, "fhir", self.fhir.url),
            (BISTAND, "hl7v2", self.mllp.address),
        ):
            head, tail = text.split(f'hsa_id = "{hsa}"', 1)
            block, rest = tail.split('channels = ["inbox"]', 1)
            endpoint = f'\n[[organisation.endpoint]]\nchannel = "{channel}"\naddress = "{address}"'
            # the endpoint table must come after the organisation's plain keys
            after = rest.split("\n\n", 1)
            text = f'{head}hsa_id = "{hsa}"{block}{after[0]}{endpoint}\n\n{after[1]}'
        self.directory_file.write_text(text, encoding="utf-8")

    def stop(self) -> None:
        self.fhir.stop()
        self.mllp.stop()

    def shown_per_admission(self) -> dict[str, Counter[str]]:
        """Per stand-in, how many distinct notices (dedup keys) each admission showed."""
        out: dict[str, Counter[str]] = {}
        for name, shown in (("fhir", self.fhir.shown), ("hl7v2", self.mllp.shown)):
            counts: Counter[str] = Counter()
            for message in list(shown.values()):
                text = message if isinstance(message, str) else str(message)
                found = VISIT.search(text)
                counts[found.group(1) if found else "?"] += 1
            out[name] = counts
        return out


@dataclass
class Ledger:
    """The database's view of a run."""

    control_ids: dict[str, str]  # MSH-10 -> message id
    open_messages: int
    states: Counter[str]
    per_message: Counter[str]  # message id -> deliveries
    sends: Counter[str]  # delivery id -> 'delivered'/'received' attempts
    delivered_events: Counter[str]  # delivery id -> 'delivered' receipt events
    inbox: dict[str, Counter[str]] = field(default_factory=dict)  # org -> message id -> rows
    unsettled: set[str] = field(default_factory=set)  # message ids not routed or not handed over
    parked: set[str] = field(default_factory=set)  # message ids a stage gave up on (dead letter)

    @property
    def open_deliveries(self) -> int:
        return sum(self.states[s] for s in OPEN_STATES)


async def _counts(conn: AsyncConnection, query: Select[Any]) -> Counter[str]:
    """A grouped count (key, n) as a Counter."""
    return Counter({key: n for key, n in (await conn.execute(query)).all()})


async def _read(url: str) -> Ledger:
    db = Database(url)
    try:
        async with db.read() as conn:
            ids = dict((await conn.execute(select(messages.c.control_id, messages.c.id))).all())
            open_messages = (
                await conn.execute(
                    select(func.count()).where(messages.c.status.in_(OPEN_MESSAGES))
                )
            ).scalar_one()
            states = await _counts(
                conn, select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
            )
            per_message = await _counts(
                conn,
                # the admission's own recipients; an on-call unit told because one of them is
                # closed at the hour the test runs (decision 0019) is no second delivery
                select(deliveries.c.message_id, func.count())
                .where(deliveries.c.escalated_from.is_(None))
                .group_by(deliveries.c.message_id),
            )
            sends = await _counts(
                conn,
                select(delivery_attempts.c.delivery_id, func.count())
                .where(delivery_attempts.c.outcome.in_(["delivered", "received"]))
                .group_by(delivery_attempts.c.delivery_id),
            )
            events = await _counts(
                conn,
                select(receipt_events.c.delivery_id, func.count())
                .where(receipt_events.c.state == "delivered")
                .group_by(receipt_events.c.delivery_id),
            )
            unsettled = {
                *(
                    await conn.scalars(
                        select(messages.c.id).where(messages.c.status.in_(OPEN_MESSAGES))
                    )
                ),
                *(
                    await conn.scalars(
                        select(deliveries.c.message_id).where(deliveries.c.state.in_(OPEN_STATES))
                    )
                ),
            }
            parked = set(
                await conn.scalars(select(messages.c.id).where(messages.c.status == "parked"))
            )
            inbox_rows = (
                await conn.execute(
                    select(deliveries.c.recipient_hsa_id, deliveries.c.message_id).where(
                        deliveries.c.recipient_hsa_id.in_(INBOX_ORGS),
                        deliveries.c.state.not_in(OPEN_STATES),
                    )
                )
            ).all()
    finally:
        await db.close()
    inbox: dict[str, Counter[str]] = {org: Counter() for org in INBOX_ORGS}
    for org, message_id in inbox_rows:
        inbox[org][message_id] += 1
    return Ledger(
        ids, open_messages, states, per_message, sends, events, inbox, unsettled, parked
    )


def read_ledger(url: str) -> Ledger:
    return asyncio.run(_read(url))


async def _settled(url: str, expected: int) -> bool:
    db = Database(url)
    try:
        async with db.read() as conn:
            counts = (
                await conn.execute(
                    select(
                        select(func.count()).select_from(messages).scalar_subquery(),
                        select(func.count())
                        .where(messages.c.status.in_(OPEN_MESSAGES))
                        .scalar_subquery(),
                        select(func.count()).select_from(deliveries).scalar_subquery(),
                        select(func.count())
                        .where(deliveries.c.state.in_(OPEN_STATES))
                        .scalar_subquery(),
                        select(func.count())
                        .where(messages.c.status == "parked")
                        .scalar_subquery(),
                    )
                )
            ).one()
    finally:
        await db.close()
    total, open_messages, made, open_deliveries, parked = counts
    return (
        total >= expected
        and open_messages == 0
        and made >= (expected - parked) * RECIPIENTS  # a parked message has none
        and open_deliveries == 0
    )


def settle(url: str, expected: int, timeout: float) -> tuple[Ledger, float]:
    """Poll until every expected message is routed and every delivery handed over (or
    ``timeout`` passes); then the ledger, and the seconds it took."""
    began = time.monotonic()
    while not asyncio.run(_settled(url, expected)) and time.monotonic() - began < timeout:
        time.sleep(1.0)
    elapsed = time.monotonic() - began
    return read_ledger(url), elapsed


def inbox_duplicates(gw: GatewayProcess) -> int:
    """Notices the web inbox lists more than once (the newest 200 per organisation)."""
    dup = 0
    for org in INBOX_ORGS:
        r = httpx.get(f"{gw.base_url}/api/v1/inbox", headers=gw.token(org), timeout=60)
        r.raise_for_status()
        listed = Counter(n["message_id"] for n in r.json())
        dup += sum(n - 1 for n in listed.values())
    return dup


def tally(
    ledger: Ledger, acked: list[str], recipients: Recipients, inbox_listed_twice: int
) -> dict[str, Any]:
    """Lost, delivered twice and stuck, each counted from every place it could show. An
    admission is lost when it was ACKed but is not stored, or is settled but a recipient
    never got it; one still on its way counts as stuck instead."""
    missing_messages = [cid for cid in acked if cid not in ledger.control_ids]
    shown = recipients.shown_per_admission()
    lost = set(missing_messages)
    twice = 0
    for cid in acked:
        mid = ledger.control_ids.get(cid)
        if mid is None or mid in ledger.unsettled or mid in ledger.parked:
            continue  # missing: lost (above); unsettled: stuck; parked: counted apart
        if ledger.per_message[mid] < RECIPIENTS:
            lost.add(cid)
        for channel in ("fhir", "hl7v2"):
            n = shown[channel][cid]
            if n == 0:
                lost.add(cid)
            twice += max(0, n - 1)
        for org in INBOX_ORGS:
            if ledger.inbox[org][mid] == 0:
                lost.add(cid)
    twice += sum(n - 1 for n in ledger.sends.values() if n > 1)
    twice += sum(n - 1 for n in ledger.delivered_events.values() if n > 1)
    twice += inbox_listed_twice
    twice += sum(n - 1 for n in ledger.per_message.values() if n > RECIPIENTS)
    return {
        "lost": len(lost),
        "duplicated": twice,
        "stuck": ledger.open_messages + ledger.open_deliveries,
        "parked": len(ledger.parked),  # stored, but never delivered: an operator must replay
        "unknown_at_recipient": shown["fhir"]["?"] + shown["hl7v2"]["?"],
        "messages": len(ledger.control_ids),
        "deliveries": sum(ledger.states.values()),
        "states": dict(ledger.states),
        "fhir_received": len(recipients.fhir.received),
        "hl7v2_received": len(recipients.mllp.received),
        "fhir_shown": len(recipients.fhir.shown),
        "hl7v2_shown": len(recipients.mllp.shown),
    }
