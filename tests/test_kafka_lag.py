"""The lag probe against a real broker: how many records a consumer group has yet to read."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gateway.bus import kafka, topics
from tests.support import Broker


async def test_lag_counts_what_the_group_has_not_committed(broker: Broker) -> None:
    await kafka.ensure_topics(broker.bootstrap)
    await _produce(broker.bootstrap, 3)
    probe = kafka.LagProbe(broker.bootstrap)
    try:
        # never committed: nothing known (the reconciler then republishes by its windows)
        assert await probe.behind(topics.DELIVERIES, "brygga.lagtest") == 0
        consumer = AIOKafkaConsumer(
            topics.DELIVERIES,
            bootstrap_servers=broker.bootstrap,
            group_id="brygga.lagtest",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=3000,
            heartbeat_interval_ms=750,
        )
        await consumer.start()
        try:
            read = 0
            while read < 3:
                batch = await consumer.getmany(timeout_ms=1000)
                read += sum(len(records) for records in batch.values())
            await consumer.commit()
        finally:
            await consumer.stop()
        assert await probe.behind(topics.DELIVERIES, "brygga.lagtest") == 0
        await _produce(broker.bootstrap, 2)
        assert await probe.behind(topics.DELIVERIES, "brygga.lagtest") == 2
        assert await probe.behind("no.such.topic", "brygga.lagtest") is None  # cannot tell
        assert await probe.behind(topics.DELIVERIES, "brygga.lagtest") == 2  # made again
        stalled = kafka.LagProbe(broker.bootstrap, stall_seconds=0.2)
        try:
            assert await stalled.behind(topics.DELIVERIES, "brygga.lagtest") == 2
            await asyncio.sleep(0.3)  # committed nothing since: not a queue being worked
            assert await stalled.behind(topics.DELIVERIES, "brygga.lagtest") == 0
        finally:
            await stalled.close()
    finally:
        await probe.close()


async def _produce(bootstrap: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(topics.DELIVERIES, b"v", key=f"k{i}".encode())
    finally:
        await producer.stop()
