"""Ledger, reconciler and poison-event parking against real databases, time set by the clock."""

from __future__ import annotations

import json
from datetime import timedelta

from aiokafka.structs import ConsumerRecord
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.bus import topics
from gateway.bus.topics import Event
from gateway.crypto import columns
from gateway.pipeline import ledger
from gateway.pipeline.consent import accepted_event
from gateway.pipeline.ledger import State
from gateway.pipeline.reconciler import Reconciler
from gateway.pipeline.stage import Stage, StageRunner
from gateway.store.db import Database
from gateway.store.tables import deliveries, messages, outbox, processed_events
from tests.conftest import FixedClock
from tests.inprocess import HOME_CARE, KEYER, Pipeline, canonical


async def _outbox_events(db: Database, topic: str) -> list[Event]:
    async with db.read() as conn:
        rows = (
            (
                await conn.execute(
                    select(outbox.c.payload).where(outbox.c.topic == topic).order_by(outbox.c.id)
                )
            )
            .scalars()
            .all()
        )
    return [Event.from_json(r) for r in rows]


async def test_ledger_records_each_state_once_and_never_moves_back(db: Database) -> None:
    mid = await Pipeline(db).run(canonical(10), "L-1")
    async with db.transaction() as conn:
        did = (
            await conn.execute(
                select(deliveries.c.id).where(
                    deliveries.c.message_id == mid, deliveries.c.recipient_hsa_id == HOME_CARE
                )
            )
        ).scalar_one()
        key = KEYER.key("x", "y")
        assert await ledger.record(conn, did, mid, key, State.ACKNOWLEDGED)
        assert not await ledger.record(conn, did, mid, key, State.ACKNOWLEDGED)
        assert await ledger.record(conn, did, mid, key, State.READ)  # late, recorded, no regress
        state = (
            await conn.execute(select(deliveries.c.state).where(deliveries.c.id == did))
        ).scalar_one()
    assert state == "acknowledged"
    receipts = [e for e in await _outbox_events(db, topics.RECEIPTS) if e.delivery_id == did]
    assert [e.data["state"] for e in receipts] == [
        "accepted",
        "routed",
        "delivered",
        "acknowledged",
        "read",
    ]


async def test_reconciler_republishes_only_what_has_stalled(
    db: Database, fixed_clock: FixedClock
) -> None:
    pipeline = Pipeline(db)
    stalled = await pipeline.intake.accept(
        source="T|X", control_id="R-1", raw=b"r", message=canonical(11), answer=lambda m: b"a"
    )
    routed = await pipeline.run(canonical(12), "R-2")
    async with db.transaction() as conn:  # one delivery of R-2 lost its Kafka event
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.message_id == routed, deliveries.c.recipient_hsa_id == HOME_CARE)
            .values(state="routed")
        )
    reconciler = Reconciler(db, after_seconds=30, interval_seconds=1)
    fixed_clock.at += timedelta(seconds=10)
    assert await reconciler.reconcile_once() == 0  # too fresh

    fixed_clock.at += timedelta(seconds=30)
    assert await reconciler.reconcile_once() == 2
    events = await _outbox_events(db, topics.EVENTS)
    assert events[-1].id == f"message.accepted:{stalled.message_id}"  # same id: dedup works
    deliveries_events = await _outbox_events(db, topics.DELIVERIES)
    assert deliveries_events[-1].id.startswith("delivery.requested:")
    assert deliveries_events[-1].message_id == routed
    assert await reconciler.reconcile_once() == 0  # touched: not again at once


async def test_purge_keeps_what_is_recent_or_unpublished(
    db: Database, fixed_clock: FixedClock
) -> None:
    await Pipeline(db).run(canonical(14), "PU-1")
    async with db.transaction() as conn:  # pretend the relay published everything
        await conn.execute(update(outbox).values(published_at=clock.now()))
    await Pipeline(db).intake.accept(
        source="T|X", control_id="PU-2", raw=b"r", message=canonical(15), answer=lambda m: b"a"
    )
    reconciler = Reconciler(db, after_seconds=30, interval_seconds=1, retention_days=7)
    assert await reconciler.purge_once() == 0
    fixed_clock.at += timedelta(days=8)
    assert await reconciler.purge_once() > 0
    async with db.read() as conn:
        left = (await conn.execute(select(outbox.c.published_at))).scalars().all()
    assert left == [None]  # the unpublished row of PU-2 is never purged


class Exploding(Stage):
    name = "exploding"
    topic = topics.EVENTS
    handles = frozenset({"message.accepted"})

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.calls = 0

    async def handle(self, conn: AsyncConnection, event: Event, key: str) -> None:
        self.calls += 1
        raise ValueError("cannot handle this one")

    async def park(self, conn: AsyncConnection, event: Event, key: str, error: str) -> None:
        await conn.execute(
            update(messages).where(messages.c.id == event.message_id).values(status="parked")
        )


def _record(event: Event, topic: str = topics.EVENTS) -> ConsumerRecord:  # type: ignore[type-arg]
    """The record as the relay publishes it: sealed for its topic and key."""
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=topics.seal_record(columns.current(), topic, "k", event.to_json()),
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=1,
        headers=(),
    )


