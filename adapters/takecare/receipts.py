"""Receipts back to TakeCare, so the ward sees in its own system who got, read and
acknowledged its notice.

Each ledger receipt (delivered, read, acknowledged, failed, parked) of a message that came
from TakeCare becomes an HL7 v2.5 ``ORU^R01`` with human-readable Swedish status, sent over
MLLP to TakeCare's listener. Why ORU and not ACK: one notice has many recipients and each
reaches several states; an ORU carries recipient, state, time and person as observations
under an OBR whose placer number (OBR-2) is the original MSH-10, which TakeCare can file
against its own message. Each is stored first (``source_notifications``) and sent by a
loop that retries with doubling delays until TakeCare answers AA; MSH-10 of the ORU is the
notification id, so a resend is recognisable as one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from adapters.hl7v2.render import cut, default_mapping
from adapters.takecare import mllp
from adapters.takecare.ack import build_ack, control_id, escape, parse_ack
from adapters.takecare.hl7in import Hl7Rejection, parse
from gateway import clock
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.clock import STOCKHOLM
from gateway.logs import error_fields
from gateway.model.bundle import _org_id, read_bundle, resources_by_ref
from gateway.pipeline import returns
from gateway.pipeline.stage import Stage
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.sql import insert_ignore
from gateway.store.tables import deliveries, messages, receipt_events, source_notifications

log = structlog.get_logger("brygga.takecare.receipts")
CHANNEL = "takecare-oru"
REPORTED = {
    "held": "Väntar på samtycke",
    "denied": "Utlämnas inte: spärr eller återkallat samtycke",
    "delivered": "Levererad",
    "received": "Mottagen av mottagarens system",
    "read": "Läst",
    "acknowledged": "Kvitterad",
    "failed": "Kunde inte levereras",
    "parked": "Parkerad, kräver åtgärd",
}
ID_TYPES = {"personnummer": "PNR", "samordningsnummer": "SNR", "nationelltReservnummer": "RNR"}


class ReceiptSettings(BaseSettings):
    """Where TakeCare listens for receipts, and how hard to try."""

    model_config = SettingsConfigDict(env_prefix="BRYGGA_TAKECARE_", extra="ignore")

    receipts_host: str = ""
    receipts_port: int = 0
    receipts_applications: str = "TAKECARE"  # MSH-3 values whose messages get receipts
    retry_seconds: float = 30.0  # first retry; doubles each time
    retry_max_seconds: float = 900.0
    timeout_seconds: float = 10.0
    poll_seconds: float = 0.5


def _esc(value: str) -> str:
    """HL7 v2 escaping of text placed in a field; line breaks become spaces."""
    return escape(value.replace("\r", " ").replace("\n", " "))


def _ts(at: datetime) -> str:
    return at.astimezone(STOCKHOLM).strftime("%Y%m%d%H%M%S%z")


IS = 20  # the v2.5 length of an IS value: MSH-5/6 hold TakeCare's own HD.1 (IS)


def _fit(segment: str, field: int, value: str, component: int | None = None) -> str:
    """An escaped field within the v2.5 length (mappings/hl7v2/lengths.toml), and within
    ``component`` when the whole field is one component of a shorter data type."""
    return cut(cut(value, component), default_mapping().max_length(segment, field))


def _msh_pid(notification_id: str, source: str, bundle: dict[str, Any]) -> list[str]:
    """MSH and PID of an ORU^R01 (v2.5) to TakeCare about the patient of ``bundle``: addressed
    back to ``source`` (TakeCare's MSH-3|MSH-4), fields from outside cut to the version's
    lengths."""
    app, _, facility = source.partition("|")
    view = read_bundle(bundle)
    patient = resources_by_ref(bundle).get("Patient/patient", {})
    system = patient.get("identifier", [{}])[0].get("system", "")
    id_type = ID_TYPES.get(system.rsplit("/", 1)[-1], "")
    names = (patient.get("name") or [{}])[0]
    pid5 = f"{_esc(names.get('family', ''))}^{_esc(' '.join(names.get('given', [])))}^^^^^L"
    to_app, to_facility = _fit("MSH", 5, _esc(app), IS), _fit("MSH", 6, _esc(facility), IS)
    return [
        f"MSH|^~\\&|BRYGGA|BRYGGA|{to_app}|{to_facility}|{_ts(clock.now())}||ORU^R01^ORU_R01|"
        f"{_fit('MSH', 10, notification_id)}|P|2.5|||AL|NE|SWE|UNICODE UTF-8",
        f"PID|1||{_fit('PID', 3, f'{_esc(view.patient_identifier)}^^^^{id_type}')}||"
        f"{_fit('PID', 5, pid5)}",
    ]


def build_oru(
    notification_id: str,
    source: str,
    original_control_id: str,
    bundle: dict[str, Any],
    recipient: tuple[str, str],
    state: str,
    at: datetime,
    actor: tuple[str, str] | None,
) -> bytes:
    """The ORU^R01 (v2.5) that tells TakeCare one recipient's state of one of its messages.

    ``notification_id`` is MSH-10, so at most 20 characters (``ack.control_id()``). Fields
    from outside (TakeCare's MSH-3/4 and MSH-10) are cut to the version's lengths.
    """
    hsa, name = recipient
    status = REPORTED[state]
    local = at.astimezone(STOCKHOLM).strftime("%Y-%m-%d %H:%M")
    summary = f"{name}: {status} {local}" + (f" av {actor[0]} ({actor[1]})" if actor else "")
    segments = [
        *_msh_pid(notification_id, source, bundle),
        f"OBR|1|{_fit('OBR', 2, _esc(original_control_id))}||LUSKVITTENS^Mottagarkvittens LUS^L"
        f"|||{_ts(at)}",
        f"OBX|1|CE|MOTTAGARE^Mottagare^L||{_esc(hsa)}^{_esc(name)}^HSA||||||F",
        f"OBX|2|ST|STATUS^Status^L||{status}||||||F|||{_ts(at)}",
    ]
    if actor:
        segments.append(
            f"OBX|3|ST|UTFORDAV^Utförd av^L||{_esc(actor[0])} ({_esc(actor[1])})||||||F"
        )
    segments.append(f"NTE|1||{_fit('NTE', 3, _esc(summary))}")
    return ("\r".join(segments) + "\r").encode("utf-8")


def build_return_oru(
    notification_id: str,
    source: str,
    original_control_id: str,
    original: dict[str, Any],
    bundle: dict[str, Any],
    sender: tuple[str, str],
) -> bytes:
    """The ORU^R01 (v2.5) that brings a party's return message (kvittens with needs, fast
    vårdkontakt, SIP, request or answer, deviation, services started) back to the ward,
    filed under its own message (OBR-2 the original MSH-10) like a receipt. Each thing the
    party said is one OBX; the whole in Swedish in the NTE."""
    lines = returns.ward_lines(bundle)
    at = datetime.fromisoformat(bundle["timestamp"])
    hsa, name = sender
    segments = [
        *_msh_pid(notification_id, source, original),
        f"OBR|1|{_fit('OBR', 2, _esc(original_control_id))}||LUSSVAR^Svar från part LUS^L"
        f"|||{_ts(at)}",
        f"OBX|1|CE|AVSANDARE^Avsändare^L||{_esc(hsa)}^{_esc(name)}^HSA||||||F",
    ]
    for i, (code, label, value) in enumerate(lines, start=2):
        segments.append(
            f"OBX|{i}|ST|{code}^{_esc(label)}^L||{_fit('OBX', 5, _esc(value))}||||||F|||{_ts(at)}"
        )
    summary = f"{name or hsa}: " + "; ".join(f"{label}: {value}" for _, label, value in lines)
    segments.append(f"NTE|1||{_fit('NTE', 3, _esc(summary))}")
    return ("\r".join(segments) + "\r").encode("utf-8")


class ReceiptsToTakeCare(Stage):
    """Turns receipts on ``brygga.receipts`` into stored notifications for TakeCare."""

    name = "takecare-receipts"
    topic = topics.RECEIPTS
    handles = frozenset({"receipt.recorded", "message.status"})

    def __init__(self, db: Database, settings: ReceiptSettings, default_sender: str = "") -> None:
        super().__init__(db)
        self.default_sender = default_sender  # as the source read an empty MSH-4
        self.applications = {a.strip() for a in settings.receipts_applications.split(",")}

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        if event.type == "message.status":
            if event.data.get("status") in ("routed", "held", "denied"):
                await self._return_to_ward(conn, event)
            await self._application_ack(conn, event)
            return
        state = str(event.data.get("state", ""))
        if state not in REPORTED or event.delivery_id is None:
            return
        row = (
            await conn.execute(
                select(
                    messages.c.source,
                    messages.c.control_id,
                    messages.c.canonical,
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.recipient_name,
                    receipt_events.c.at,
                    receipt_events.c.actor_name,
                    receipt_events.c.actor_role,
                )
                .join(deliveries, deliveries.c.message_id == messages.c.id)
                .join(receipt_events, receipt_events.c.delivery_id == deliveries.c.id)
                .where(deliveries.c.id == event.delivery_id, receipt_events.c.state == state)
            )
        ).one()
        if row.source.partition("|")[0] not in self.applications:
            return
        notification_id = control_id()  # MSH-10 of the ORU: 20 characters
        actor = (row.actor_name, row.actor_role or "") if row.actor_name else None
        payload = build_oru(
            notification_id,
            row.source,
            row.control_id,
            json.loads(row.canonical),
            (row.recipient_hsa_id, row.recipient_name),
            state,
            row.at,
            actor,
        )
        await _store(
            conn,
            notification_id,
            event.message_id,
            event.delivery_id,
            state,
            payload,
            f"{event.delivery_id}:{state}",
        )

    async def _return_to_ward(self, conn: AsyncConnection, event: Event) -> None:
        """A party's return message about a stay that came from TakeCare: to the ward."""
        row = (
            await conn.execute(
                select(messages.c.canonical).where(messages.c.id == event.message_id)
            )
        ).one()
        bundle = json.loads(row.canonical)
        if not returns.to_ward(bundle):
            return
        original = (
            await conn.execute(
                select(messages.c.source, messages.c.control_id, messages.c.canonical).where(
                    messages.c.id == returns.answered_message(bundle)
                )
            )
        ).one_or_none()
        if original is None or original.source.partition("|")[0] not in self.applications:
            return
        sender = read_bundle(bundle).sender_hsa_id
        original_bundle = json.loads(original.canonical)
        if sender == read_bundle(original_bundle).sender_hsa_id:
            return  # the ward's own answer (given in its inbox): TakeCare need not hear it
        org = resources_by_ref(bundle).get(f"Organization/{_org_id(sender)}", {})
        notification_id = control_id()
        payload = build_return_oru(
            notification_id,
            original.source,
            original.control_id,
            original_bundle,
            bundle,
            (sender, str(org.get("name", ""))),
        )
        await _store(
            conn,
            notification_id,
            event.message_id,
            None,
            "return",
            payload,
            f"{event.message_id}:return",
        )

    async def _application_ack(self, conn: AsyncConnection, event: Event) -> None:
        """Enhanced mode: the application ACK (MSH-16) once the gateway has decided.

        routed or not a LUS case → AA; the patient objected → AR; no recipient → AE.
        MSH-16 ``AL`` asks for all of them, ``ER`` for errors only, ``SU`` for success
        only. Held messages wait for their consent decision.
        """
        status = str(event.data.get("status", ""))
        code = APPLICATION_CODES.get(status)
        if code is None:
            return
        row = (
            await conn.execute(
                select(messages.c.source, messages.c.raw).where(messages.c.id == event.message_id)
            )
        ).one()
        if row.source.partition("|")[0] not in self.applications:
            return
        try:
            original = parse(row.raw, default_sender=self.default_sender)
        except Hl7Rejection:  # the mapping changed since it was accepted: nothing to answer
            log.warning("takecare.receipts.unparsable_original", message_id=event.message_id)
            return
        wanted = original.application_ack_type
        if not (
            wanted == "AL" or (wanted == "ER" and code != "AA") or (wanted == "SU" and code == "AA")
        ):
            return
        notification_id = str(uuid.uuid4())
        payload = build_ack(
            original,
            code,
            text=str(event.data.get("reason", "")),
            request_accept_ack=True,
        )
        await _store(
            conn,
            notification_id,
            event.message_id,
            None,
            f"application-{code}",
            payload,
            f"{event.message_id}:application-ack",
        )


# not-lus: no LUS case (decision 0017): accepted, and nothing was to be sent.
APPLICATION_CODES = {"routed": "AA", "not-lus": "AA", "denied": "AR", "unroutable": "AE"}


async def _store(
    conn: AsyncConnection,
    notification_id: str,
    message_id: str,
    delivery_id: str | None,
    state: str,
    payload: bytes,
    dedup_key: str,
) -> None:
    now = clock.now()
    await insert_ignore(
        conn,
        source_notifications,
        {
            "id": notification_id,
            "message_id": message_id,
            "delivery_id": delivery_id,
            "state": state,
            "dedup_key": dedup_key,
            "channel": CHANNEL,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        },
    )


class Sender:
    """Sends pending notifications in the order they arose, per message; retries on failure."""

    def __init__(self, db: Database, settings: ReceiptSettings) -> None:
        self.db = db
        self.s = settings

    async def run(self) -> None:
        while True:
            try:
                sent = await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again shortly
                log.warning("takecare.receipts.retry", **error_fields(exc))
                sent = 0
            if not sent:
                await asyncio.sleep(self.s.poll_seconds)

    async def send_due(self) -> int:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        source_notifications.c.id,
                        source_notifications.c.message_id,
                        source_notifications.c.payload,
                        source_notifications.c.attempts,
                        source_notifications.c.next_attempt_at,
                    )
                    .where(
                        source_notifications.c.status == "pending",
                        source_notifications.c.channel == CHANNEL,
                    )
                    .order_by(source_notifications.c.created_at, source_notifications.c.id)
                    .limit(100)
                )
            ).all()
        now = clock.now()
        blocked: set[str] = set()  # a message whose earlier receipt failed waits its turn
        sent = 0
        for row in rows:
            if row.message_id in blocked or row.next_attempt_at > now:
                blocked.add(row.message_id)
                continue
            error = await self._send(row.payload)
            await self._record(row.id, row.attempts, error)
            if error:
                blocked.add(row.message_id)
            else:
                sent += 1
        return sent

    async def _send(self, payload: bytes) -> str:
        """'' when TakeCare accepted it, else why not (no patient data)."""
        try:
            answers = await mllp.send(
                self.s.receipts_host,
                self.s.receipts_port,
                [payload],
                timeout=self.s.timeout_seconds,
            )
            code = parse_ack(answers[0])[0]
        except Exception as exc:
            return type(exc).__name__
        return "" if code in ("AA", "CA") else f"MSA-1 {code or '(none)'}"

    async def _record(self, notification_id: str, attempts: int, error: str) -> None:
        now = clock.now()
        values: dict[str, Any] = {"attempts": attempts + 1, "last_error": error or None}
        if error:
            delay = min(self.s.retry_seconds * 2**attempts, self.s.retry_max_seconds)
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            log.warning(
                "takecare.receipts.not_accepted",
                notification_id=notification_id,
                error=error,
                attempt=attempts + 1,
            )
        else:
            values.update(status="acked", acked_at=now)
        async with self.db.transaction() as conn:
            await conn.execute(
                update(source_notifications)
                .where(source_notifications.c.id == notification_id)
                .values(values)
            )


class TakeCareReceiptsPlugin:
    """Entry point ``brygga.stages: takecare-receipts``."""

    name = "takecare-receipts"

    def __init__(self) -> None:
        self.settings = ReceiptSettings()
        self.default_sender = ""

    def enabled(self, settings: Settings) -> bool:
        self.default_sender = settings.takecare_sender
        return bool(self.settings.receipts_host and self.settings.receipts_port)

    def stage(self, db: Database) -> Stage | None:
        return ReceiptsToTakeCare(db, self.settings, self.default_sender)

    def background(self, db: Database) -> Coroutine[Any, Any, None] | None:
        return Sender(db, self.settings).run()
