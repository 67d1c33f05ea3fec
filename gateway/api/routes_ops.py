"""Operations API: the receipt ledger of a message; unmapped unit codes; health and
readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse

from gateway import audit
from gateway.api.openapi import example
from gateway.api.policy import Grant, allow, sent_by_caller, visible_ledger
from gateway.pipeline.views import find_message_id, message_ledger, patient_key_of
from gateway.store import unmapped

router = APIRouter(tags=["operations"])
Ledger = Annotated[Grant, Depends(allow("message.ledger"))]
Finder = Annotated[Grant, Depends(allow("message.find"))]
Mappers = Annotated[Grant, Depends(allow("unmapped.read"))]

EXAMPLE_LEDGER = {
    "id": "0b9e5c7a-1d2f-4e3a-8b6c-5d4e3f2a1b0c",
    "source": "TAKECARE|SE2321000016-H001",
    "control_id": "MSG00001",
    "event": "inskrivningsmeddelande",
    "status": "complete",
    "consent": {"decision": "permit", "reason": "Patientens samtycke registrerat vid inskrivning"},
    "received_at": "2026-11-23T08:15:02.120000+00:00",
    "deliveries": [
        {
            "delivery_id": "6f1c2a8e-3b7d-4c55-9a41-2f0e8d9b7c11",
            "recipient": {"hsa_id": "SE5566778899-HT01", "name": "Omsorgshuset Hemtjänst AB"},
            "role": "hemtjanst",
            "for_information": True,
            "channel": "inbox",
            "state": "acknowledged",
            "receipts": [
                {"state": "accepted", "at": "2026-11-23T08:15:02.120000+00:00"},
                {"state": "routed", "at": "2026-11-23T08:15:02.180000+00:00"},
                {"state": "delivered", "at": "2026-11-23T08:15:02.210000+00:00"},
                {
                    "state": "read",
                    "at": "2026-11-23T08:40:11.000000+00:00",
                    "by": {
                        "name": "Anna Svensson",
                        "role": "Undersköterska",
                        "org": "SE5566778899-HT01",
                    },
                },
                {
                    "state": "acknowledged",
                    "at": "2026-11-23T08:41:03.000000+00:00",
                    "by": {
                        "name": "Anna Svensson",
                        "role": "Undersköterska",
                        "org": "SE5566778899-HT01",
                    },
                },
            ],
        }
    ],
}


@router.get(
    "/api/v1/messages/{message_id}",
    summary="The receipt ledger of one message",
    responses=example(EXAMPLE_LEDGER, {404: "No such message."}),
)
async def get_message(request: Request, message_id: str, who: Ledger) -> dict[str, Any]:
    """Pipeline status, consent decision and, per recipient, every receipt with its time.
    An integration sees the messages its organisation sent, and of those sent to it only
    its own deliveries."""
    async with request.app.state.db.transaction() as conn:
        ledger = await message_ledger(conn, message_id)
        if ledger is not None:
            ledger = await visible_ledger(conn, who, ledger)
        if ledger is not None:
            key = await patient_key_of(conn, message_id) or ""
            entry = who.audit_entry("message.ledger", audit.PURPOSE_OPERATIONS, key, message_id)
            await audit.record(conn, entry)
    if ledger is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No message with this id.")
    return ledger


@router.get("/api/v1/messages", summary="Find messages by the sender's control id (MSH-10)")
async def find_messages(
    request: Request,
    who: Finder,
    control_id: Annotated[str, Query(min_length=1, max_length=200, examples=["MSG00001"])],
    source: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, list[str]]:
    """An integration finds only the messages its own organisation sent."""
    async with request.app.state.db.read() as conn:
        return {
            "ids": await sent_by_caller(conn, who, await find_message_id(conn, source, control_id))
        }


EXAMPLE_UNMAPPED = {
    "codes": [
        {
            "sender": "SE2321000016-EX01",
            "field": "PV1-3",
            "code": "GER12",
            "first_seen": "2026-11-23T08:15:02.120000+00:00",
            "last_seen": "2026-11-30T16:40:11.000000+00:00",
            "count": 214,
        }
    ]
}


@router.get(
    "/api/v1/ops/unmapped-codes",
    summary="Unit codes senders use that are neither HSA-ids nor mapped",
    responses=example(EXAMPLE_UNMAPPED),
)
async def unmapped_codes(request: Request, who: Mappers) -> dict[str, list[dict[str, Any]]]:
    """Ward codes (PV1-3) and sending facilities (MSH-4) of accepted messages that the
    mapping does not know: the ward's HSA-id fell back to the sender's. Map each in
    mappings/takecare/facilities.toml. Unit codes only, no patient data."""
    async with request.app.state.db.read() as conn:
        return {"codes": await unmapped.listing(conn)}


@router.get("/healthz", summary="The process is alive", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Every stage of this process is running",
    tags=["health"],
    responses={503: {"description": "Some stage is not running yet."}},
)
async def readyz(request: Request) -> JSONResponse:
    waiting = request.app.state.readiness()
    if waiting:
        return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
    return JSONResponse({"status": "ready"})
