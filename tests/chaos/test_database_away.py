"""What the PostgreSQL-restart fault test found, in small: a database that is away for a second
or two is not a poison message. A stage's three quick attempts (0.1 + 0.2 + 0.3 s apart) all
fell inside the outage and the message was parked, never delivered; the stage now waits for the
database without counting attempts."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.bus.topics import Event
from gateway.pipeline.consent import accepted_event
from gateway.pipeline.stage import StageRunner
from gateway.store.db import Database, DatabaseUnavailable
from gateway.store.tables import messages
from tests.inprocess import Pipeline, canonical
from tests.test_pipeline_store import Exploding, _record

OUTAGE = 1.5  # seconds; a PostgreSQL restart took 1 to 5 s in the fault tests


class AwayThenBack(Exploding):
    """A handler whose database refuses connections for a while, then works."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.back_at = time.monotonic() + OUTAGE

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        self.calls += 1
        if time.monotonic() < self.back_at:
            raise DatabaseUnavailable("the database cannot be reached") from ConnectionRefusedError(
                111, "Connect call failed"
            )


async def test_a_database_away_for_a_moment_parks_nothing(db: Database) -> None:
    accepted = await Pipeline(db).intake.accept(
        source="T|X", control_id="AWAY-1", raw=b"r", message=canonical(21), answer=lambda m: b"a"
    )
    stage = AwayThenBack(db)
    runner = StageRunner(stage, "unused:0", fetch_wait_ms=10, max_attempts=3)
    await runner._process(_record(accepted_event(accepted.message_id)))
    async with db.read() as conn:
        status = (
            await conn.execute(
                select(messages.c.status).where(messages.c.id == accepted.message_id)
            )
        ).scalar_one()
    assert status != "parked", f"parked after {stage.calls} attempts in a {OUTAGE} s outage"
    assert runner.handled == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_restarting_postgresql_is_recognised_as_away_not_as_a_failure(
    database_url: str,
) -> None:
    """On the real server: while it is down, and on a pooled connection the restart broke, the
    error is one ``is_unavailable`` knows; once it is back, work goes through."""
    from sqlalchemy import text

    from gateway.store.retry import is_unavailable
    from tests.services import postgres

    cluster = postgres.cluster()
    if cluster is None:
        pytest.skip("$BRYGGA_TEST_PG names a server the tests do not control")
    database = Database(database_url)
    try:
        async with database.transaction() as conn:  # a pooled connection, broken by the stop
            await conn.execute(text("SELECT 1"))
        cluster.stop("immediate")
        try:
            for _ in range(2):  # the pooled connection, then a new one that is refused
                with pytest.raises(Exception) as caught:
                    async with database.transaction() as conn:
                        await conn.execute(text("SELECT 1"))
                assert is_unavailable(caught.value), repr(caught.value)
        finally:
            cluster.start()
        async with database.transaction() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await database.close()
