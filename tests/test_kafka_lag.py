"""The lag probe against a real broker: how many records a consumer group has yet to read."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gateway.bus import kafka, topics
from tests.support import Broker


async def test_lag_counts_what_the_group_has_not_committed(broker: Broker) -> None:
    await kafka.ensure_topics(broker.bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topics.DELIVERIES, b"v", key=f"k{i}".encode())
    finally:
        await producer.stop()
    probe = kafka.LagProbe(broker.bootstrap)
    try:
        assert await probe.behind(topics.DELIVERIES, "brygga.lagtest") == 3  # never read
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
        assert await probe.behind("no.such.topic", "brygga.lagtest") is None  # cannot tell
        assert await probe.behind(topics.DELIVERIES, "brygga.other") == 3  # probe made again
    finally:
        await probe.close()
