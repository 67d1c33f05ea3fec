"""A real Apache Kafka (KRaft) cluster on loopback for tests, run from Maven Central's jars.

Maven resolves ``kafka-pom.xml`` (broker, CLI tools, log4j2 binding) once into
``~/.cache/brygga/kafka-<version>-<pom hash>/lib``; every later run reuses it. Each node is a
combined broker and controller (``process.roles=broker,controller``) with its own data folder,
so a node killed with SIGKILL and started again keeps its log, as a real broker does. With
``tls`` and/or ``sasl`` the client listener is SSL, SASL_PLAINTEXT or SASL_SSL (SCRAM-SHA-512,
the user made at format time); brokers and controllers talk in plain text on loopback.

Topics are created with ``deploy/kafka-topics.sh``, the script production uses, pointed at this
cluster's classpath (:meth:`KafkaCluster.create_topics`). A gateway on this cluster::

    cluster = KafkaCluster(tmp_path, nodes=3)
    cluster.start()
    cluster.create_topics()  # replication factor 3, min.insync.replicas 2
    gw = GatewayProcess(tmp_path / "gw", database_url, None, **cluster.gateway_env())

Measured here (2 cores): three nodes with TLS and SASL answered metadata 10 s after ``start``
on a quiet machine, the topic script took 5.6 s (one node) to 9.1 s (three; five JVMs), and a
killed node was back in 3.5 s. With the other engineers' tests on the same cores: one node 22 s,
three 78 s, the topic script 26 s, a node restart 15 s.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from gateway.bus.broker import free_port, kill_with_parent
from tests.services import cache as services_cache

POM = Path(__file__).with_name("kafka-pom.xml")
REPO = Path(__file__).resolve().parents[2]
TOPICS_SCRIPT = REPO / "deploy" / "kafka-topics.sh"
SASL_MECHANISM = "SCRAM-SHA-512"
SASL_USER = "brygga"
JAVA_OPTS = (
    "-Xms64m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",  # quick start; the tests need little broker throughput
    "-Djava.awt.headless=true",
)
TOOL_OPTS = ("-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")


def kafka_version() -> str:
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert found, f"no kafka.version in {POM}"
    return found.group(1)


def cache_dir() -> Path:
    return services_cache.cache_dir(f"kafka-{kafka_version()}", POM)


def classpath() -> str:
    """The broker's and tools' classpath, resolved with Maven on first use (then cached)."""

    def resolve(folder: Path) -> None:
        done = subprocess.run(
            [
                "mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                f"-DoutputDirectory={folder}", "-DincludeScope=runtime",
            ],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"Maven could not resolve Apache Kafka:\n{done.stdout[-3000:]}")

    return f"{services_cache.built(cache_dir(), 'lib', resolve)}/*"


def _cluster_id() -> str:
    """A random Kafka cluster id (base64 of a UUID) that does not start with '-', as Kafka's own
    ``Uuid.randomUuid`` avoids: the storage tool would read it as an option."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


def _log4j_config(root: Path) -> Path:
    path = root / "log4j2.properties"
    path.write_text(
        "status = warn\n"
        "appender.out.type = Console\nappender.out.name = out\n"
        "appender.out.layout.type = PatternLayout\n"
        "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = info\nrootLogger.appenderRef.out.ref = out\n"
        "logger.kafka.name = kafka\nlogger.kafka.level = warn\n"
        "logger.ak.name = org.apache.kafka\nlogger.ak.level = warn\n"
        "logger.started.name = kafka.server.BrokerServer\nlogger.started.level = info\n"
    )
    return path


