"""The provider inbox as a service: list, open (a *read* receipt) and acknowledge notices.

Only deliveries on the inbox channel that have been delivered, addressed to the caller's
organisation, are visible; anything else is "not found" so that existence does not leak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.model.bundle import read_bundle, withheld_kinds, withhold
from gateway.model.events import LusEvent
from gateway.pipeline import ledger
from gateway.pipeline.ledger import VISIBLE_IN_INBOX, Actor, State
from gateway.store.tables import deliveries, messages, receipt_events

PROTECTED = "Skyddad identitet"
RETRACTED = "Makulerat av avsändaren"
SUPERSEDED = "Ersatt av en nyare version"


@dataclass(frozen=True, slots=True)
class Notice:
    delivery_id: str
    message_id: str
    patient_key: str
    summary: dict[str, Any]
    bundle: dict[str, Any]


def _visible(org: str):  # type: ignore[no-untyped-def]
    return (
        select(
            deliveries.c.id,
            deliveries.c.message_id,
            deliveries.c.state,
            deliveries.c.for_information,
            deliveries.c.role,
            deliveries.c.updated_at,
            deliveries.c.superseded_by,
            deliveries.c.retracted_by,
            deliveries.c.withheld,
            messages.c.canonical,
            messages.c.patient_key,
            messages.c.received_at,
        )
        .join(messages, messages.c.id == deliveries.c.message_id)
        .where(
            deliveries.c.recipient_hsa_id == org,
            deliveries.c.channel == "inbox",
            deliveries.c.state.in_([s.value for s in VISIBLE_IN_INBOX]),
        )
    )


def _summary(row: Any, bundle: dict[str, Any], *, in_list: bool) -> dict[str, Any]:
    view = read_bundle(bundle)
    hide = view.protected_identity and in_list
    return {
        "id": row.id,
        "message_id": row.message_id,
        "event": view.event.value,
        "event_display": LusEvent(view.event).display,
        "for_information": row.for_information,
        "role": row.role,
        "sender_hsa_id": view.sender_hsa_id,
        "patient": {
            "name": PROTECTED if hide else view.patient_name,
            "identifier": PROTECTED if hide else view.patient_identifier,
            "protected_identity": view.protected_identity,
            # A merge (patientsammanslagning): the identities this patient had before.
            "replaces": [] if hide else [value for _, value in view.prior_identifiers],
        },
        "received_at": row.received_at.isoformat(),
        "state": row.state,
        # A later message of the same stay: a newer version, or a cancellation (makulering).
        "superseded_by": row.superseded_by,
        "retracted_by": row.retracted_by,
        "notice": RETRACTED if row.retracted_by else SUPERSEDED if row.superseded_by else "",
    }


def _bundle(row: Any) -> dict[str, Any]:
    """The message as this recipient may see it (without content withheld from its role)."""
    return withhold(json.loads(row.canonical), withheld_kinds(row.withheld))


async def list_notices(conn: AsyncConnection, org: str, limit: int = 200) -> list[dict[str, Any]]:
    return [summary for _, summary in await list_notices_keyed(conn, org, limit)]


async def list_notices_keyed(
    conn: AsyncConnection, org: str, limit: int = 200
) -> list[tuple[str, dict[str, Any]]]:
    """(patient key, summary) of each notice, newest first; the key is for the audit trail."""
    rows = (
        await conn.execute(_visible(org).order_by(messages.c.received_at.desc()).limit(limit))
    ).all()
    return [(r.patient_key, _summary(r, _bundle(r), in_list=True)) for r in rows]


async def get_notice(conn: AsyncConnection, org: str, delivery_id: str) -> Notice | None:
    row = (await conn.execute(_visible(org).where(deliveries.c.id == delivery_id))).first()
    if row is None:
        return None
    bundle = _bundle(row)
    return Notice(
        row.id, row.message_id, row.patient_key, _summary(row, bundle, in_list=False), bundle
    )


async def open_notice(
    conn: AsyncConnection, org: str, delivery_id: str, actor: Actor
) -> Notice | None:
    """Return the notice and record that a person has read it (the first time)."""
    notice = await get_notice(conn, org, delivery_id)
    if notice is not None:
        await ledger.record(
            conn, delivery_id, notice.message_id, notice.patient_key, State.READ, actor=actor
        )
    return notice


async def acknowledge(
    conn: AsyncConnection, org: str, delivery_id: str, actor: Actor
) -> tuple[Notice, bool] | None:
    """Record the kvittens. Reading is implied. Returns (notice, newly_acknowledged)."""
    notice = await open_notice(conn, org, delivery_id, actor)
    if notice is None:
        return None
    new = await ledger.record(
        conn, delivery_id, notice.message_id, notice.patient_key, State.ACKNOWLEDGED, actor=actor
    )
    return notice, new


async def receipts_of(conn: AsyncConnection, delivery_id: str) -> list[dict[str, Any]]:
    rows = (
        await conn.execute(
            select(receipt_events)
            .where(receipt_events.c.delivery_id == delivery_id)
            .order_by(receipt_events.c.at, receipt_events.c.id)
        )
    ).all()
    return [
        {
            "state": r.state,
            "at": r.at.isoformat(),
            **({"by": {"name": r.actor_name, "role": r.actor_role}} if r.actor_name else {}),
        }
        for r in rows
    ]
