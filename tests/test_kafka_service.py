"""The test Apache Kafka itself: three KRaft nodes, topics from deploy/kafka-topics.sh, a node
killed and restarted with its data."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from gateway.bus.topics import ALL_TOPICS
from tests.services.kafka import KafkaCluster


async def _produce(cluster: KafkaCluster, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **cluster.client_kwargs())
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(topic, v, key=b"k", partition=0)
    finally:
        await producer.stop()


async def _read(cluster: KafkaCluster, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **cluster.client_kwargs())
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[bytes] = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out += [r.value for r in records if r.value is not None]
        return out
    finally:
        await consumer.stop()


def test_three_nodes_replicate_and_survive_a_killed_node(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path, nodes=3)
    cluster.start()
    try:
        described = cluster.create_topics("x.")
        for topic in ALL_TOPICS:
            assert f"Topic: x.{topic}\t" in described
        assert described.count("ReplicationFactor: 3") == 4
        assert described.count("min.insync.replicas=2") == 4
        topic = "x.brygga.events"
        asyncio.run(_produce(cluster, topic, [b"one", b"two"]))
        cluster.kill_node(2)
        asyncio.run(_produce(cluster, topic, [b"three"]))  # 2 of 3 in sync: still writable
        cluster.start_node(2)
        cluster.wait_ready()
        cluster.kill_node(0)
        assert asyncio.run(_read(cluster, topic)) == [b"one", b"two", b"three"]
    finally:
        cluster.stop()
