"""FHIR messaging: ``POST /fhir/$process-message`` takes recipients' response messages.

A recipient whose FHIR server answered a delivery with 202 sends its application receipt
later as a response message: a Bundle of type ``message`` whose MessageHeader.response
names the delivery (``identifier`` = the Bundle.id / MessageHeader.id the gateway sent,
which is the delivery id). ``ok`` records RECEIVED in the ledger; ``transient-error`` and
``fatal-error`` record an attempt (``unavailable``, ``rejected``) and leave the state to the
follow-up, which resends or falls back. The caller's organisation must be the recipient.

A party's own message (a request, not a response) with a return event (kvittens with needs,
fast vårdkontakt, SIP, request for information and answer, deviation, services started) is
taken as a return message (gateway/pipeline/returns.py, decision 0018); any other request is
not taken over FHIR: 422.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from gateway import audit, clock
from gateway.api.policy import Grant, allow
from gateway.api.routes_consent import EXAMPLE_OUTCOME, FHIR_JSON, fhir_base, outcome
from gateway.api.routes_inbox import accept_return
from gateway.model.bundle import DEFAULT_SOURCE_ENDPOINT
from gateway.model.events import LUS_EVENT_SYSTEM
from gateway.model.identifiers import HSA_SYSTEM
from gateway.pipeline import ledger, returns
from gateway.pipeline.channel_text import issue_text
from gateway.pipeline.delivery import record_attempt
from gateway.pipeline.ledger import State
from gateway.store.tables import deliveries, messages

router = APIRouter(tags=["FHIR messaging (R4)"])
Writer = Annotated[Grant, Depends(allow("delivery.receipt"))]

RESPONSE_CODES = {"ok", "transient-error", "fatal-error"}
_ATTEMPT = {"transient-error": "unavailable", "fatal-error": "rejected"}
_DETAIL = {
    "ok": "Mottagarens system tog emot meddelandet (FHIR-svarsmeddelande ok)",
    "transient-error": "Mottagarens system har ett tillfälligt fel (FHIR-svarsmeddelande)",
    "fatal-error": "Mottagarens system avvisade meddelandet (FHIR-svarsmeddelande)",
}

EXAMPLE_DELIVERY_ID = "6d1f4a52-3c0b-4e8e-9a57-1f2d3c4b5a69"
EXAMPLE_RESPONSE: dict[str, Any] = {
    "resourceType": "Bundle",
    "id": "b2a8e1f0-5d3c-4f7a-9e61-0c2d4b6a8f13",
    "type": "message",
    "timestamp": "2026-11-23T10:02:00+01:00",
    "entry": [
        {
            "fullUrl": "urn:uuid:0e6f5a7b-1c2d-4e3f-8a9b-7c6d5e4f3a21",
            "resource": {
                "resourceType": "MessageHeader",
                "id": "0e6f5a7b-1c2d-4e3f-8a9b-7c6d5e4f3a21",
                "eventCoding": {"system": LUS_EVENT_SYSTEM, "code": "inskrivningsmeddelande"},
                "source": {"endpoint": "https://fhir.omsorgshuset.example.se/fhir"},
                "sender": {"identifier": {"system": HSA_SYSTEM, "value": "SE5566778899-HT01"}},
                "response": {"identifier": EXAMPLE_DELIVERY_ID, "code": "ok"},
            },
        }
    ],
}
EXAMPLE_REJECTED = {
    "resourceType": "Bundle",
    "type": "message",
    "entry": [
        {
            "fullUrl": "urn:uuid:3b1c2d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
            "resource": {
                **EXAMPLE_RESPONSE["entry"][0]["resource"],
                "id": "3b1c2d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
                "response": {
                    "identifier": EXAMPLE_DELIVERY_ID,
                    "code": "fatal-error",
                    "details": {"reference": "OperationOutcome/why"},
                },
            },
        },
        {
            "fullUrl": "urn:uuid:9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d",
            "resource": {
                "resourceType": "OperationOutcome",
                "id": "why",
                "issue": [
                    {
                        "severity": "error",
                        "code": "not-supported",
                        "details": {"text": "Okänd enhet hos mottagaren"},
                    }
                ],
            },
        },
    ],
}
REQUEST_EXAMPLES: dict[str, Any] = {
    "ok": {"summary": "The recipient's application took the message", "value": EXAMPLE_RESPONSE},
    "fatal-error": {
        "summary": "The recipient's application refused it",
        "value": EXAMPLE_REJECTED,
    },
}
NOT_A_RESPONSE = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "not-supported",
            "expression": ["Bundle.entry[0].resource.response"],
            "diagnostics": "inbound clinical messages over FHIR are not accepted here yet; "
            "only response messages (MessageHeader.response) to deliveries of this gateway "
            "and the parties' return messages (kvittens, fast-vardkontakt, kallelse-sip, "
            "sip-avbojd, sip-plan, informationsbegaran, informationssvar, avvikelse, "
            "insatser-startade)",
        }
    ],
}
UNKNOWN = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "not-found",
            "expression": ["Bundle.entry[0].resource.response.identifier"],
            "diagnostics": "no delivery of this gateway has this identifier",
        }
    ],
}


def _acknowledgement(
    request_id: str, event: dict[str, Any], endpoint: str = DEFAULT_SOURCE_ENDPOINT
) -> dict[str, Any]:
    """The gateway's answer: a response message (MessageHeader.response ``ok``) to the
    caller's response message. ``request_id`` is the request's MessageHeader.id (R4:
    response.identifier), ``endpoint`` the gateway's FHIR base as the caller reached it."""
    assert request_id, "a response names its request"
    header_id = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": clock.now().isoformat(),
        "entry": [
            {
                "fullUrl": f"urn:uuid:{header_id}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": header_id,
                    "eventCoding": event,
                    "source": {"endpoint": endpoint},
                    "response": {"identifier": request_id, "code": "ok"},
                },
            }
        ],
    }


