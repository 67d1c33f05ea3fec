"""The FastAPI application. Everything it needs arrives in ``create_app``; no globals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from gateway.api import routes_inbox, routes_ops
from gateway.api.auth import TokenKeys
from gateway.logs import error_fields
from gateway.store.db import Database

log = structlog.get_logger("brygga.api")

DESCRIPTION = """
Brygga moves discharge-coordination messages (LUS) between hospital, primary care and the
municipality, and proves per recipient how far each got.

Authenticate with a bearer token: `brygga token --org HSA-ID --role staff` (inbox) or
`--role ops` (ledger).
"""


def create_app(db: Database, token_keys: TokenKeys, readiness: Callable[[], list[str]]) -> FastAPI:
    app = FastAPI(title="Brygga", version="0.1.0", description=DESCRIPTION)
    app.state.db = db
    app.state.token_keys = token_keys
    app.state.readiness = readiness
    app.include_router(routes_inbox.router)
    app.include_router(routes_ops.router)

    @app.middleware("http")
    async def no_leaks(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # An unexpected error's text may hold patient data: answer generically, log the class.
        try:
            return await call_next(request)
        except Exception as exc:
            log.error("api.error", path=request.url.path, **error_fields(exc))
            return JSONResponse(
                {"detail": "Internal error; the operations log has details."}, status_code=500
            )

    return app
