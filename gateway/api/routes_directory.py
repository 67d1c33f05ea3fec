"""FHIR R4 Organization, HealthcareService and Endpoint: the directory of recipients.

The resources and what each element means are in :mod:`gateway.directory.fhir` and
docs/decisions/0009-directory-as-fhir.md. Writes need the role ``directory-admin``, or
``integration`` for the token's own unit only; reads also ``ops``. Every change is in the
audit trail (no patient data). Routing sees a change with its next message
(:func:`gateway.directory.store.load`).

Errors are FHIR OperationOutcomes naming the element at fault (``expression``): 400 for a
resource the directory cannot use, 404 for an unknown id or a reference to a missing
resource, 409 for a delete (or HSA-id change) that would leave others pointing at nothing,
410 for a deleted resource, 412 when ``If-Match`` names an older version.
"""

# No "from __future__ import annotations": the routes are made in a loop, and FastAPI must see
# their parameter types as objects, not as names to look up in this module.
import uuid
from collections.abc import Awaitable, Callable
from datetime import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit
from gateway.api.policy import Grant, allow, may_change_directory
from gateway.api.routes_consent import FHIR_JSON, fhir_base, outcome
from gateway.directory import Endpoint, Hours, Organisation
from gateway.directory import store as directory_store
from gateway.directory.fhir import FHIR_ID, TYPES, DirectoryInvalid, unit_resources
from gateway.model.identifiers import HSA_SYSTEM

router = APIRouter(tags=["directory (FHIR R4)"])
Writer = Annotated[Grant, Depends(allow("directory.write"))]
Reader = Annotated[Grant, Depends(allow("directory.read"))]
NOT_YOURS = (
    "An integration token changes only its own unit's resources (the Organization with its "
    "HSA-id, and what references that Organization); this one is, or would become, another's."
)

_EXAMPLE_UNIT = Organisation(
    "SE2120001637-B020",
    "Biståndsenheten Skärholmen",
    "needs-assessment",
    "0180",
    (Endpoint("inbox"), Endpoint("fax", "+46850820000")),
    "Skärholmen",
    (Hours(frozenset(range(5)), time(8), time(17)),),
    "SE2120001637-T050",
)
EXAMPLES: dict[str, dict[str, Any]] = {
    r["resourceType"]: r for r in unit_resources(_EXAMPLE_UNIT)[:3]
}
EXAMPLE_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "expression": ["HealthcareService.availableTime[0].availableEndTime"],
            "diagnostics": "closes before it opens (hours past midnight are two entries)",
        }
    ],
}
_ERRORS = {
    400: "Not a usable resource: the OperationOutcome names the element.",
    401: "No or invalid bearer token.",
    403: "The token's role may not do this, or the resource is another unit's.",
    404: "No resource with this id, or a reference to one that does not exist.",
    409: "Other resources still refer to it (on-call unit, MAS, a service's endpoint).",
    410: "The resource was deleted.",
    412: "If-Match names another version than the current one.",
}
_SEARCH = {
    "Organization": "identifier",
    "HealthcareService": "organization",
    "Endpoint": "organization",
}


def _docs(ok: int, example: Any, *errors: int) -> dict[int | str, dict[str, Any]]:
    responses: dict[int | str, dict[str, Any]] = {
        ok: {"content": {FHIR_JSON: {"example": example}} if example else {}}
    }
    for code in errors:
        responses[code] = {
            "description": _ERRORS[code],
            "content": {FHIR_JSON: {"example": EXAMPLE_OUTCOME}},
        }
    return responses


def _answer(stored: directory_store.StoredResource, code: int = 200) -> JSONResponse:
    return JSONResponse(
        stored.resource,
        status_code=code,
        media_type=FHIR_JSON,
        headers={
            "Location": f"/fhir/{stored.type}/{stored.id}/_history/{stored.version}",
            "ETag": f'W/"{stored.version}"',
        },
    )


def _precondition(
    current: directory_store.StoredResource | None, if_match: str | None, rtype: str
) -> JSONResponse | None:
    if if_match is None:
        return None
    version = if_match.removeprefix("W/").strip('"')
    if current is None or str(current.version) != version:
        have = current.version if current else "none"
        return outcome(412, f"{rtype}.meta.versionId", f"current version is {have}", "conflict")
    return None


def _invalid(exc: DirectoryInvalid) -> JSONResponse:
    code = 404 if exc.code == "not-found" else 400
    return outcome(code, exc.path, exc.text, exc.code)


async def _change(
    request: Request,
    rtype: str,
    rid: str,
    who: Grant,
    if_match: str | None,
    write: Callable[[AsyncConnection], Awaitable[directory_store.StoredResource | None]],
    resource: Any = None,
) -> JSONResponse | tuple[directory_store.StoredResource, bool]:
    """One write in one transaction: whose it is, the If-Match check, the write, its audit
    entry. The stored resource and whether it is new, or the OperationOutcome to answer.
    ``resource``: the new version (None: a delete)."""
    async with request.app.state.db.transaction() as conn:
        current = await directory_store.get(conn, rtype, rid)
        if not await may_change_directory(conn, who, rtype, current, resource):
            return outcome(403, rtype, NOT_YOURS, "forbidden")
        failed = _precondition(current, if_match, rtype)
        if failed is not None:
            return failed
        try:
            stored = await write(conn)
        except DirectoryInvalid as exc:
            return _invalid(exc)
        except directory_store.Conflict as exc:
            return outcome(409, exc.path, exc.text, "conflict")
        if stored is None:
            return outcome(404, f"{rtype}.id", f"no {rtype} with this id", "not-found")
        created = current is None or current.deleted
        action = "delete" if stored.deleted else "create" if created else "update"
        await audit.record(
            conn,
            who.audit_entry(
                f"directory.{action}",
                audit.PURPOSE_OPERATIONS,
                "",
                f"{rtype}/{rid}",
                f"v{stored.version}",
            ),
        )
    return stored, created


