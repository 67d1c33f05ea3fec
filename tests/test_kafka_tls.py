"""The gateway on Apache Kafka over SASL_SSL (SCRAM-SHA-512), with the settings deploy/ uses:
an admission over MLLP reaches the provider's inbox, and the broker refuses a wrong password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from gateway.bus import kafka
from gateway.demo import admission
from gateway.settings import Settings
from tests.services.kafka import KafkaCluster
from tests.support import GatewayProcess, KafkaBroker, now_sthlm, personnummer, wait_for
from tests.test_e2e_crash import _all_records
from tests.test_e2e_path import inbox, msa, send

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka-tls"), nodes=1, tls=True, sasl=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_the_gateway_runs_end_to_end_over_sasl_ssl(
    secure_kafka: KafkaCluster, tmp_path: Path
) -> None:
    from tests.support import create_pg_database, drop_pg_database

    broker = KafkaBroker(secure_kafka)
    env = broker.gateway_env()
    assert env["BRYGGA_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["BRYGGA_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    url = create_pg_database()
    gw = GatewayProcess(tmp_path / "gw", url, broker)
    try:
        gw.start()
        ack = send(gw, admission("TLS-1", now_sthlm(), pnr=personnummer(901)))
        assert msa(ack)[1] == "AA"
        notices = wait_for(lambda: inbox(gw), timeout=60, what="the notice in the inbox")
        assert len(notices) == 1
        # It travelled over the encrypted, authenticated listener, sealed, on the test's topics.
        records = _all_records(broker)
        assert records and all(k is not None and len(k) == 32 for k, _ in records)
        assert b"TLS-1" not in b"".join(v for _, v in records)
    finally:
        gw.stop()
        drop_pg_database(url)
    assert '"kafka.waiting"' not in gw.logs().split('"gateway.started"')[-1]


async def _admin_with(cluster: KafkaCluster, **override: object) -> None:
    admin = AIOKafkaAdminClient(request_timeout_ms=5000, **(cluster.client_kwargs() | override))
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


async def test_the_broker_refuses_a_wrong_password_and_plain_text(
    secure_kafka: KafkaCluster,
) -> None:
    await _admin_with(secure_kafka)  # the right credentials work
    with pytest.raises(KafkaError):
        await _admin_with(secure_kafka, sasl_plain_password="not-the-password")
    with pytest.raises(KafkaError):
        await _admin_with(secure_kafka, security_protocol="PLAINTEXT")


def test_sasl_without_credentials_is_a_clear_error(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u")
    with pytest.raises(ValueError, match="BRYGGA_KAFKA_SASL_PASSWORD"):
        kafka.Connection.from_settings(s)
    half = Settings(data_dir=tmp_path, kafka_security_protocol="SSL", kafka_ssl_certfile=tmp_path)
    with pytest.raises(ValueError, match="BRYGGA_KAFKA_SSL_KEYFILE"):
        kafka.Connection.from_settings(half)
