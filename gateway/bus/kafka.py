"""aiokafka clients configured the one way the gateway uses them.

No idempotent producer and no transactions: the embedded broker does not support them, and
the outbox plus idempotent consumers make them unnecessary.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway.bus.topics import ALL_TOPICS
from gateway.logs import error_fields

log = structlog.get_logger("brygga.kafka")
PARTITIONS = 4


def producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=2,
        request_timeout_ms=10000,
        retry_backoff_ms=200,
    )


def consumer(
    bootstrap: str, topic: str, group: str, fetch_wait_ms: int, session_timeout_ms: int
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_wait_ms,
        max_poll_records=200,
        # Tansu answers a group join after half the session timeout, so the embedded mode
        # uses a short one; a member that stalls longer is replaced, which is harmless
        # because every stage is idempotent. A join waits at most the rebalance timeout for
        # the other members (aiokafka's default is 5 minutes), which also bounds how long
        # leaving the group can hold up a shutdown.
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=session_timeout_ms // 4,
        rebalance_timeout_ms=session_timeout_ms * 2,
        request_timeout_ms=max(10000, session_timeout_ms * 3),
        retry_backoff_ms=200,
        # Notice soon when topics reappear after a broker lost them (memory storage).
        metadata_max_age_ms=3000,
    )


async def keep_topics(bootstrap: str, interval: float = 3.0) -> None:
    """Re-create the topics whenever they vanish (a restarted memory-only broker)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await ensure_topics(bootstrap, attempts=1)
        except Exception as exc:
            log.info("kafka.topics_unavailable", **error_fields(exc))


async def ensure_topics(bootstrap: str, attempts: int = 50) -> None:
    """Create the gateway's topics if missing (several partitions, so workers can share)."""
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in ALL_TOPICS if t not in existing]
            if missing:
                await admin.create_topics(
                    [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in missing]
                )
            return
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.info("kafka.waiting", **error_fields(exc))
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
