"""Read models: the receipt ledger of a message, shared by the HTTP API and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.model.bundle import withheld_kinds
from gateway.store.tables import deliveries, delivery_attempts, messages, receipt_events


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def patient_key_of(conn: AsyncConnection, message_id: str) -> str | None:
    """The message's patient pseudonym (for the audit trail), or None if there is no such."""
    return (
        await conn.execute(select(messages.c.patient_key).where(messages.c.id == message_id))
    ).scalar_one_or_none()


async def message_ledger(conn: AsyncConnection, message_id: str) -> dict[str, Any] | None:
    """The message's pipeline status, consent decision, and each recipient's ordered receipts.

    Carries no patient data: operations staff see progress, not content.
    """
    msg = (
        await conn.execute(
            select(
                messages.c.id,
                messages.c.source,
                messages.c.control_id,
                messages.c.event,
                messages.c.status,
                messages.c.consent_decision,
                messages.c.consent_reason,
                messages.c.received_at,
            ).where(messages.c.id == message_id)
        )
    ).first()
    if msg is None:
        return None
    rows = (
        await conn.execute(
            select(
                deliveries,
                receipt_events.c.state.label("r_state"),
                receipt_events.c.at.label("r_at"),
                receipt_events.c.actor_name,
                receipt_events.c.actor_role,
                receipt_events.c.actor_org,
                receipt_events.c.detail.label("r_detail"),
            )
            .join(receipt_events, receipt_events.c.delivery_id == deliveries.c.id)
            .where(deliveries.c.message_id == message_id)
            .order_by(
                deliveries.c.created_at,
                deliveries.c.recipient_hsa_id,
                receipt_events.c.at,
                receipt_events.c.id,
            )
        )
    ).all()
    recipients: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = recipients.setdefault(
            r.id,
            {
                "delivery_id": r.id,
                "recipient": {"hsa_id": r.recipient_hsa_id, "name": r.recipient_name},
                "role": r.role,
                "for_information": r.for_information,
                "channel": r.channel,
                "state": r.state,
                "superseded_by": r.superseded_by,
                "retracted_by": r.retracted_by,
                "due": {"rule": r.due_rule, "at": _iso(r.due_at)} if r.due_at else None,
                "escalation_level": r.escalation_level,
                "escalated_from": r.escalated_from,
                "withheld": withheld_kinds(r.withheld),
                "receipts": [],
                "attempts": [],
            },
        )
        receipt: dict[str, Any] = {"state": r.r_state, "at": _iso(r.r_at)}
        if r.actor_name:
            receipt["by"] = {"name": r.actor_name, "role": r.actor_role, "org": r.actor_org}
        if r.r_detail:
            receipt["detail"] = r.r_detail
        entry["receipts"].append(receipt)
    sends = (
        await conn.execute(
            select(delivery_attempts)
            .where(delivery_attempts.c.delivery_id.in_(list(recipients)))
            .order_by(delivery_attempts.c.id)
        )
    ).all()
    for a in sends:
        attempt = {"channel": a.channel or None, "attempt": a.attempt, "outcome": a.outcome}
        attempt |= {"at": _iso(a.at), "detail": a.detail}
        recipients[a.delivery_id]["attempts"].append(attempt)
    return {
        "id": msg.id,
        "source": msg.source,
        "control_id": msg.control_id,
        "event": msg.event,
        "status": msg.status,
        "consent": {"decision": msg.consent_decision, "reason": msg.consent_reason},
        "received_at": _iso(msg.received_at),
        "deliveries": list(recipients.values()),
    }


async def find_message_id(conn: AsyncConnection, source: str | None, control_id: str) -> list[str]:
    query = select(messages.c.id).where(messages.c.control_id == control_id)
    if source:
        query = query.where(messages.c.source == source)
    return list((await conn.execute(query)).scalars())
