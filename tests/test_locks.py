"""Locks: one order, no deadlock; a retried deadlock; a reconciler that does not flood; the
database's own error text in the log, without patient data."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import audit, clock
from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.logs import error_fields
from gateway.model.events import LusEvent
from gateway.pipeline import reconciler as reconciler_module
from gateway.pipeline.consent import accepted_event, permitted_event
from gateway.pipeline.gate import delivery_event
from gateway.pipeline.reconciler import Reconciler
from gateway.pipeline.stage import StageRunner
from gateway.store.db import Database
from gateway.store.retry import in_transaction, is_retryable, retrying, sqlstate
from gateway.store.tables import deliveries, messages, outbox, processed_events
from tests.conftest import FixedClock
from tests.inprocess import HOME_CARE, KEYER, NIGHT, Pipeline, canonical, parties
from tests.services import postgres
from tests.support import personnummer


def _postgres_only(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite has one writer at a time: no row locks, no deadlocks")


def _server_log_from_here() -> tuple[postgres.PrivateCluster | None, int]:
    cluster = postgres.cluster()
    return cluster, len(cluster.server_log()) if cluster else 0


async def _outbox_ids(db: Database, topic: str) -> list[str]:
    async with db.read() as conn:
        payloads = await conn.execute(
            select(outbox.c.payload).where(outbox.c.topic == topic).order_by(outbox.c.id)
        )
        return [Event.from_json(p).id for p in payloads.scalars()]


# -- the retry helper against a real deadlock ------------------------------------------------


async def test_a_real_deadlock_is_retried_and_both_transactions_commit(db: Database) -> None:
    _postgres_only(db)
    async with db.transaction() as conn:
        await conn.execute(text("CREATE TABLE lock_probe (id int PRIMARY KEY, n int NOT NULL)"))
        await conn.execute(text("INSERT INTO lock_probe VALUES (1, 0), (2, 0)"))
    cluster, start = _server_log_from_here()
    tries = {"a": 0, "b": 0}
    holding = {"a": asyncio.Event(), "b": asyncio.Event()}
    seen: list[BaseException] = []

    async def crosswise(me: str, other: str, first: int, second: int) -> None:
        async def work(conn: AsyncConnection) -> None:
            tries[me] += 1
            bump = text("UPDATE lock_probe SET n = n + 1 WHERE id = :id")
            await conn.execute(bump, {"id": first})
            if tries[me] == 1:  # the first time: wait until the other holds its row
                holding[me].set()
                await holding[other].wait()
            await conn.execute(bump, {"id": second})

        async def once() -> None:
            try:
                await in_transaction(db, work, attempts=1)
            except DBAPIError as exc:
                seen.append(exc)
                raise

        await retrying(once)

    await asyncio.gather(crosswise("a", "b", 1, 2), crosswise("b", "a", 2, 1))

    assert sorted(tries.values()) == [1, 2]  # PostgreSQL gave one up; it ran again, once
    assert [sqlstate(e) for e in seen] == ["40P01"] and is_retryable(seen[0])
    async with db.read() as conn:
        counts = (await conn.execute(text("SELECT n FROM lock_probe ORDER BY id"))).all()
    assert [c.n for c in counts] == [2, 2]  # both committed, each exactly once
    if cluster is not None:  # the server saw the deadlock this test made
        assert "deadlock detected" in cluster.server_log()[start:]


async def test_only_deadlocks_and_serialization_failures_are_retried(db: Database) -> None:
    _postgres_only(db)
    calls = 0

    async def broken(conn: AsyncConnection) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(text("SELECT 1/0"))

    with pytest.raises(DBAPIError) as caught:
        await in_transaction(db, broken)
    assert calls == 1 and sqlstate(caught.value) == "22012" and not is_retryable(caught.value)


# -- the database's error text, without patient data ----------------------------------------


async def test_a_database_error_is_logged_with_its_sqlstate_and_no_patient_data(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    _postgres_only(db)
    import structlog

    from gateway.logs import configure

    configure("info")
    number = personnummer(7)
    claim = {"consumer": "probe", "event_id": f"{number} Tolvan", "processed_at": clock.now()}
    async with db.transaction() as conn:
        await conn.execute(insert(processed_events).values(claim))
    with pytest.raises(DBAPIError) as duplicate:
        async with db.transaction() as conn:
            await conn.execute(insert(processed_events).values(claim))
    with pytest.raises(DBAPIError) as bad_value:
        async with db.transaction() as conn:
            await conn.execute(text("SELECT CAST('Tolvan Tolvansson' AS integer)"))
    log = structlog.get_logger("brygga.test")
    log.warning("probe.duplicate", **error_fields(duplicate.value))
    log.warning("probe.bad_value", **error_fields(bad_value.value))
    out = capsys.readouterr().err

    fields = error_fields(duplicate.value)
    assert fields["sqlstate"] == "23505"
    assert fields["constraint"] == "pk_processed_events" and fields["table"] == "processed_events"
    assert fields["db_message"] == (
        'duplicate key value violates unique constraint "pk_processed_events"'
    )
    assert error_fields(bad_value.value)["sqlstate"] == "22P02"
    assert error_fields(bad_value.value)["db_message"] == (
        'invalid input syntax for type integer: "?"'
    )
    assert '"sqlstate":"23505"' in out and '"sqlstate":"22P02"' in out
    for secret in (number, "Tolvan", "Key ("):  # DETAIL: Key (…)=(…) exists
        assert secret not in out


# -- the reconciler --------------------------------------------------------------------------


async def test_the_reconciler_republishes_a_stalled_event_once_per_in_flight_window(
    db: Database, fixed_clock: FixedClock
) -> None:
    pipeline = Pipeline(db)
    stalled = await pipeline.intake.accept(
        source="T|X", control_id="W-1", raw=b"r", message=canonical(21), answer=lambda m: b"a"
    )
    again = f"message.accepted:{stalled.message_id}"
    reconciler = Reconciler(db, after_seconds=30, interval_seconds=1)

    async def republished(seconds_later: float) -> int:
        fixed_clock.at += timedelta(seconds=seconds_later)
        return await reconciler.reconcile_once()

    assert await republished(29) == 0  # not stalled yet
    assert await republished(2) == 1  # t=31: stalled, republished
    assert (await _outbox_ids(db, topics.EVENTS)).count(again) == 2  # intake's, and this
    for _ in range(5):  # t=36..56: in flight (the first window is after_seconds)
        assert await republished(5) == 0
    assert await republished(6) == 1  # t=62: the window is over, still stalled: again
    assert await republished(59) == 0  # t=121: the window doubled to 60 s
    assert await republished(2) == 1  # t=123
    assert await republished(119) == 0  # t=242: 120 s now
    assert await republished(2) == 1
    assert (await _outbox_ids(db, topics.EVENTS)).count(again) == 5

    # The stage takes it at last and the message moves on; stalled again, it starts afresh.
    fixed_clock.at += timedelta(seconds=1)
    await pipeline._step(pipeline.consent, accepted_event(stalled.message_id))
    assert await republished(29) == 0
    assert await republished(2) == 1  # a permitted event, after one plain window
    assert await republished(29) == 0
    assert await republished(2) == 1  # the window doubled again only from here
    assert (await _outbox_ids(db, topics.EVENTS)).count(
        f"message.permitted:{stalled.message_id}"
    ) == 3  # the stage's own, and two


async def test_the_reconciler_works_in_bounded_batches(
    db: Database, fixed_clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler_module, "BATCH", 2)
    pipeline = Pipeline(db)
    for n in range(5):
        await pipeline.intake.accept(
            source="T|X", control_id=f"B-{n}", raw=b"r", message=canonical(30 + n),
            answer=lambda m: b"a",
        )  # fmt: skip
    reconciler = Reconciler(db, after_seconds=30, interval_seconds=1)
    fixed_clock.at += timedelta(seconds=31)
    assert [await reconciler.reconcile_once() for _ in range(4)] == [2, 2, 1, 0]
    assert len(set(await _outbox_ids(db, topics.EVENTS))) == 5

    monkeypatch.setattr(reconciler_module, "BACKLOG", 3)  # the relay is far behind
    fixed_clock.at += timedelta(seconds=31)
    assert await reconciler.reconcile_once() == 0  # what is in the outbox is in flight


# -- everything at once, on one PostgreSQL database -----------------------------------------


async def test_stages_reconciler_audit_and_inbox_reads_at_once_never_deadlock(
    db: Database, tmp_path: Path
) -> None:
    _postgres_only(db)
    cluster, start = _server_log_from_here()
    pipeline = Pipeline(db)
    runners = {
        name: StageRunner(stage, "unused:0", fetch_wait_ms=10, max_attempts=1)
        for name, stage in (
            ("consent", pipeline.consent),
            ("route", pipeline.route),
            ("deliver", pipeline.deliver),
        )
    }
    keys = TokenKeys.from_dir(tmp_path / "keys")
    app = create_app(db, keys, lambda: [], KEYER)
    staff = {"Authorization": "Bearer " + keys.issue(HOME_CARE, "staff", "Anna Svensson")}
    reconciler = Reconciler(db, after_seconds=0, interval_seconds=1)  # everything is stalled
    done = asyncio.Event()
    answers: list[int] = []
    counts = {"messages": 0, "reads": 0, "audits": 0, "reconciles": 0}

    async def one_message(i: int) -> None:
        # Four patients, each with versions of one stay: newer versions supersede the
        # deliveries of older ones (row locks on them) while those are being delivered.
        event = (LusEvent.INSKRIVNINGSMEDDELANDE, LusEvent.PLANERINGSUNDERLAG)[i % 2]
        message = canonical(
            50 + i % 4, event=event, encounter_id=f"V{i % 4}", parties=parties(HOME_CARE, NIGHT)
        )
        accepted = await pipeline.intake.accept(
            source="T|X", control_id=f"C-{i}", raw=b"r", message=message, answer=lambda m: b"a"
        )
        mid = accepted.message_id
        key = await _key(db, mid)
        await runners["consent"]._handle_once(accepted_event(mid), key)
        await runners["route"]._handle_once(permitted_event(mid), key)
        async with db.read() as conn:
            ids = (
                await conn.execute(select(deliveries.c.id).where(deliveries.c.message_id == mid))
            ).scalars()
            routed = list(ids)
        random.shuffle(routed)
        for delivery_id in routed:
            await runners["deliver"]._handle_once(delivery_event(mid, delivery_id), key)
        counts["messages"] += 1

    async def pipelines() -> None:
        try:
            gate = asyncio.Semaphore(6)

            async def limited(i: int) -> None:
                async with gate:
                    await one_message(i)

            await asyncio.gather(*(limited(i) for i in range(48)))
        finally:
            done.set()

    async def reconciling() -> None:
        while not done.is_set():
            await reconciler.reconcile_once()
            await pipeline.followup.run_once()
            counts["reconciles"] += 1

    async def auditing() -> None:
        entry = audit.AuditEntry(
            actor="probe", actor_org="", role=audit.SYSTEM_ROLE, action="probe.append",
            purpose=audit.PURPOSE_OPERATIONS,
        )  # fmt: skip
        while not done.is_set():
            async with db.transaction() as conn:
                await audit.record(conn, entry)
            counts["audits"] += 1
            await asyncio.sleep(0)

    async def reading(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            answers.append((await client.get("/api/v1/inbox", headers=staff)).status_code)
            counts["reads"] += 1

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await asyncio.gather(
            pipelines(), reconciling(), auditing(), auditing(), reading(client), reading(client)
        )

    print(f"\nconcurrent work done: {counts}")
    assert counts["messages"] == 48 and counts["reads"] > 0 and counts["reconciles"] > 0
    assert set(answers) == {200}
    async with db.read() as conn:
        parked = (
            await conn.execute(select(func.count()).where(outbox.c.topic == topics.DEADLETTER))
        ).scalar_one()
    assert parked == 0
    if cluster is not None:
        assert "deadlock detected" not in cluster.server_log()[start:]


async def _key(db: Database, message_id: str) -> str:
    async with db.read() as conn:
        return str(
            (
                await conn.execute(
                    select(messages.c.patient_key).where(messages.c.id == message_id)
                )
            ).scalar_one()
        )


# -- the API: a lock conflict is retried, then a 503, never a 500 ----------------------------


async def test_an_inbox_read_retries_a_deadlock_then_answers_503_with_retry_after(
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _postgres_only(db)
    from gateway.logs import configure
    from gateway.pipeline import inbox

    configure("info")
    keys = TokenKeys.from_dir(tmp_path / "keys")
    staff = {"Authorization": "Bearer " + keys.issue(HOME_CARE, "staff", "Anna Svensson")}
    listing = inbox.list_notices_keyed
    failures = {"left": 0, "calls": 0}

    async def deadlocking(conn: AsyncConnection, org: str, limit: int = 200) -> Any:
        failures["calls"] += 1
        if failures["left"]:
            failures["left"] -= 1  # the server itself raises it: a real 40P01 from PostgreSQL
            await conn.execute(
                text(
                    "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01', "
                    "MESSAGE = 'deadlock detected'; END $$"
                )
            )
        return await listing(conn, org, limit)

    monkeypatch.setattr(inbox, "list_notices_keyed", deadlocking)
    app = create_app(db, keys, lambda: [], KEYER)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        failures.update(left=2, calls=0)  # twice, then through: the client never knows
        r = await client.get("/api/v1/inbox", headers=staff)
        assert r.status_code == 200 and failures["calls"] == 3

        failures.update(left=100, calls=0)  # every time: a bounded number of tries, then 503
        r = await client.get("/api/v1/inbox", headers=staff)
    assert failures["calls"] == 4
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "transient"
    logged = capsys.readouterr().err
    assert '"event":"api.busy"' in logged and '"sqlstate":"40P01"' in logged
