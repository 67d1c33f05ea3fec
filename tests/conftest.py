"""Fixtures: every database test runs on SQLite and on PostgreSQL; the end-to-end suites that
kill brokers run on Tansu and on Apache Kafka."""

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
from tests.services.kafka import KafkaCluster
from tests.support import (
    AnyBroker,
    Broker,
    GatewayProcess,
    KafkaBroker,
    create_pg_database,
    drop_pg_database,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apache Kafka runs with PostgreSQL only, as in production: the SQLite pairing adds
    minutes to the suite and tests nothing the Tansu runs do not."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        p = params.params if params else {}
        pairing = (p.get("broker"), p.get("database_url"))
        (drop if pairing == ("kafka", "sqlite") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One single-node Apache Kafka for the session, started on first use. Tests share it
    through :class:`KafkaBroker` (own topics and groups each)."""
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka"), nodes=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyBroker]:
    """Tansu by default; ``@ON_BOTH_BROKERS`` (tests/support.py) runs a test on both."""
    if getattr(request, "param", "tansu") == "kafka":
        kafka = KafkaBroker(request.getfixturevalue("kafka_cluster"))
        try:
            yield kafka
        finally:
            kafka.heal()
        return
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def gateway(tmp_path: Path, database_url: str, broker: AnyBroker) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gw", database_url, broker)
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


class RunningClock:
    """Time running from ``start`` as fast as real time (orders stay real; the hour is set)."""

    def __init__(self, start: datetime) -> None:
        self.start, self.started = start, datetime.now(UTC)

    def now(self) -> datetime:
        return self.start + (datetime.now(UTC) - self.started)


@pytest.fixture
def office_hours() -> Iterator[RunningClock]:
    """``gateway.clock`` runs from Monday 2026-11-23 09:00 in Stockholm: every unit of the demo
    directory is open, so no notice goes to an on-call unit at once (decision 0019) because
    of the hour the test happens to run at."""
    original = clock.clock
    clock.clock = running = RunningClock(datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
    try:
        yield running
    finally:
        clock.clock = original


@pytest.fixture
def fixed_clock() -> Iterator[FixedClock]:
    """``gateway.clock`` stands still at 2026-11-23 08:00 UTC until the test moves it."""
    original = clock.clock
    clock.clock = fixed = FixedClock(datetime(2026, 11, 23, 8, 0, tzinfo=UTC))
    try:
        yield fixed
    finally:
        clock.clock = original
