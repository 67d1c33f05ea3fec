"""Deviations (avvikelser) the gateway raises itself, tracked until someone answers.

A missed receipt, a delivery that failed on every channel, or a delivery held for consent
past its deadline is a deviation: a record in the responsible party's deviation inbox
(``GET /api/v1/deviations``), shown as a FHIR ``DetectedIssue`` (decision 0010: it names the
implicated delivery and has a status that goes from open to answered, which a
``Communication`` does not), and announced on ``brygga.receipts`` as ``deviation.raised``
and ``deviation.answered`` for other systems (a municipality's own deviation module).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.outbox import enqueue
from gateway.bus.topics import Event
from gateway.crypto.columns import seal_row
from gateway.model.identifiers import HSA_SYSTEM
from gateway.store.sql import insert_ignore
from gateway.store.tables import deviations

KINDS = {
    "missed-receipt": "Mottagningskvittens uteblev",
    "delivery-failed": "Meddelandet kunde inte levereras",
    "held-past-deadline": "Meddelandet hölls kvar förbi tidsfristen (samtycke saknas)",
    "missed-deadline": "En tidsfrist i rutinen överskreds",
}
DEVIATION_KIND_SYSTEM = "https://brygga.dev/fhir/CodeSystem/deviation-kind"


@dataclass(frozen=True, slots=True)
class NewDeviation:
    message_id: str
    delivery_id: str | None
    patient_key: str
    kind: str
    responsible_hsa_id: str
    municipality: str
    district: str
    summary: str  # what went wrong, for people; never patient data


async def raise_deviation(conn: AsyncConnection, new: NewDeviation, now: datetime) -> str | None:
    """Record and announce a deviation; None if this one was raised already."""
    deviation_id = str(uuid.uuid4())
    created = await insert_ignore(
        conn,
        deviations,
        {
            "id": deviation_id,
            "message_id": new.message_id,
            "delivery_id": new.delivery_id,
            "patient_key": new.patient_key,
            "kind": new.kind,
            "responsible_hsa_id": new.responsible_hsa_id,
            "municipality": new.municipality or None,
            "district": new.district or None,
            "status": "open",
            "raised_at": now,
            "summary": new.summary[:500],
        },
    )
    if not created:
        return None
    await _announce(conn, new.patient_key, new.message_id, deviation_id, "deviation.raised", now)
    return deviation_id


async def answer(
    conn: AsyncConnection, deviation_id: str, org: str | None, text: str, by: str
) -> dict[str, Any] | None:
    """Record the responsible party's answer. None if there is no such deviation for ``org``
    (None: any organisation). A second answer replaces the first."""
    row = await _row(conn, deviation_id, org)
    if row is None:
        return None
    now = clock.now()
    await conn.execute(
        update(deviations)
        .where(deviations.c.id == deviation_id)
        .values(
            seal_row(
                deviations,
                {
                    "id": deviation_id,
                    "status": "answered",
                    "answer": text,
                    "answered_at": now,
                    "answered_by": by,
                },
            )
        )
    )
    await _announce(conn, row.patient_key, row.message_id, deviation_id, "deviation.answered", now)
    return await get(conn, deviation_id, org)


async def get(conn: AsyncConnection, deviation_id: str, org: str | None) -> dict[str, Any] | None:
    row = await _row(conn, deviation_id, org)
    return summary(row) if row else None


async def list_for(
    conn: AsyncConnection, org: str | None, status: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    query = select(deviations).order_by(deviations.c.raised_at.desc()).limit(limit)
    if org is not None:
        query = query.where(deviations.c.responsible_hsa_id == org)
    if status:
        query = query.where(deviations.c.status == status)
    return [summary(r) for r in (await conn.execute(query)).all()]


def summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "title": KINDS.get(row.kind, row.kind),
        "summary": row.summary,
        "status": row.status,
        "responsible": row.responsible_hsa_id,
        "message_id": row.message_id,
        "delivery_id": row.delivery_id,
        "raised_at": row.raised_at.isoformat(),
        "answered_at": row.answered_at.isoformat() if row.answered_at else None,
        "answered_by": row.answered_by,
        "answer": row.answer,
    }


def to_detected_issue(d: dict[str, Any]) -> dict[str, Any]:
    """The deviation as a FHIR R4 DetectedIssue (no patient data: the message id suffices)."""
    issue: dict[str, Any] = {
        "resourceType": "DetectedIssue",
        "id": d["id"],
        "status": "final" if d["status"] == "answered" else "preliminary",
        "code": {
            "coding": [{"system": DEVIATION_KIND_SYSTEM, "code": d["kind"], "display": d["title"]}]
        },
        "severity": "high" if d["kind"] != "missed-receipt" else "moderate",
        "identifiedDateTime": d["raised_at"],
        "author": {
            "display": "Brygga",
        },
        "implicated": [
            {"reference": f"MessageHeader/{d['message_id']}"},
            *([{"display": f"Leverans {d['delivery_id']}"}] if d["delivery_id"] else []),
        ],
        "detail": d["summary"],
        "extension": [
            {
                "url": "https://brygga.dev/fhir/StructureDefinition/responsible-organization",
                "valueIdentifier": {"system": HSA_SYSTEM, "value": d["responsible"]},
            }
        ],
    }
    if d["status"] == "answered":
        issue["mitigation"] = [
            {
                "action": {"text": "Besvarad"},
                "date": d["answered_at"],
                "author": {"display": d["answered_by"] or ""},
            }
        ]
    return issue


async def _row(conn: AsyncConnection, deviation_id: str, org: str | None) -> Any:
    query = select(deviations).where(deviations.c.id == deviation_id)
    if org is not None:
        query = query.where(deviations.c.responsible_hsa_id == org)
    return (await conn.execute(query)).one_or_none()


async def _announce(
    conn: AsyncConnection,
    patient_key: str,
    message_id: str,
    deviation_id: str,
    kind: str,
    now: datetime,
) -> None:
    await enqueue(
        conn,
        topics.RECEIPTS,
        patient_key,
        Event(
            id=f"{kind}:{deviation_id}:{now.timestamp()}",
            type=kind,
            message_id=message_id,
            data={"deviation_id": deviation_id, "at": now.isoformat()},
        ),
    )
