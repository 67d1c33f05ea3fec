"""Real parts for tests: Kafka-protocol brokers (Tansu, Apache Kafka), databases, gateways."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import pytest

from gateway.api.auth import TokenKeys
from gateway.bus import broker as broker_mod
from gateway.bus.broker import free_port
from gateway.clock import STOCKHOLM
from gateway.model.identifiers import synthetic_personnummer

if TYPE_CHECKING:
    from tests.services.kafka import KafkaCluster

personnummer = synthetic_personnummer  # the tests' made-up patients


def pg_admin_dsn() -> str:
    """The PostgreSQL admin DSN: ``$BRYGGA_TEST_PG``, else the session's private cluster."""
    from tests.services import postgres

    return postgres.ensure()


def now_sthlm() -> datetime:
    return datetime.now(STOCKHOLM)


# A suite that runs on Tansu and on Apache Kafka: ``@ON_BOTH_BROKERS`` on a test that takes
# the ``broker`` fixture (tests/conftest.py).
ON_BOTH_BROKERS = pytest.mark.parametrize("broker", ["tansu", "kafka"], indirect=True)


class AnyBroker(Protocol):
    """What a suite parametrised over both brokers uses (Tansu, or Apache Kafka)."""

    name: str

    @property
    def bootstrap(self) -> str: ...
    def gateway_env(self) -> dict[str, str]: ...
    def client_kwargs(self) -> dict[str, Any]: ...
    def topic(self, name: str) -> str: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def kill_node(self, i: int) -> None: ...
    def start_node(self, i: int) -> None: ...


class Broker:
    """Tansu on a loopback port; can be killed (losing everything) and restarted."""

    name = "tansu"

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def gateway_env(self) -> dict[str, str]:
        # Tansu answers a group join after half the session: keep it short.
        return {
            "BRYGGA_KAFKA_BOOTSTRAP": self.bootstrap,
            "BRYGGA_CONSUMER_SESSION_TIMEOUT_MS": "3000",
        }

    def client_kwargs(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.bootstrap}

    def topic(self, name: str) -> str:
        return name

    def start(self) -> None:
        self.proc = broker_mod.spawn(self.port, self.log, die_with_parent=True)
        asyncio.run(broker_mod.wait_listening(self.port))

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def kill_node(self, i: int = 0) -> None:
        self.kill()

    def start_node(self, i: int = 0) -> None:
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class KafkaBroker:
    """One test's share of a session's Apache Kafka: topics and consumer groups of its own
    (a topic prefix), made with deploy/kafka-topics.sh. Killed nodes restart with their data."""

    name = "kafka"

    def __init__(self, cluster: KafkaCluster, prefix: str | None = None) -> None:
        self.cluster = cluster
        self.prefix = prefix if prefix is not None else f"t{uuid.uuid4().hex[:10]}."
        cluster.create_topics(self.prefix)

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def gateway_env(self) -> dict[str, str]:
        return self.cluster.gateway_env() | {"BRYGGA_KAFKA_TOPIC_PREFIX": self.prefix}

    def client_kwargs(self) -> dict[str, Any]:
        return self.cluster.client_kwargs()

    def topic(self, name: str) -> str:
        return self.prefix + name

    def kill(self) -> None:
        for i in range(self.cluster.nodes):
            self.cluster.kill_node(i)

    def start(self) -> None:
        for i in range(self.cluster.nodes):
            self.cluster.start_node(i)
        self.cluster.wait_ready()

    def kill_node(self, i: int) -> None:
        self.cluster.kill_node(i)

    def start_node(self, i: int) -> None:
        self.cluster.start_node(i)

    def heal(self) -> None:
        """Every node running again, for the next test on the same cluster."""
        dead = [i for i, p in enumerate(self.cluster.procs) if p is None or p.poll() is not None]
        for i in dead:
            self.cluster.start_node(i)
        if dead:
            self.cluster.wait_ready()


