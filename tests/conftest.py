"""Fixtures: every database test runs on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.store.db import Database, migrate
from tests.support import Broker, GatewayProcess, create_pg_database, drop_pg_database


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
    """A migrated database (SQLite and PostgreSQL) for in-process tests."""
    await migrate(database_url)
    database = Database(database_url)
    yield database
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
