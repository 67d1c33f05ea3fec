"""Fixtures: every database test runs on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import clock
from gateway.crypto import columns
from gateway.crypto.kek import LocalKek
from gateway.crypto.keyring import Keyring
from gateway.store.db import Database, migrate
from tests.support import Broker, GatewayProcess, create_pg_database, drop_pg_database


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.services import postgres

    postgres.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'brygga.db'}"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database (SQLite and PostgreSQL) for in-process tests, with a keyring
    installed as ``Gateway.start`` does (encrypted columns need one)."""
    await migrate(database_url)
    database = Database(database_url)
    keyring = Keyring(database, LocalKek.generate())
    await keyring.start()
    columns.install(keyring)
    yield database
    columns.install(None)
    await database.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def gateway(tmp_path: Path, database_url: str, broker: Broker) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gw", database_url, broker.bootstrap)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


class FixedClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


@pytest.fixture
def fixed_clock() -> Iterator[FixedClock]:
    """``gateway.clock`` stands still at 2026-11-23 08:00 UTC until the test moves it."""
    original = clock.clock
    clock.clock = fixed = FixedClock(datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
    try:
        yield fixed
    finally:
        clock.clock = original