async def test_poison_event_is_parked_and_the_partition_moves_on(db: Database) -> None:
    accepted = await Pipeline(db).intake.accept(
        source="T|X", control_id="P-1", raw=b"r", message=canonical(13), answer=lambda m: b"a"
    )
    stage = Exploding(db)
    runner = StageRunner(stage, "unused:0", fetch_wait_ms=10, max_attempts=3)
    record = _record(accepted_event(accepted.message_id))
    await runner._process(record)
    assert stage.calls == 3
    dead = await _outbox_events(db, topics.DEADLETTER)
    assert [e.data["error"] for e in dead] == ["ValueError"]
    assert "cannot handle" not in json.dumps(dead[0].data)  # class only, never the text
    async with db.read() as conn:
        status = (
            await conn.execute(
                select(messages.c.status).where(messages.c.id == accepted.message_id)
            )
        ).scalar_one()
        claims = (await conn.execute(select(processed_events.c.event_id))).scalars().all()
    assert status == "parked" and claims == [f"message.accepted:{accepted.message_id}"]
    await runner._process(record)  # the same record again: already claimed, untouched
    assert stage.calls == 3


async def test_replay_runs_a_parked_message_again(db: Database) -> None:
    from gateway.pipeline.consent import ConsentStage
    from gateway.pipeline.replay import replay

    accepted = await Pipeline(db).intake.accept(
        source="T|X", control_id="RP-1", raw=b"r", message=canonical(16), answer=lambda m: b"a"
    )
    await StageRunner(Exploding(db), "unused:0", fetch_wait_ms=10, max_attempts=1)._process(
        _record(accepted_event(accepted.message_id))
    )
    assert (await replay(db, "no-such-message")) is None
    done = await replay(db, accepted.message_id)
    assert done is not None and done.message and done.deliveries == 0
    fresh = [
        e
        for e in await _outbox_events(db, topics.EVENTS)
        if e.id.startswith(f"message.accepted:{accepted.message_id}:replay:")
    ]
    assert len(fresh) == 1
    await StageRunner(ConsentStage(db), "unused:0", fetch_wait_ms=10, max_attempts=1)._process(
        _record(fresh[0])
    )
    async with db.read() as conn:
        status = (
            await conn.execute(
                select(messages.c.status).where(messages.c.id == accepted.message_id)
            )
        ).scalar_one()
    assert status == "permitted"
    again = await replay(db, accepted.message_id)
    assert again is not None and not again.message  # nothing parked any more


async def test_reconciler_leaves_work_queued_while_its_stage_is_behind(
    db: Database, fixed_clock: FixedClock
) -> None:
    """A stalled row whose stage's consumer group still has records to read is queued there,
    not lost: republishing it would only lengthen the queue. Once caught up, it is lost."""
    stalled = await Pipeline(db).intake.accept(
        source="T|X", control_id="Q-1", raw=b"r", message=canonical(16), answer=lambda m: b"a"
    )
    behind = {"brygga.consent": 7}
    asked: list[tuple[str, str]] = []

    async def lag(topic: str, group: str) -> int | None:
        asked.append((topic, group))
        return behind.get(group, 0)

    reconciler = Reconciler(db, after_seconds=30, interval_seconds=1, lag=lag)
    fixed_clock.at += timedelta(seconds=40)
    assert await reconciler.reconcile_once() == 0
    assert (topics.EVENTS, "brygga.consent") in asked
    assert (topics.DELIVERIES, "brygga.deliver") in asked

    behind["brygga.consent"] = 0  # caught up: what is still accepted was lost
    assert await reconciler.reconcile_once() == 1
    events = await _outbox_events(db, topics.EVENTS)
    assert events[-1].id == f"message.accepted:{stalled.message_id}"

    fixed_clock.at += timedelta(seconds=40)
    unknown = Reconciler(db, after_seconds=30, interval_seconds=1, lag=lambda t, g: _none())
    assert await unknown.reconcile_once() == 1  # progress unknown: republished by window


async def _none() -> int | None:
    return None


async def test_receipts_stage_spends_no_transaction_on_a_receipt_that_settles_nothing(
    db: Database,
) -> None:
    from gateway.pipeline.receipts import ReceiptsStage

    mid = await Pipeline(db).run(canonical(17), "RS-1")
    runner = StageRunner(ReceiptsStage(db), "unused:0", fetch_wait_ms=10, max_attempts=1)
    receipts = [e for e in await _outbox_events(db, topics.RECEIPTS) if e.message_id == mid]
    assert {e.data.get("state") for e in receipts} >= {"routed", "delivered"}
    for event in receipts:  # not terminal: nothing to settle, nothing claimed
        if event.data.get("state") in ("failed", None):
            continue
        await runner._process(_record(event, topics.RECEIPTS))
    async with db.transaction() as conn:
        claims = (await conn.execute(select(processed_events.c.consumer))).scalars().all()
        await conn.execute(
            update(deliveries).where(deliveries.c.message_id == mid).values(state="acknowledged")
        )
    assert "receipts" not in claims
    last = Event(
        id="receipt:last",
        type="receipt.recorded",
        message_id=mid,
        delivery_id=receipts[-1].delivery_id,
        data={"state": "acknowledged"},
    )
    await runner._process(_record(last, topics.RECEIPTS))
    async with db.read() as conn:
        status = (
            await conn.execute(select(messages.c.status).where(messages.c.id == mid))
        ).scalar_one()
    assert status == "complete"
