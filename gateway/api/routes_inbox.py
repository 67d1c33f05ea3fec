"""The provider inbox for parties without a system of their own (home care, SÄBO, rehab)."""

from __future__ import annotations

import json
import uuid
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit
from gateway.api.openapi import example
from gateway.api.policy import Grant, allow
from gateway.api.routes_consent import fhir_base, outcome
from gateway.pipeline import inbox, returns
from gateway.pipeline.ledger import Actor
from gateway.store.retry import in_transaction

router = APIRouter(prefix="/api/v1/inbox", tags=["inbox"])


async def accept_return(
    conn: AsyncConnection,
    who: Grant,
    ret: returns.ReturnMessage,
    *,
    source: str,
    control_id: str,
    raw: bytes,
    endpoint: str,
) -> returns.Stored:
    """A party's return message stored in the caller's transaction, and who sent it in the
    audit trail: one path for the inbox API and FHIR ``$process-message``."""
    stored = await returns.accept(
        conn, ret, who.org, "", source=source, control_id=control_id, raw=raw, endpoint=endpoint
    )
    entry = who.audit_entry(
        "message.return", audit.PURPOSE_LUS, stored.patient_key, stored.message_id, ret.event.value
    )
    await audit.record(conn, entry)
    return stored


Reader = Annotated[Grant, Depends(allow("inbox.read"))]
Acknowledger = Annotated[Grant, Depends(allow("inbox.acknowledge"))]
Answerer = Annotated[Grant, Depends(allow("inbox.return"))]
ReturnKind = Enum(  # type: ignore[misc]
    "ReturnKind", {e.name: e.value for e in sorted(returns.rules().accepted)}, type=str
)
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


EXAMPLE_RETURN = {
    "needs": ["hemtjanst", "trygghetslarm"],
    "text": "Hemtjänst morgon och kväll sedan 2025, larm finns.",
}
RETURN_EXAMPLES: dict[str, Any] = {
    "kvittens": {"summary": "kvittens with current needs and services", "value": EXAMPLE_RETURN},
    "fast-vardkontakt": {
        "summary": "fast vårdkontakt named",
        "value": {
            "contact": {
                "name": "Karin Lind",
                "title": "Distriktssköterska",
                "phone": "08-123 45 67",
            }
        },
    },
    "kallelse-sip": {
        "summary": "SIP invitation",
        "value": {"sip_at": "2026-11-26T10:00:00+01:00", "text": "Möte på avdelningen"},
    },
    "avvikelse": {
        "summary": "deviation with category",
        "value": {"category": "fast-vardkontakt-saknas", "text": "Ingen fast vårdkontakt"},
    },
    "informationssvar": {
        "summary": "answer to a request for information",
        "value": {"answers": "0b9e5c7a-1d2f-4e3a-8b6c-5d4e3f2a1b0c", "text": "Svar"},
    },
}


@router.post(
    "/{notice_id}/returns/{kind}",
    summary="Send a return message about a notice (kvittens, fast vårdkontakt, SIP, …)",
    status_code=201,
    responses=example(
        {"message_id": "0b9e5c7a-1d2f-4e3a-8b6c-5d4e3f2a1b0c", "event": "kvittens"},
        {404: NOT_FOUND},
    ),
)
async def send_return(
    request: Request,
    notice_id: str,
    kind: ReturnKind,
    who: Answerer,
    body: Annotated[dict[str, Any], Body(openapi_examples=RETURN_EXAMPLES)],
) -> Any:
    """A return message about a notice in your inbox, stored and routed to the ward and the
    parties that must know (mappings/routing/returns.toml). The person is the token's (name
    and title), never the body's. A kvittens also acknowledges the notice. Errors are an
    OperationOutcome naming the element."""
    actor = Actor(name=who.name, role=who.title or who.role, org=who.org)
    try:
        ret = returns.from_json(str(kind.value), notice_id, body, actor)
        async with request.app.state.db.transaction() as conn:
            if await inbox.get_notice(conn, who.org, notice_id) is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
            stored = await accept_return(
                conn,
                who,
                ret,
                source=f"inbox|{who.org}",
                control_id=request.headers.get("Idempotency-Key") or str(uuid.uuid4()),
                raw=json.dumps(body).encode(),
                endpoint=fhir_base(request),
            )
    except returns.ReturnInvalid as exc:
        if exc.status == 404:
            raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
        return outcome(422, exc.expression, exc.text)
    return JSONResponse(
        {"message_id": stored.message_id, "event": ret.event.value, "duplicate": stored.duplicate},
        status_code=200 if stored.duplicate else 201,
    )
