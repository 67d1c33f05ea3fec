"""The FastAPI application. Everything it needs arrives in ``create_app``; no globals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api import (
    routes_audit,
    routes_consent,
    routes_deviations,
    routes_directory,
    routes_fhir_messaging,
    routes_inbox,
    routes_ops,
    routes_stats,
)
from gateway.api.auth import TokenKeys
from gateway.api.limits import DEFAULT_MAX_BODY_BYTES, InputLimits, refusal
from gateway.bus.keys import PatientKeyer
from gateway.logs import error_fields
from gateway.store.db import Database
from gateway.store.retry import is_retryable, is_unavailable

log = structlog.get_logger("brygga.api")
RETRY_AFTER_SECONDS = 1

DESCRIPTION = """
Brygga moves discharge-coordination messages (LUS) between hospital, primary care and the
municipality, and proves per recipient how far each got.

Authenticate with a bearer token for one person: `brygga token --org HSA-ID --name NAME
[--title TITLE] --role staff` (inbox) or `--role ops` (ledger), `--role integration` (a unit's
own systems: receipts, its ledger, its directory entries, consent for its patients),
`--role directory-admin` (the directory), `--role consent-admin` or `--role auditor` (audit
trail); ops and auditor also read the monthly statistics. Each role reaches only its own
organisation's data unless docs/operations.md ("Who may do what") says otherwise. Every read
of patient data, kvittens and answer is recorded with the token's person and organisation.
"""


def create_app(
    db: Database,
    token_keys: TokenKeys,
    readiness: Callable[[], list[str]],
    keyer: PatientKeyer | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """``keyer``: the patient HMAC secret, to find a patient's consents and audit entries by
    identity number; without it those endpoints answer 503. ``max_body_bytes``: larger
    request bodies are refused (413)."""
    app = FastAPI(title="Brygga", version="0.1.0", description=DESCRIPTION)
    app.state.db = db
    app.state.token_keys = token_keys
    app.state.readiness = readiness
    app.state.keyer = keyer
    app.include_router(routes_inbox.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_consent.router)
    app.include_router(routes_audit.router)
    app.include_router(routes_deviations.router)
    app.include_router(routes_fhir_messaging.router)
    app.include_router(routes_stats.router)
    app.include_router(routes_directory.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FHIR clients read errors as OperationOutcome; the rest of the API keeps "detail".
        if request.url.path.startswith("/fhir"):
            code = {401: "login", 403: "forbidden", 404: "not-found"}.get(exc.status_code)
            return routes_consent.outcome(
                exc.status_code, request.url.path, str(exc.detail), code or "processing"
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # Where and what, never the input: it may be patient data, or NaN or a lone surrogate
        # that cannot be written as JSON at all.
        errors = [
            {
                "loc": [_printable(p) for p in e.get("loc", ())],
                "msg": _printable(e.get("msg")),
                "type": _printable(e.get("type")),
            }
            for e in exc.errors()
        ]
        if request.url.path.startswith("/fhir"):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": ""}
            parts = [] if first["type"] == "json_invalid" else first["loc"]
            where = ".".join(str(p) for p in parts if p != "body") or "body"
            return routes_consent.outcome(400, where, str(first["msg"]))
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(DBAPIError)
    async def busy(request: Request, exc: DBAPIError) -> Response:
        # A deadlock or serialization failure that outlived its retries: the transaction was
        # rolled back whole, so the client may simply ask again; likewise a database that is
        # away for a moment (a restart). Anything else is a 500.
        if is_retryable(exc):
            text = "The database is busy; try again shortly."
        elif is_unavailable(exc):
            text = "The database cannot be reached; try again shortly."
        else:
            raise exc
        log.warning("api.busy", path=request.url.path, **error_fields(exc))
        answer = routes_consent.outcome(503, request.url.path, text, "transient")
        answer.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return answer

    @app.middleware("http")
    async def no_leaks(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # An unexpected error's text may hold patient data: answer generically, log the class.
        try:
            return await call_next(request)
        except Exception as exc:
            log.error("api.error", path=request.url.path, **error_fields(exc))
            text = "Internal error; the operations log has details."
            return refusal(request.url.path, 500, "request", text)

    app.add_middleware(InputLimits, max_body_bytes=max_body_bytes)
    return app


def _printable(value: object) -> str | int:
    """A location part or message that JSON can carry (lone surrogates replaced)."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "replace").decode("utf-8")
