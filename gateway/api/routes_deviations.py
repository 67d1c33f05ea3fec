"""The deviation inbox: deviations the gateway raised, for the party responsible to answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from gateway import audit
from gateway.api.openapi import example
from gateway.api.policy import Grant, allow
from gateway.pipeline import deviations

router = APIRouter(tags=["deviations"])
Reader = Annotated[Grant, Depends(allow("deviation.read"))]
Answerer = Annotated[Grant, Depends(allow("deviation.answer"))]
NOT_FOUND = "No deviation with this id for your organisation."

EXAMPLE = {
    "id": "8d3f6b1e-9c2a-4f7e-b5d0-1a2b3c4d5e6f",
    "kind": "missed-receipt",
    "title": "Mottagningskvittens uteblev",
    "summary": "Inskrivningsmeddelande till Omsorgshuset Hemtjänst AB (SE5566778899-HT01) "
    "kvitterades inte före 2026-11-24 09:30",
    "status": "open",
    "responsible": "SE2120001637-M001",
    "message_id": "0b9e5c7a-1d2f-4e3a-8b6c-5d4e3f2a1b0c",
    "delivery_id": "6f1c2a8e-3b7d-4c55-9a41-2f0e8d9b7c11",
    "raised_at": "2026-11-24T08:30:00+00:00",
    "answered_at": None,
    "answered_by": None,
    "answer": None,
}


class Answer(BaseModel):
    """What the responsible party did about the deviation (it closes the deviation). Who
    answered is the token's person; a ``name`` in the body is ignored."""

    text: str = Field(min_length=1, max_length=2000, examples=["Hemtjänsten kontaktad per telefon"])


def _signature(who: Grant) -> str:
    """Who answered, from the verified token: "Maria Larsson, MAS (SE…)"."""
    return f"{who.name}{', ' + who.title if who.title else ''} ({who.org})"[:200]


@router.get(
    "/api/v1/deviations",
    summary="List deviations (your organisation's; all for ops and auditors)",
    responses=example([EXAMPLE]),
)
async def list_deviations(
    request: Request,
    who: Reader,
    state: Annotated[
        Literal["open", "answered"] | None, Query(alias="status", description="open or answered")
    ] = None,
) -> list[dict[str, Any]]:
    """Newest first. A deviation names the message and delivery, never the patient."""
    async with request.app.state.db.read() as conn:
        return await deviations.list_for(conn, who.scope, state)


@router.get(
    "/api/v1/deviations/{deviation_id}",
    summary="One deviation",
    responses=example(EXAMPLE, {404: NOT_FOUND}),
)
async def get_deviation(request: Request, deviation_id: str, who: Reader) -> dict[str, Any]:
    async with request.app.state.db.read() as conn:
        found = await deviations.get(conn, deviation_id, who.scope)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return found


@router.post(
    "/api/v1/deviations/{deviation_id}/answer",
    summary="Answer a deviation (closes it)",
    responses=example(
        {**EXAMPLE, "status": "answered", "answer": "Hemtjänsten kontaktad per telefon"},
        {404: NOT_FOUND},
    ),
)
async def answer_deviation(
    request: Request, deviation_id: str, body: Answer, who: Answerer
) -> dict[str, Any]:
    """The answer is kept (encrypted, it may name people) and the deviation is closed; the
    answer is announced on ``brygga.receipts`` as ``deviation.answered``."""
    async with request.app.state.db.transaction() as conn:
        found = await deviations.answer(conn, deviation_id, who.scope, body.text, _signature(who))
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
        await audit.record(
            conn,
            who.audit_entry("deviation.answer", audit.PURPOSE_LUS, "", deviation_id, "besvarad"),
        )
    return found


@router.get(
    "/fhir/DetectedIssue/{deviation_id}",
    summary="A deviation as a FHIR DetectedIssue",
    responses=example(deviations.to_detected_issue(EXAMPLE), {404: NOT_FOUND}),
)
async def detected_issue(request: Request, deviation_id: str, who: Reader) -> dict[str, Any]:
    async with request.app.state.db.read() as conn:
        found = await deviations.get(conn, deviation_id, who.scope)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return deviations.to_detected_issue(found)
