"""Operations API: the receipt ledger of a message; health and readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse

from gateway import audit
from gateway.api.auth import Caller, require_role
from gateway.api.openapi import example
from gateway.pipeline.views import find_message_id, message_ledger, patient_key_of

router = APIRouter(tags=["operations"])
Ops = Annotated[Caller, Depends(require_role("ops", "integration"))]

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
                    "by": {"name": "", "role": "staff", "org": "SE5566778899-HT01"},
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
async def get_message(request: Request, message_id: str, who: Ops) -> dict[str, Any]:
    """Pipeline status, consent decision and, per recipient, every receipt with its time."""
    async with request.app.state.db.transaction() as conn:
        ledger = await message_ledger(conn, message_id)
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
    who: Ops,
    control_id: Annotated[str, Query(min_length=1, max_length=200, examples=["MSG00001"])],
    source: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, list[str]]:
    async with request.app.state.db.read() as conn:
        return {"ids": await find_message_id(conn, source, control_id)}


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