EXAMPLE_ANSWER = _acknowledgement(
    str(EXAMPLE_RESPONSE["entry"][0]["resource"]["id"]),
    EXAMPLE_RESPONSE["entry"][0]["resource"]["eventCoding"],
)
EXAMPLE_ANSWER["timestamp"] = "2026-11-23T09:02:01+00:00"


def _docs() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "The receipt is recorded (again: recording is idempotent).",
            "content": {FHIR_JSON: {"example": EXAMPLE_ANSWER}},
        },
        400: {
            "description": "Not a FHIR message Bundle with a MessageHeader.",
            "content": {FHIR_JSON: {"example": EXAMPLE_OUTCOME}},
        },
        401: {"description": "No or invalid bearer token."},
        403: {"description": "Not role integration, or the delivery is to another organisation."},
        404: {
            "description": "No delivery has this response.identifier.",
            "content": {FHIR_JSON: {"example": UNKNOWN}},
        },
        422: {
            "description": "A message that is not a response: not accepted here yet.",
            "content": {FHIR_JSON: {"example": NOT_A_RESPONSE}},
        },
    }


def _header(bundle: Any) -> tuple[dict[str, Any] | None, JSONResponse | None]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return None, outcome(400, "Bundle", "the body must be a FHIR Bundle")
    if bundle.get("type") != "message":
        return None, outcome(400, "Bundle.type", "the Bundle must be of type message")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return None, outcome(400, "Bundle.entry", "entry must be a list of entries")
    first = entries[0].get("resource") if entries and isinstance(entries[0], dict) else None
    if not isinstance(first, dict) or first.get("resourceType") != "MessageHeader":
        return None, outcome(
            400, "Bundle.entry[0].resource", "a message Bundle starts with its MessageHeader"
        )
    return first, None