async def _save(
    request: Request, rtype: str, rid: str, resource: Any, who: Grant, if_match: str | None
) -> JSONResponse:
    if not FHIR_ID.match(rid):
        return outcome(400, f"{rtype}.id", "the id in the URL must be 1-64 of A-Z a-z 0-9 - .")
    done = await _change(
        request,
        rtype,
        rid,
        who,
        if_match,
        lambda conn: directory_store.save(conn, rtype, rid, resource),
        resource,
    )
    if isinstance(done, JSONResponse):
        return done
    stored, created = done
    return _answer(stored, 201 if created else 200)


def _add_routes(rtype: str) -> None:
    example = EXAMPLES[rtype]
    stored_example = {**example, "meta": {"versionId": "1"}}
    body = Annotated[
        dict[str, Any],
        Body(openapi_examples={"example": {"summary": f"A {rtype}", "value": example}}),
    ]
    base = f"/fhir/{rtype}"

    @router.post(
        base,
        status_code=201,
        summary=f"Create a {rtype} (the server assigns the id)",
        responses=_docs(201, stored_example, 400, 401, 403, 404),
        response_class=JSONResponse,
        operation_id=f"create_{rtype}",
    )
    async def create(request: Request, who: Writer, resource: body) -> Any:
        return await _save(request, rtype, str(uuid.uuid4()), resource, who, None)

    @router.put(
        base + "/{rid}",
        summary=f"Create or replace a {rtype} with this id",
        responses=_docs(200, stored_example, 400, 401, 403, 404, 409, 412),
        response_class=JSONResponse,
        operation_id=f"update_{rtype}",
    )
    async def replace(
        request: Request,
        rid: str,
        who: Writer,
        resource: body,
        if_match: Annotated[str | None, Header()] = None,
    ) -> Any:
        if isinstance(resource, dict) and resource.get("id") not in (None, rid):
            return outcome(400, f"{rtype}.id", "the resource's id differs from the id in the URL")
        return await _save(request, rtype, rid, resource, who, if_match)

    @router.get(
        base + "/{rid}",
        summary=f"Read a {rtype}",
        responses=_docs(200, stored_example, 401, 403, 404, 410),
        response_class=JSONResponse,
        operation_id=f"read_{rtype}",
    )
    async def read(request: Request, rid: str, who: Reader) -> Any:
        async with request.app.state.db.read() as conn:
            stored = await directory_store.get(conn, rtype, rid)
        if stored is None:
            return outcome(404, f"{rtype}.id", f"no {rtype} with this id", "not-found")
        if stored.deleted:
            return outcome(410, f"{rtype}.id", f"{rtype}/{rid} was deleted", "deleted")
        return _answer(stored)

    @router.delete(
        base + "/{rid}",
        status_code=204,
        summary=f"Delete a {rtype} (refused while others refer to it)",
        responses=_docs(204, None, 401, 403, 404, 409, 412),
        response_class=Response,
        response_model=None,
        operation_id=f"delete_{rtype}",
    )
    async def remove(
        request: Request,
        rid: str,
        who: Writer,
        if_match: Annotated[str | None, Header()] = None,
    ) -> Any:
        done = await _change(
            request,
            rtype,
            rid,
            who,
            if_match,
            lambda conn: directory_store.delete(conn, rtype, rid),
        )
        if isinstance(done, JSONResponse):
            return done
        return Response(status_code=204)

    param = _SEARCH[rtype]
    hint = (
        f"`{HSA_SYSTEM}|SE…` (the unit's HSA-id)"
        if param == "identifier"
        else "the Organization's id (`Organization/<id>` or `<id>`)"
    )

    @router.get(
        base,
        summary=f"Search {rtype} resources by {param}",
        responses=_docs(200, {"resourceType": "Bundle", "type": "searchset"}, 400, 401, 403),
        response_class=JSONResponse,
        operation_id=f"search_{rtype}",
    )
    async def find(
        request: Request,
        who: Reader,
        value: Annotated[str | None, Query(alias=param, description=hint)] = None,
    ) -> Any:
        criteria: dict[str, str] = {}
        if value is not None and param == "identifier":
            system, sep, hsa = value.rpartition("|")
            if (sep and system != HSA_SYSTEM) or not hsa:
                return outcome(400, "identifier", f"give {HSA_SYSTEM}|<HSA-id>")
            criteria["hsa_id"] = hsa
        elif value is not None:
            criteria["organization"] = value.removeprefix("Organization/")
        async with request.app.state.db.read() as conn:
            found = await directory_store.search(conn, rtype, **criteria)
        return JSONResponse(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "entry": [
                    {
                        "fullUrl": f"{fhir_base(request)}/{rtype}/{s.id}",
                        "resource": s.resource,
                        "search": {"mode": "match"},
                    }
                    for s in found
                ],
            },
            media_type=FHIR_JSON,
        )


for _type in TYPES:
    _add_routes(_type)
