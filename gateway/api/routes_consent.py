"""FHIR R4 Consent: the legal basis for telling recipients about a patient.

``POST /fhir/Consent`` records one, ``PUT /fhir/Consent/{id}`` replaces it (a new version: this
is how a consent is withdrawn, ``status: inactive``), ``GET`` reads one or searches by patient.
Every change is handed to the gate at once: deliveries held for want of a basis leave in the
same transaction, and a withdrawal or objection stops what has not been delivered yet.

Errors are FHIR OperationOutcomes naming the element at fault (``expression``).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response, status
from fastapi.responses import JSONResponse

from gateway import audit, clock
from gateway.api.policy import Grant, allow, may_read_consent, may_record_consent
from gateway.model.bundle import CONSENT_BASIS_SYSTEM
from gateway.model.consent import (
    PURPOSE_SYSTEM,
    RECIPIENT_KIND_SYSTEM,
    ConsentInvalid,
    from_fhir,
    to_fhir,
)
from gateway.model.fhir_shape import preload, shape_error
from gateway.model.identifiers import (
    HSA_SYSTEM,
    KIND_BY_SYSTEM,
    SYSTEMS,
    InvalidIdentifier,
    parse_patient_id,
)
from gateway.pipeline import gate

preload("Consent")
router = APIRouter(tags=["consent (FHIR R4)"])
Writer = Annotated[Grant, Depends(allow("consent.write"))]
Reader = Annotated[Grant, Depends(allow("consent.read"))]
FHIR_JSON = "application/fhir+json"

EXAMPLE_CONSENT: dict[str, Any] = {
    "resourceType": "Consent",
    "status": "active",
    "scope": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                "code": "patient-privacy",
            }
        ]
    },
    "category": [{"coding": [{"system": CONSENT_BASIS_SYSTEM, "code": "samtycke"}]}],
    "patient": {"identifier": {"system": SYSTEMS[next(iter(SYSTEMS))], "value": "191212121212"}},
    "dateTime": "2026-11-23T09:15:00+01:00",
    "provision": {
        "type": "permit",
        "period": {"start": "2026-11-23T09:15:00+01:00", "end": "2027-02-23T00:00:00+01:00"},
        "actor": [
            {"reference": {"identifier": {"system": RECIPIENT_KIND_SYSTEM, "value": "hemtjanst"}}},
            {"reference": {"identifier": {"system": HSA_SYSTEM, "value": "SE2321000016-V010"}}},
        ],
        "purpose": [{"system": PURPOSE_SYSTEM, "code": "lus"}],
    },
}
EXAMPLE_STORED = {**EXAMPLE_CONSENT, "id": "3f0c6f1e-8a51-4d2b-9c0e-2b7e4d5a6c11"}
EXAMPLE_STORED["meta"] = {"versionId": "1"}
EXAMPLE_SEARCH = {
    "resourceType": "Bundle",
    "type": "searchset",
    "total": 1,
    "entry": [
        {
            "fullUrl": f"https://brygga.example/fhir/Consent/{EXAMPLE_STORED['id']}",
            "resource": EXAMPLE_STORED,
        }
    ],
}
CREATE_EXAMPLES: dict[str, Any] = {
    "samtycke": {"summary": "Consent for home care and one clinic", "value": EXAMPLE_CONSENT}
}
UPDATE_EXAMPLES: dict[str, Any] = {
    "återkallat": {
        "summary": "The patient withdraws the consent",
        "value": {**EXAMPLE_STORED, "status": "inactive"},
    }
}
EXAMPLE_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "expression": ["Consent.patient.identifier.value"],
            "diagnostics": "check digit does not match (Luhn)",
        }
    ],
}


NO_KEY = "This process has no patient key (keys/patient-hmac.key); run it beside intake."
NO_RELATION = (
    "Your organisation has no care relation with this patient: it has neither sent nor "
    "received a message about them (docs/operations.md, 'Who may do what')."
)


def _purpose(who: Grant) -> str:
    """Why a reader reads: an auditor follows up; everyone else coordinates the discharge."""
    return audit.PURPOSE_AUDIT if who.role == "auditor" else audit.PURPOSE_LUS


def fhir_base(request: Request) -> str:
    """The FHIR base the caller used (``…/fhir``): fullUrls and endpoints must be absolute, and
    only the address the caller reached is sure to be one it can reach again."""
    return str(request.base_url).rstrip("/") + "/fhir"


def outcome(status_code: int, expression: str, text: str, code: str = "invalid") -> JSONResponse:
    """A FHIR OperationOutcome with one error issue."""
    return JSONResponse(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": code,
                    "expression": [expression],
                    "diagnostics": text,
                }
            ],
        },
        status_code=status_code,
        media_type=FHIR_JSON,
    )


def _docs(ok: int, ok_example: Any, *errors: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "The resource is not a usable Consent: the OperationOutcome names the element.",
        401: "No or invalid bearer token.",
        403: "The token's role may not do this, or its organisation has no care relation "
        "with the patient.",
        404: "No Consent with this id.",
    }
    responses: dict[int | str, dict[str, Any]] = {
        ok: {"content": {FHIR_JSON: {"example": ok_example}}}
    }
    for code in errors:
        responses[code] = {
            "description": texts[code],
            "content": {FHIR_JSON: {"example": EXAMPLE_OUTCOME}},
        }
    return responses


def is_consent(resource: Any) -> bool:
    return isinstance(resource, dict) and resource.get("resourceType") == "Consent"


def _stored(response: Response, stored: gate.StoredConsent) -> dict[str, Any]:
    response.headers["Location"] = f"/fhir/Consent/{stored.record.id}/_history/{stored.version}"
    response.headers["ETag"] = f'W/"{stored.version}"'
    return to_fhir(stored.record, stored.version)


async def _save(
    request: Request, resource: Any, consent_id: str, who: Grant
) -> gate.StoredConsent | JSONResponse:
    shape = shape_error(resource, "Consent", required=False) if is_consent(resource) else None
    if shape is not None:
        return outcome(status.HTTP_400_BAD_REQUEST, *shape)
    try:
        record = from_fhir(resource, consent_id, clock.now())
    except ConsentInvalid as exc:
        return outcome(status.HTTP_400_BAD_REQUEST, exc.path, exc.text)
    keyer = request.app.state.keyer
    if keyer is None:
        return outcome(503, "Consent", NO_KEY, code="transient")
    key = keyer.key(record.patient.system, record.patient.value)
    async with request.app.state.db.transaction() as conn:
        before = await gate.load(conn, consent_id)
        keys = {key} | ({before.patient_key} if before else set())
        for patient_key in keys:
            if not await may_record_consent(conn, who, patient_key):
                return outcome(403, "Consent.patient", NO_RELATION, code="forbidden")
        stored = await gate.store(conn, record, patient_key=key, source="api", source_id=who.org)
        action = "consent.create" if stored.version == 1 else "consent.update"
        detail = f"{record.basis} {record.status}"
        await audit.record(conn, who.audit_entry(action, audit.PURPOSE_LUS, key, record.id, detail))
        return stored


@router.post(
    "/fhir/Consent",
    status_code=status.HTTP_201_CREATED,
    summary="Record a consent, menprövning or objection",
    responses=_docs(201, EXAMPLE_STORED, 400, 401, 403),
    response_class=JSONResponse,
)
async def create_consent(
    request: Request,
    response: Response,
    who: Writer,
    resource: Annotated[dict[str, Any], Body(openapi_examples=CREATE_EXAMPLES)],
) -> Any:
    """The basis category (samtycke, menprovning, sparr) is a coding of
    `https://brygga.dev/fhir/CodeSystem/consent-basis`; recipients are organisations
    (HSA-id) or kinds of party (`https://brygga.dev/fhir/CodeSystem/recipient-kind`); no
    actor means every recipient. Held deliveries it permits leave at once."""
    stored = await _save(request, resource, str(uuid.uuid4()), who)
    if isinstance(stored, JSONResponse):
        return stored
    return _stored(response, stored)


@router.put(
    "/fhir/Consent/{consent_id}",
    summary="Replace a consent (withdraw it with status inactive)",
    responses=_docs(200, EXAMPLE_STORED, 400, 401, 403),
    response_class=JSONResponse,
)
async def update_consent(
    request: Request,
    response: Response,
    consent_id: str,
    who: Writer,
    resource: Annotated[dict[str, Any], Body(openapi_examples=UPDATE_EXAMPLES)],
) -> Any:
    """A new version of the record. A withdrawn consent (status `inactive` or `rejected`)
    denies what has not been delivered; an id not seen before is created (201)."""
    try:
        uuid.UUID(consent_id)
    except ValueError:
        return outcome(400, "Consent.id", "the id in the URL must be a UUID")
    if isinstance(resource, dict) and resource.get("id") not in (None, consent_id):
        return outcome(400, "Consent.id", "the resource's id differs from the id in the URL")
    stored = await _save(request, resource, consent_id, who)
    if isinstance(stored, JSONResponse):
        return stored
    if stored.version == 1:
        response.status_code = status.HTTP_201_CREATED
    return _stored(response, stored)


@router.get(
    "/fhir/Consent/{consent_id}",
    summary="Read a consent record",
    responses=_docs(200, EXAMPLE_STORED, 401, 403, 404),
    response_class=JSONResponse,
)
async def read_consent(request: Request, response: Response, consent_id: str, who: Reader) -> Any:
    """Consents of a patient the caller's organisation has no care relation with are not
    found (404)."""
    async with request.app.state.db.transaction() as conn:
        stored = await gate.load(conn, consent_id)
        if stored is None or not await may_read_consent(conn, who, stored.patient_key):
            return outcome(404, "Consent.id", "no Consent with this id", code="not-found")
        await audit.record(
            conn,
            who.audit_entry("consent.read", _purpose(who), stored.patient_key, consent_id),
        )
    response.headers["ETag"] = f'W/"{stored.version}"'
    return to_fhir(stored.record, stored.version)


@router.get(
    "/fhir/Consent",
    summary="The consent records of one patient",
    responses=_docs(
        200,
        EXAMPLE_SEARCH,
        400,
        401,
        403,
    ),
    response_class=JSONResponse,
)
async def search_consents(
    request: Request,
    who: Reader,
    patient: Annotated[
        str,
        Query(
            alias="patient:identifier",
            description="`system|value` of the patient's identifier",
            examples=[f"{SYSTEMS[next(iter(SYSTEMS))]}|191212121212"],
        ),
    ],
) -> Any:
    system, _, value = patient.partition("|")
    kind = KIND_BY_SYSTEM.get(system)
    if kind is None or not value:
        return outcome(
            400, "patient:identifier", f"give system|value; system one of {sorted(KIND_BY_SYSTEM)}"
        )
    try:
        pid = parse_patient_id(kind, value)
    except InvalidIdentifier as exc:
        return outcome(400, "patient:identifier", str(exc))
    keyer = request.app.state.keyer
    if keyer is None:
        return outcome(503, "patient:identifier", NO_KEY, code="transient")
    key = keyer.key(pid.system, pid.value)
    async with request.app.state.db.transaction() as conn:
        if not await may_read_consent(conn, who, key):
            return outcome(403, "patient:identifier", NO_RELATION, code="forbidden")
        found = await gate.find(conn, key)
        entry = who.audit_entry("consent.search", _purpose(who), key, "", f"{len(found)} träffar")
        await audit.record(conn, entry)
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "entry": [
            {
                "fullUrl": f"{fhir_base(request)}/Consent/{s.record.id}",
                "resource": to_fhir(s.record, s.version),
                "search": {"mode": "match"},
            }
            for s in found
        ],
    }
