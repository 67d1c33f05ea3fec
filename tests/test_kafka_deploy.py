"""deploy/ runs the gateway on Kafka with exactly the settings the tests use against a real
Apache Kafka (tests/services/kafka.py): compose in plain text, Kubernetes over SASL_SSL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.services.kafka import KafkaCluster, kafka_version

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# Where a deployment differs by nature: its own hosts, files and secrets.
SITE_SPECIFIC = {
    "BRYGGA_KAFKA_BOOTSTRAP",
    "BRYGGA_KAFKA_SSL_CAFILE",
    "BRYGGA_KAFKA_SASL_USERNAME",
    "BRYGGA_KAFKA_SASL_PASSWORD",
}


def _settings(text: str) -> dict[str, str]:
    """``BRYGGA_…: value`` pairs of a YAML file (maps of plain scalars only)."""
    found = re.findall(r"^\s+(BRYGGA_[A-Z_]+):\s*\"?([^\"\n#]*?)\"?\s*(?:#.*)?$", text, re.M)
    return dict(found)


@pytest.mark.parametrize(
    ("path", "tls_sasl"),
    [("compose.yaml", False), ("kubernetes/brygga.yaml", True)],
)
def test_deploy_uses_the_tests_kafka_settings(tmp_path: Path, path: str, tls_sasl: bool) -> None:
    cluster = KafkaCluster(tmp_path, nodes=3, tls=tls_sasl, sasl=tls_sasl)
    cluster.ca_path = tmp_path / "ca.pem"  # not started: only its settings are read
    text = (DEPLOY / path).read_text()
    deployed = _settings(text)
    for name, value in cluster.gateway_env().items():
        if name in SITE_SPECIFIC:
            assert name in text, f"{path} does not set {name}"
        else:
            assert deployed.get(name) == value, f"{path}: {name}"


def test_compose_runs_the_tests_kafka_version() -> None:
    images = re.findall(r"image: apache/kafka:(\S+)", (DEPLOY / "compose.yaml").read_text())
    assert images and set(images) == {kafka_version()}