@router.post(
    "/fhir/$process-message",
    summary="Take a recipient's response message (application receipt)",
    responses=_docs(),
    response_class=JSONResponse,
)
async def process_message(
    request: Request,
    who: Writer,
    bundle: Annotated[dict[str, Any], Body(openapi_examples=REQUEST_EXAMPLES)],
) -> Any:
    """For recipients whose FHIR server answered a delivery with 202: the application receipt
    as a response message. `response.identifier` is the MessageHeader.id the gateway sent
    (the delivery id); `response.code` `ok` records *received* in the ledger,
    `transient-error` and `fatal-error` record an unavailable or rejected attempt for the
    follow-up (resend, or the next channel). Sending the same receipt again changes nothing.
    The token's organisation must be the recipient's HSA-id."""
    header, error = _header(bundle)
    if error is not None:
        return error
    assert header is not None
    response = header.get("response")
    if response is None and returns.is_return_request(header):
        return await _return_message(request, who, bundle, header)
    if not isinstance(response, dict):
        return JSONResponse(NOT_A_RESPONSE, status_code=422, media_type=FHIR_JSON)
    code = response.get("code")
    if not isinstance(code, str) or code not in RESPONSE_CODES:
        return outcome(
            400,
            "Bundle.entry[0].resource.response.code",
            "response.code must be ok, transient-error or fatal-error",
            code="code-invalid",
        )
    delivery_id = response.get("identifier")
    if not isinstance(delivery_id, str):
        return outcome(
            400,
            "Bundle.entry[0].resource.response.identifier",
            "response.identifier must be the id of the delivery (a string)",
        )
    request_id = header.get("id")
    if not isinstance(request_id, str) or not request_id:
        return outcome(
            400,
            "Bundle.entry[0].resource.id",
            "the MessageHeader needs an id: the answer's response.identifier names it",
        )
    async with request.app.state.db.transaction() as conn:
        row = (
            await conn.execute(
                select(
                    deliveries.c.message_id,
                    deliveries.c.recipient_hsa_id,
                    deliveries.c.channel,
                    deliveries.c.attempts,
                    messages.c.patient_key,
                    messages.c.canonical,
                )
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(deliveries.c.id == delivery_id)
            )
        ).one_or_none()
        if row is None:
            return JSONResponse(UNKNOWN, status_code=404, media_type=FHIR_JSON)
        if not who.covers(row.recipient_hsa_id):
            return outcome(
                403,
                "Bundle.entry[0].resource.response.identifier",
                "this delivery is addressed to another organisation than the token's",
                code="forbidden",
            )
        detail = _DETAIL[code]
        if code == "ok":
            await ledger.record(
                conn, delivery_id, row.message_id, row.patient_key, State.RECEIVED, detail=detail
            )
        else:
            # the patient's own Bundle: the receiver's text may echo the patient back
            why = issue_text(bundle, json.loads(row.canonical))
            await record_attempt(
                conn,
                delivery_id,
                row.channel or "fhir",
                max(row.attempts or 0, 1),
                _ATTEMPT[code],
                detail + (f": {why}" if why else ""),
                clock.now(),
            )
        await audit.record(
            conn,
            who.audit_entry(
                "delivery.receipt", audit.PURPOSE_LUS, row.patient_key, delivery_id, code
            ),
        )
    return JSONResponse(
        _acknowledgement(
            request_id,
            header.get("eventCoding") or {"system": LUS_EVENT_SYSTEM},
            fhir_base(request),
        ),
        media_type=FHIR_JSON,
    )


async def _return_message(
    request: Request, who: Grant, bundle: dict[str, Any], header: dict[str, Any]
) -> JSONResponse:
    """A party's own message about a notice it received (decision 0018): stored like every
    inbound message, routed to the ward and to the parties that must know. The Bundle.id is
    the sender's dedup key: the same Bundle again changes nothing."""
    request_id = header.get("id")
    if not isinstance(request_id, str) or not request_id:
        return outcome(
            400,
            "Bundle.entry[0].resource.id",
            "the MessageHeader needs an id: the answer's response.identifier names it",
        )
    control = bundle.get("id") if isinstance(bundle.get("id"), str) else request_id
    try:
        try:
            ret = returns.from_fhir(bundle, header)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            # an element of the wrong FHIR type somewhere: say where we looked, not what
            raise returns.ReturnInvalid(
                "Bundle.entry.resource.where(resourceType='Communication')",
                "the Communication or a resource it references is not valid FHIR R4 JSON",
            ) from None
        async with request.app.state.db.transaction() as conn:
            stored = await accept_return(
                conn,
                who,
                ret,
                source=f"fhir|{who.org}",
                control_id=str(control)[:200],
                raw=json.dumps(bundle).encode(),
                endpoint=fhir_base(request),
            )
    except returns.ReturnInvalid as exc:
        code = "not-found" if exc.status == 404 else "invalid"
        return outcome(exc.status, exc.expression, exc.text, code=code)
    answer = _acknowledgement(request_id, header["eventCoding"], fhir_base(request))
    answer["entry"][0]["resource"]["focus"] = [
        {"identifier": {"system": returns.MESSAGE_SYSTEM, "value": stored.message_id}}
    ]
    return JSONResponse(answer, status_code=200, media_type=FHIR_JSON)
