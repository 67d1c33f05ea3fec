"""aiokafka clients configured the one way the gateway uses them.

Producers always ask for ``acks=all``; the idempotent producer is on where the cluster offers it
(Apache Kafka: ``BRYGGA_KAFKA_IDEMPOTENCE``), off on the embedded broker, which cannot. Nothing
depends on it: the outbox plus idempotent consumers already give exactly-once effects; it only
keeps a producer retry from writing a record twice. No transactions.

How to reach the cluster (TLS, SASL, a topic prefix) is one :class:`Connection`, installed once
per process by :func:`install`, as the keyring is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from gateway.bus.topics import ALL_TOPICS
from gateway.logs import error_fields

if TYPE_CHECKING:
    from gateway.settings import Settings

log = structlog.get_logger("brygga.kafka")
PARTITIONS = 4


@dataclass(frozen=True)
class Connection:
    """Security and naming of this process's Kafka clients."""

    security_protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: str | None = None
    idempotence: bool = False
    topic_prefix: str = ""

    @classmethod
    def from_settings(cls, s: Settings) -> Connection:
        protocol = s.kafka_security_protocol
        context = None
        if protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(
                cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.kafka_ssl_certfile or s.kafka_ssl_keyfile:
                if not (s.kafka_ssl_certfile and s.kafka_ssl_keyfile):
                    raise ValueError(
                        "Kafka client TLS needs both BRYGGA_KAFKA_SSL_CERTFILE and "
                        "BRYGGA_KAFKA_SSL_KEYFILE"
                    )
                context.load_cert_chain(s.kafka_ssl_certfile, s.kafka_ssl_keyfile)
        password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None
        if protocol.startswith("SASL_") and not (s.kafka_sasl_username and password):
            raise ValueError(
                f"BRYGGA_KAFKA_SECURITY_PROTOCOL={protocol} needs BRYGGA_KAFKA_SASL_USERNAME "
                "and BRYGGA_KAFKA_SASL_PASSWORD"
            )
        return cls(
            security_protocol=protocol,
            ssl_context=context,
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_username=s.kafka_sasl_username,
            sasl_password=password,
            idempotence=s.kafka_idempotence,
            topic_prefix=s.kafka_topic_prefix,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client of this process gets."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        if self.security_protocol.startswith("SASL_"):
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        return kwargs


_connection = Connection()


def install(connection: Connection) -> None:
    global _connection
    _connection = connection


def topic_name(topic: str) -> str:
    """The name on the cluster of one of the gateway's topics (or consumer groups)."""
    return _connection.topic_prefix + topic


def group_id(stage: str) -> str:
    """The consumer group of the pipeline stage ``stage`` (before the topic prefix)."""
    return f"brygga.{stage}"


def producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=_connection.idempotence,
        linger_ms=2,
        request_timeout_ms=10000,
        retry_backoff_ms=200,
        **_connection.client_kwargs(),
    )


def consumer(
    bootstrap: str, topic: str, group: str, fetch_wait_ms: int, session_timeout_ms: int
) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic_name(topic),
        bootstrap_servers=bootstrap,
        group_id=topic_name(group),
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
        **_connection.client_kwargs(),
    )


class LagProbe:
    """How many records a stage's consumer group has yet to read from its topic.

    The reconciler asks before it republishes: while the group is behind, the work it would
    republish is most likely still queued, and a republished event would only join the end
    of the same queue. But a group that is behind and has committed nothing new for
    ``stall_seconds`` is not working through a queue (a consumer wedged after the broker lost
    its log, say): it counts as not behind, so the reconciler republishes by its windows as
    it would without the probe. Two long-lived clients (an admin client for the group's
    committed offsets, a group-less consumer for the end offsets), made again after a failure.
    """

    def __init__(self, bootstrap: str, timeout: float = 5.0, stall_seconds: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self.stall_seconds = stall_seconds
        self._progress: dict[tuple[str, str], tuple[int, float]] = {}  # committed, when seen
        self._admin: AIOKafkaAdminClient | None = None
        self._offsets: AIOKafkaConsumer | None = None

    async def behind(self, topic: str, group: str) -> int | None:
        """Records of ``topic`` not yet committed by ``group``; None if it cannot be told."""
        try:
            return await asyncio.wait_for(
                self._behind(topic_name(topic), topic_name(group)), self.timeout
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("kafka.lag_unknown", topic=topic, **error_fields(exc))
            await self.close()
            return None

    async def _behind(self, topic: str, group: str) -> int:
        if self._admin is None or self._offsets is None:
            kwargs = _connection.client_kwargs()
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **kwargs)
            self._offsets = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **kwargs)
            await self._admin.start()
            await self._offsets.start()
        partitions = self._offsets.partitions_for_topic(topic)
        if not partitions:
            await self._offsets.topics()  # fetches the cluster's metadata
            partitions = self._offsets.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"no partitions known for {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        committed = await self._admin.list_consumer_group_offsets(group, partitions=tps)
        ends = await self._offsets.end_offsets(tps)
        behind = done_total = 0
        for tp in tps:
            done = committed.get(tp)
            # No commit (a new group, or a broker that lost its offsets, whose consumers may
            # still be reading from positions they hold in memory): nothing known, so the
            # reconciler republishes by its windows, as it would without the probe. A
            # broker that lost its log has ends below the commits: not behind either.
            if done is not None and done.offset >= 0:
                behind += max(0, ends[tp] - done.offset)
                done_total += done.offset
        now = asyncio.get_running_loop().time()
        last = self._progress.get((topic, group))
        if last is None or last[0] != done_total:
            self._progress[(topic, group)] = (done_total, now)
        elif now - last[1] > self.stall_seconds:
            return 0  # behind, but not moving: not a queue being worked through
        return behind

    async def close(self) -> None:
        admin, offsets, self._admin, self._offsets = self._admin, self._offsets, None, None
        with contextlib.suppress(Exception):
            if admin is not None:
                await admin.close()
        with contextlib.suppress(Exception):
            if offsets is not None:
                await offsets.stop()


async def keep_topics(bootstrap: str, interval: float = 3.0) -> None:
    """Re-create the topics whenever they vanish (a restarted memory-only broker)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await ensure_topics(bootstrap, attempts=1)
        except Exception as exc:
            log.info("kafka.topics_unavailable", **error_fields(exc))


async def ensure_topics(bootstrap: str, attempts: int = 50, *, create: bool = True) -> None:
    """Create the gateway's topics if missing (several partitions, so workers can share).

    With ``create`` off (topics made by deploy/kafka-topics.sh, replicated), only wait until
    they exist, and say which are missing if they never appear.
    """
    wanted = [topic_name(t) for t in ALL_TOPICS]
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=5000, **_connection.client_kwargs()
        )
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing and not create:
                raise LookupError(
                    f"Kafka topics missing: {', '.join(missing)} (create them with "
                    "deploy/kafka-topics.sh, or set BRYGGA_KAFKA_CREATE_TOPICS=true)"
                )
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