class KafkaCluster:
    """``nodes`` combined broker+controller processes on loopback ports."""

    def __init__(
        self, root: Path, nodes: int = 1, *, tls: bool = False, sasl: bool = False
    ) -> None:
        self.root = root
        self.nodes = nodes
        self.tls = tls
        self.sasl = sasl
        self.password = base64.urlsafe_b64encode(os.urandom(18)).decode()
        self.client_ports = [free_port() for _ in range(nodes)]
        self.internal_ports = [free_port() for _ in range(nodes)]
        self.controller_ports = [free_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        self.cluster_id = _cluster_id()
        self.ca_path: Path | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    @property
    def protocol(self) -> str:
        if self.sasl:
            return "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
        return "SSL" if self.tls else "PLAINTEXT"

    def node_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def log_path(self, i: int) -> Path:
        return self.node_dir(i) / "server.log"

    # -- configuration -------------------------------------------------------------------

    def _tls_files(self) -> tuple[Path, Path]:
        """(CA certificate, server keystore PEM: key then chain), made once per cluster."""
        from tests.tls import ThrowawayCA

        ca = ThrowawayCA(self.root / "tls", "Brygga Kafka test CA")
        cert, key = ca.issue("kafka-broker", server=True)
        keystore = self.root / "tls" / "broker-keystore.pem"
        keystore.write_bytes(key.read_bytes() + cert.read_bytes())
        self.ca_path = ca.cert_path
        return ca.cert_path, keystore

    def _properties(self, i: int, keystore: Path | None) -> str:
        voters = ",".join(
            f"{n + 1}@127.0.0.1:{port}" for n, port in enumerate(self.controller_ports)
        )
        replicas = min(3, self.nodes)
        min_isr = 2 if replicas > 1 else 1
        lines = [
            "process.roles=broker,controller",
            f"node.id={i + 1}",
            f"controller.quorum.voters={voters}",
            "listeners="
            f"CLIENT://127.0.0.1:{self.client_ports[i]},"
            f"INTERNAL://127.0.0.1:{self.internal_ports[i]},"
            f"CONTROLLER://127.0.0.1:{self.controller_ports[i]}",
            "advertised.listeners="
            f"CLIENT://127.0.0.1:{self.client_ports[i]},"
            f"INTERNAL://127.0.0.1:{self.internal_ports[i]}",
            "listener.security.protocol.map="
            f"CLIENT:{self.protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=INTERNAL",
            "controller.listener.names=CONTROLLER",
            f"log.dirs={self.node_dir(i) / 'data'}",
            "num.partitions=4",
            f"default.replication.factor={replicas}",
            f"min.insync.replicas={min_isr}",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=4",  # 50 by default: slow to create on 2 cores
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={min_isr}",
            "transaction.state.log.num.partitions=4",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            "share.coordinator.state.topic.num.partitions=2",
            "auto.create.topics.enable=false",  # topics come from deploy/kafka-topics.sh
            "group.initial.rebalance.delay.ms=0",
            "num.network.threads=2",
            "num.io.threads=2",
            "background.threads=2",
            "num.recovery.threads.per.data.dir=1",
            "num.replica.fetchers=1",
            "log.segment.bytes=16777216",
            "log.retention.check.interval.ms=600000",
            "controller.quorum.election.timeout.ms=1000",
            "controller.quorum.fetch.timeout.ms=2000",
            "broker.heartbeat.interval.ms=500",
            "broker.session.timeout.ms=3000",
            "replica.lag.time.max.ms=5000",
        ]
        if keystore is not None:
            lines += [
                "listener.name.client.ssl.keystore.type=PEM",
                f"listener.name.client.ssl.keystore.location={keystore}",
                "listener.name.client.ssl.client.auth=none",
            ]
        if self.sasl:
            mech = SASL_MECHANISM.lower()
            lines += [
                f"listener.name.client.sasl.enabled.mechanisms={SASL_MECHANISM}",
                f"listener.name.client.{mech}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        return "\n".join(lines) + "\n"

    def _java(self, *args: str, opts: tuple[str, ...] = TOOL_OPTS) -> list[str]:
        log4j = _log4j_config(self.root)
        return ["java", *opts, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath(), *args]

    def _format(self) -> None:
        keystore = self._tls_files()[1] if self.tls else None
        for i in range(self.nodes):
            node = self.node_dir(i)
            node.mkdir(parents=True, exist_ok=True)
            props = node / "server.properties"
            props.write_text(self._properties(i, keystore))
            scram = (
                ["--add-scram", f"{SASL_MECHANISM}=[name={SASL_USER},password={self.password}]"]
                if self.sasl
                else []
            )
            done = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool", "format", "--ignore-formatted",
                    "-t", self.cluster_id, "-c", str(props), *scram,
                ),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"kafka storage format failed:\n{done.stdout}{done.stderr}")
        self._formatted = True

    # -- processes -----------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        """Start every node and wait until the cluster answers metadata with all brokers."""
        if not self._formatted:
            self._format()
        for i in range(self.nodes):
            self._spawn(i)
        self.wait_ready(timeout)

    def _spawn(self, i: int) -> None:
        props = self.node_dir(i) / "server.properties"
        with self.log_path(i).open("ab") as out:
            self.procs[i] = subprocess.Popen(
                self._java("kafka.Kafka", str(props), opts=JAVA_OPTS),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=kill_with_parent,  # a killed test session leaves no broker behind
            )

    def wait_ready(self, timeout: float = 120, brokers: int | None = None) -> None:
        """Until a client sees ``brokers`` (default: every node) in the cluster metadata."""
        import asyncio

        want = self.nodes if brokers is None else brokers
        deadline = time.monotonic() + timeout
        while True:
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    tail = self.log_path(i).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"kafka node {i} exited ({proc.returncode}):\n{tail}")
            try:
                if self._listening() >= want and asyncio.run(self._broker_count()) >= want:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Apache Kafka not ready after {timeout}s (logs: {self.root})")
            time.sleep(0.3)

    async def _broker_count(self) -> int:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(request_timeout_ms=3000, **self.client_kwargs())
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            return len(cluster["brokers"])
        finally:
            await admin.close()

    def _listening(self) -> int:
        """How many nodes accept connections on their client port (a cheap first check)."""
        count = 0
        for port in self.client_ports:
            with socket.socket() as s:
                count += s.connect_ex(("127.0.0.1", port)) == 0
        return count

    def kill_node(self, i: int) -> None:
        """SIGKILL node i (its data folder stays)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def start_node(self, i: int) -> None:
        """Start node i again on its ports and data; returns once it listens. Call it from the
        main thread: the node dies with the thread that started it (PR_SET_PDEATHSIG)."""
        self.kill_node(i)
        self._spawn(i)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.client_ports[i])) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"kafka node {i} did not listen again")

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_node(i)

    # -- clients -------------------------------------------------------------------------

    def client_kwargs(self) -> dict[str, object]:
        """aiokafka keyword arguments for a test client of this cluster."""
        kwargs: dict[str, object] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.protocol,
        }
        if self.tls:
            import ssl

            assert self.ca_path
            kwargs["ssl_context"] = ssl.create_default_context(cafile=str(self.ca_path))
        if self.sasl:
            kwargs |= {
                "sasl_mechanism": SASL_MECHANISM,
                "sasl_plain_username": SASL_USER,
                "sasl_plain_password": self.password,
            }
        return kwargs

    def gateway_env(self) -> dict[str, str]:
        """The BRYGGA_* settings a gateway process needs to use this cluster."""
        env = {
            "BRYGGA_KAFKA_BOOTSTRAP": self.bootstrap,
            "BRYGGA_KAFKA_IDEMPOTENCE": "true",
            "BRYGGA_KAFKA_CREATE_TOPICS": "false",  # deploy/kafka-topics.sh made them
            "BRYGGA_KAFKA_SECURITY_PROTOCOL": self.protocol,
            # Kafka's group.min.session.timeout.ms is 6000 by default.
            "BRYGGA_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        }
        if self.tls:
            assert self.ca_path
            env["BRYGGA_KAFKA_SSL_CAFILE"] = str(self.ca_path)
        if self.sasl:
            env |= {
                "BRYGGA_KAFKA_SASL_MECHANISM": SASL_MECHANISM,
                "BRYGGA_KAFKA_SASL_USERNAME": SASL_USER,
                "BRYGGA_KAFKA_SASL_PASSWORD": self.password,
            }
        return env

    def command_config(self) -> Path:
        """A Kafka CLI ``--command-config`` file for this cluster's client listener."""
        path = self.root / "client.properties"
        lines = [f"security.protocol={self.protocol}"]
        if self.tls:
            lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={self.ca_path}"]
        if self.sasl:
            lines += [
                f"sasl.mechanism={SASL_MECHANISM}",
                "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
                f'required username="{SASL_USER}" password="{self.password}";',
            ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def topics_tool(self) -> Path:
        """An executable that runs Kafka's ``kafka-topics.sh`` main class on this classpath."""
        path = self.root / "kafka-topics"
        path.write_text(
            "#!/bin/sh\n"
            f'exec {shlex.join(self._java("org.apache.kafka.tools.TopicCommand"))} "$@"\n'
        )
        path.chmod(0o755)
        return path

    def create_topics(self, prefix: str = "") -> str:
        """Run ``deploy/kafka-topics.sh`` against this cluster; its output (the description)."""
        env = {
            **os.environ,
            "KAFKA_TOPICS": str(self.topics_tool()),
            "KAFKA_COMMAND_CONFIG": str(self.command_config()),
            "REPLICATION_FACTOR": str(min(3, self.nodes)),
            "PARTITIONS": "4",
            "TOPIC_PREFIX": prefix,
        }
        done = subprocess.run(
            ["sh", str(TOPICS_SCRIPT), self.bootstrap],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"deploy/kafka-topics.sh failed:\n{done.stdout}{done.stderr}")
        return done.stdout
