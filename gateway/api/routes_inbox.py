"""The provider inbox for parties without a system of their own (home care, SÄBO, rehab)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit
from gateway.api.openapi import example
from gateway.api.policy import Grant, allow
from gateway.pipeline import inbox
from gateway.pipeline.ledger import Actor
from gateway.store.retry import in_transaction

router = APIRouter(prefix="/api/v1/inbox", tags=["inbox"])
Reader = Annotated[Grant, Depends(allow("inbox.read"))]
Acknowledger = Annotated[Grant, Depends(allow("inbox.acknowledge"))]
NOT_FOUND = "No notice with this id in your organisation's inbox."

EXAMPLE_ITEM = {
    "id": "6f1c2a8e-3b7d-4c55-9a41-2f0e8d9b7c11",
    "message_id": "0b9e5c7a-1d2f-4e3a-8b6c-5d4e3f2a1b0c",
    "event": "inskrivningsmeddelande",
    "event_display": "Inskrivningsmeddelande",
    "for_information": True,
    "role": "hemtjanst",
    "sender_hsa_id": "SE2321000016-H001",
    "patient": {
        "name": "Tolvan Tolvansson",
        "identifier": "191212121212",
        "protected_identity": False,
        "replaces": [],
    },
    "received_at": "2026-11-23T08:15:02.123456+00:00",
    "state": "delivered",
}


@router.get(
    "",
    summary="List the notices addressed to your organisation",
    responses=example([EXAMPLE_ITEM]),
)
async def list_inbox(request: Request, who: Reader) -> list[dict[str, Any]]:
    """Newest first. Patients with protected identity are listed without name or number."""

    async def listing(conn: AsyncConnection) -> list[tuple[str, dict[str, Any]]]:
        listed = await inbox.list_notices_keyed(conn, who.org)
        entries = [
            who.audit_entry("inbox.list", audit.PURPOSE_LUS, key, n["id"]) for key, n in listed
        ]
        await audit.record_many(conn, entries)
        return listed

    listed = await in_transaction(request.app.state.db, listing)
    return [notice for _, notice in listed]


@router.get(
    "/{notice_id}",
    summary="Open a notice (records a *read* receipt)",
    responses=example(
        {**EXAMPLE_ITEM, "state": "read", "bundle": {"resourceType": "Bundle", "type": "message"}},
        {404: NOT_FOUND},
    ),
)
async def open_notice(request: Request, notice_id: str, who: Reader) -> dict[str, Any]:
    """Returns the notice with its FHIR message Bundle; the first opening is the *read* receipt."""
    actor = Actor(name=who.name, role=who.title or who.role, org=who.org)

    async def opening(conn: AsyncConnection) -> inbox.Notice | None:
        notice = await inbox.open_notice(conn, who.org, notice_id, actor)
        if notice is not None:
            entry = who.audit_entry(
                "message.read", audit.PURPOSE_LUS, notice.patient_key, notice_id
            )
            await audit.record(conn, entry)
        return notice

    notice = await in_transaction(request.app.state.db, opening)
    if notice is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return {**notice.summary, "bundle": notice.bundle}


@router.post(
    "/{notice_id}/acknowledge",
    summary="Acknowledge a notice (kvittens)",
    responses=example(
        {
            "id": EXAMPLE_ITEM["id"],
            "acknowledged": True,
            "already_acknowledged": False,
            "receipts": [
                {"state": "accepted", "at": "2026-11-23T08:15:02+00:00"},
                {
                    "state": "acknowledged",
                    "at": "2026-11-23T09:01:40+00:00",
                    "by": {"name": "Anna Svensson", "role": "Undersköterska"},
                },
            ],
        },
        {404: NOT_FOUND},
    ),
)
async def acknowledge(request: Request, notice_id: str, who: Acknowledger) -> dict[str, Any]:
    """Records who acknowledged: the person and title of the token (a body is ignored).
    Repeating it changes nothing."""
    actor = Actor(name=who.name, role=who.title or who.role, org=who.org)
    async with request.app.state.db.transaction() as conn:
        result = await inbox.acknowledge(conn, who.org, notice_id, actor)
        if result is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
        receipts = await inbox.receipts_of(conn, notice_id)
        done_by = (
            f"{'kvitterat' if result[1] else 'redan kvitterat'} av {actor.name} ({actor.role})"
        )
        entry = who.audit_entry(
            "message.acknowledge", audit.PURPOSE_LUS, result[0].patient_key, notice_id, done_by
        )
        await audit.record(conn, entry)
    return {
        "id": notice_id,
        "acknowledged": True,
        "already_acknowledged": not result[1],
        "receipts": receipts,
    }
