"""The gateway's HTTP API served by uvicorn on a loopback port, on a real database.

Its own thread and event loop hold the database pool, so synchronous clients (schemathesis,
requests) and asynchronous ones (httpx) can both talk to it over a real socket.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import uvicorn

from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.bus.broker import free_port
from gateway.crypto import columns
from gateway.crypto.kek import LocalKek
from gateway.crypto.keyring import Keyring
from gateway.store.db import Database, migrate
from tests.inprocess import KEYER

# The role each part of the API is for (any role the route accepts would do).
ROLE_BY_PREFIX = (
    ("/api/v1/inbox", "staff"),
    ("/api/v1/audit", "auditor"),
    ("/api/v1/", "ops"),
    ("/fhir/Consent", "integration"),
    ("/fhir/$process-message", "integration"),
    ("/fhir/", "directory-admin"),
)
ORG = "SE2321000016-H001"


class ApiServer:
    def __init__(self, database_url: str, keys_dir: Path, max_body_bytes: int = 1 << 20) -> None:
        self.database_url = database_url
        self.keys = TokenKeys.from_dir(keys_dir)
        self.max_body_bytes = max_body_bytes
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, path: str) -> dict[str, str]:
        """A valid bearer token in the role that the path's routes serve."""
        role = next((r for prefix, r in ROLE_BY_PREFIX if path.startswith(prefix)), "ops")
        return {"Authorization": "Bearer " + self.keys.issue(ORG, role, "Test Person")}

    async def _serve(self) -> None:
        await migrate(self.database_url)
        db = Database(self.database_url)
        keyring = Keyring(db, LocalKek.generate())
        await keyring.start()
        columns.install(keyring)
        app = create_app(db, self.keys, lambda: [], KEYER, self.max_body_bytes)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        try:
            await self._server.serve()
        finally:
            columns.install(None)
            await db.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # seen by start(), which waits for the server
            self._failed = exc

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while self._server is None or not self._server.started:
            if self._failed or not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start: {self._failed!r}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)
        self._server = self._thread = None