def create_pg_database() -> str:
    import asyncpg

    name = f"brygga_test_{uuid.uuid4().hex[:12]}"

    async def go() -> None:
        conn = await asyncpg.connect(pg_admin_dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go())
    base = pg_admin_dsn().rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def go() -> None:
        conn = await asyncpg.connect(pg_admin_dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())


class GatewayProcess:
    """``python -m gateway run`` (or ``worker --stages …``) as a real process."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        broker: str | AnyBroker | None,
        command: tuple[str, ...] = ("run",),
        **extra_env: str,
    ) -> None:
        self.command = command
        self.data_dir = data_dir
        self.http_port = free_port()
        self.mllp_port = free_port()
        self.log_path = data_dir / "gateway.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRYGGA_")},
            "BRYGGA_DATA_DIR": str(data_dir),
            "BRYGGA_DATABASE_URL": database_url,
            "BRYGGA_HTTP_PORT": str(self.http_port),
            "BRYGGA_MLLP_PORT": str(self.mllp_port),
            "BRYGGA_RECONCILE_AFTER_SECONDS": "3",
            "BRYGGA_RECONCILE_INTERVAL_SECONDS": "0.5",
            # Tansu (a bare bootstrap) answers a group join after half the session.
            "BRYGGA_CONSUMER_SESSION_TIMEOUT_MS": "3000",
        }
        if isinstance(broker, str):
            self.env["BRYGGA_KAFKA_BOOTSTRAP"] = broker
        elif broker is not None:
            self.env |= broker.gateway_env()
        self.env |= extra_env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if "BRYGGA_HTTP_TLS_CERT" in self.env else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def serves_http(self) -> bool:
        return self.command == ("run",) or "api" in self.command[-1].split(",")

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # stderr is the JSON log; stdout the banner for people.
        with self.log_path.open("ab") as log, (self.data_dir / "gateway.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *self.command],
                env=self.env,
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited on start:\n{self.logs()[-3000:]}")
            if self._ready():
                return
            time.sleep(0.1)
        self.proc.kill()  # never leave a half-started gateway behind
        self.proc.wait()
        raise TimeoutError(f"gateway not ready in {timeout}s:\n{self.logs()[-3000:]}")

    def _ready(self) -> bool:
        if not self.serves_http or "BRYGGA_HTTP_TLS_CLIENT_CA" in self.env:
            # A worker without HTTP, or HTTPS that wants a client certificate: the log says.
            return '"gateway.started"' in self.logs()
        try:
            # Readiness only: the TLS tests check the certificates themselves.
            response = httpx.get(f"{self.base_url}/readyz", timeout=1, verify=False)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode if self.proc else 0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token(
        self, org: str, role: str = "staff", name: str = "Test Person", title: str = ""
    ) -> dict[str, str]:
        keys = TokenKeys.from_dir(self.data_dir / "keys")
        return {"Authorization": "Bearer " + keys.issue(org, role, name, title)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def wait_for(probe: Any, timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        time.sleep(interval)


def iter_segments(ack: bytes) -> Iterator[list[str]]:
    for seg in ack.decode("utf-8", "replace").replace("\n", "\r").split("\r"):
        if seg:
            yield seg.split("|")


def with_on_call(expected: dict[str, bool], at: datetime | None = None) -> dict[str, bool]:
    """The recipients a gateway on the demo directory tells (hsa-id -> for information), with
    the on-call unit of each receiver closed at ``at`` (now): it is told at once (decision
    0019), so what an end-to-end test sees depends on the hour it runs at."""
    from gateway.clock import now
    from gateway.directory import Directory
    from gateway.runtime import directory_path
    from gateway.settings import Settings

    demo = Directory.load(directory_path(Settings()))
    when = at or now()
    told = dict(expected)
    for hsa_id, for_information in expected.items():
        org = demo.get(hsa_id)
        if not for_information and org and org.on_call and not org.staffed_at(when):
            told.setdefault(org.on_call, False)
    return told
