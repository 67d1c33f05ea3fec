"""Fault tests with figures: a steady MLLP load over 4 connections while a part is killed,
then 0 lost, 0 delivered twice to a person, 0 stuck after the settle time, and how long
recovery took. Run ``pytest -m chaos`` (figures at the end, and in the results file; see
docs/reliability.md). Sizes from the environment: ``BRYGGA_CHAOS_ADMISSIONS`` (default 30,
CI-sized; 2,000 for the issue's figure), ``BRYGGA_CHAOS_RATE`` (admissions a second, 1: the
load must outlast a gateway restart), ``BRYGGA_CHAOS_STOP_SECONDS`` (how long the worker
stays stopped, 20), ``BRYGGA_CHAOS_SETTLE_SECONDS`` (how long the pipeline may take to settle
afterwards)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import admission
from tests.chaos import figures
from tests.chaos.check import Recipients, inbox_duplicates, settle, tally
from tests.chaos.load import Load
from tests.services import postgres
from tests.services.kafka import KafkaCluster
from tests.support import (
    ON_BOTH_BROKERS,
    AnyBroker,
    GatewayProcess,
    KafkaBroker,
    create_pg_database,
    drop_pg_database,
    now_sthlm,
    personnummer,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ADMISSIONS = int(os.environ.get("BRYGGA_CHAOS_ADMISSIONS", "30"))
RATE = float(os.environ.get("BRYGGA_CHAOS_RATE", "1"))
STOPPED = float(os.environ.get("BRYGGA_CHAOS_STOP_SECONDS", "20"))
SETTLE = float(os.environ.get("BRYGGA_CHAOS_SETTLE_SECONDS", str(max(180, ADMISSIONS))))
CONNECTIONS = 4
PIPELINE = "consent,route,deliver,receipts,relay"
BROKER_NAMES = {
    "tansu": "Tansu (embedded)",
    "kafka": "Apache Kafka, 1 node",
    "kafka3": "Apache Kafka, 3 nodes",
}


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@dataclass
class Run:
    """One scenario: the recipients, the gateway processes, the load, the faults done."""

    name: str
    root: Path
    url: str
    broker: AnyBroker
    recipients: Recipients
    processes: list[GatewayProcess] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    load: Load | None = None
    restored_at: float = 0.0

    def gateway(self, name: str, command: tuple[str, ...] = ("run",)) -> GatewayProcess:
        gw = GatewayProcess(
            self.root / name,
            self.url,
            self.broker,
            command=command,
            BRYGGA_DIRECTORY_FILE=str(self.recipients.directory_file),
        )
        if self.processes:  # processes of one gateway share its keys
            shutil.copytree(self.processes[0].data_dir / "keys", gw.data_dir / "keys")
        gw.start()
        self.processes.append(gw)
        return gw

    def start_load(self, front: GatewayProcess) -> Load:
        now = now_sthlm()
        tag = "".join(w[0] for w in self.name.split("_"))[:3].upper().ljust(2, "X")
        batch = {
            f"C{tag}{i:06d}": admission(f"C{tag}{i:06d}", now, pnr=personnummer(20_000 + i))
            for i in range(ADMISSIONS)
        }
        self.load = Load(lambda: front.mllp_port, batch, connections=CONNECTIONS, rate=RATE)
        return self.load.start()

    def fault(self, what: str, act: Callable[[], object]) -> float:
        """Do one fault now; remember what and when (seconds into the load, ACKs so far)."""
        assert self.load
        began = time.monotonic()
        self.faults.append(
            {"what": what, "at_s": began - self.load.t0, "acked": self.load.acked, "t": began}
        )
        act()
        self.restored_at = time.monotonic()
        return began

    def finish(self) -> dict[str, Any]:
        """Let the sender finish, settle, count, keep the figures, assert them."""
        assert self.load
        load = self.load
        assert load.join(timeout=SETTLE), f"never ACKed: {load.unacked()[:10]}"
        loaded_at = time.monotonic()
        ledger, _ = settle(self.url, ADMISSIONS, SETTLE)
        settled_at = time.monotonic()
        front = next(p for p in self.processes if p.serves_http)
        counts = tally(ledger, list(load.messages), self.recipients, inbox_duplicates(front))
        gaps = [load.first_ack_after(f["t"]) for f in self.faults]
        result = {
            "scenario": self.name,
            "broker": BROKER_NAMES.get(self.broker.name, self.broker.name),
            "database": "PostgreSQL",
            "admissions": ADMISSIONS,
            "connections": CONNECTIONS,
            "rate": RATE,
            "resends": load.resends(),
            "resent_messages": load.resent_messages(),
            "resent_to_recipients": counts["fhir_received"] + counts["hl7v2_received"]
            - counts["fhir_shown"] - counts["hl7v2_shown"],
            "not_aa_answers": sum(a != "AA" for s in load.sent.values() for a in s.answers),
            "faults": [{k: v for k, v in f.items() if k != "t"} for f in self.faults],
            "load_s": round(loaded_at - load.t0, 1),
            "intake_gap_s": round(max((g or 0.0) for g in gaps), 1) if gaps else 0.0,
            "recovery_s": round(settled_at - self.restored_at, 1),
            "settle_after_load_s": round(settled_at - loaded_at, 1),
            **counts,
        }
        figures.record(result)
        figures_ = (result["lost"], result["duplicated"], result["stuck"], result["parked"])
        assert figures_ == (0, 0, 0, 0), result
        assert result["unknown_at_recipient"] == 0, result
        assert result["messages"] == ADMISSIONS
        return result

    def stop(self) -> None:
        for gw in self.processes:
            if gw.proc and gw.proc.poll() is None:
                gw.proc.send_signal(signal.SIGCONT)  # a stopped worker cannot stop itself
                gw.stop()
        self.recipients.stop()


@pytest.fixture
def run(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Any]:
    made: list[Run] = []

    def make(name: str, broker: AnyBroker) -> Run:
        r = Run(name, tmp_path, pg_url, broker, Recipients(tmp_path / "recipients"))
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            r.stop()


@ON_BOTH_BROKERS
def test_gateway_sigkill_twice(run: Callable[..., Run], broker: AnyBroker) -> None:
    r = run("gateway_sigkill", broker)
    gw = r.gateway("gw")
    load = r.start_load(gw)

    def kill_and_restart() -> None:
        gw.kill()
        gw.start()

    load.wait_until(1 / 4, acked_at_least=1)
    r.fault("SIGKILL gateway, restarted", kill_and_restart)
    # after the restart the sender catches up in a burst: kill again within it
    again = min(max(load.acked + CONNECTIONS, ADMISSIONS * 3 // 5), ADMISSIONS - 1)
    load.wait_until(3 / 5, acked_at_least=again)
    r.fault("SIGKILL gateway, restarted", kill_and_restart)
    r.finish()


@ON_BOTH_BROKERS
def test_postgresql_restart(run: Callable[..., Run], broker: AnyBroker) -> None:
    cluster = postgres.cluster()
    if cluster is None:
        pytest.skip("BRYGGA_TEST_PG names a server these tests may not restart")
    r = run("postgresql_restart", broker)
    gw = r.gateway("gw")
    load = r.start_load(gw)
    load.wait_until(1 / 2, acked_at_least=1)
    r.fault("PostgreSQL immediate restart", lambda: cluster.restart(mode="immediate"))
    r.finish()


@ON_BOTH_BROKERS
def test_worker_stopped_while_messages_arrive(run: Callable[..., Run], broker: AnyBroker) -> None:
    r = run("worker_stopped", broker)
    front = r.gateway("front", ("worker", "--stages", "intake,relay,reconcile,followup,api"))
    worker = r.gateway("worker", ("worker", "--stages", PIPELINE))
    load = r.start_load(front)
    load.wait_until(1 / 6, acked_at_least=1)

    def stop_for_a_while() -> None:
        assert worker.proc
        worker.proc.send_signal(signal.SIGSTOP)
        before = load.acked
        time.sleep(STOPPED)
        worker.proc.send_signal(signal.SIGCONT)
        assert load.acked > before, "no message arrived while the worker was stopped"

    r.fault(f"pipeline worker SIGSTOP for {STOPPED:g} s", stop_for_a_while)
    r.finish()


def test_one_kafka_broker_of_three_killed(run: Callable[..., Run], tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path / "kafka3", nodes=3)
    cluster.start()
    started: list[Run] = []
    try:
        broker = KafkaBroker(cluster)
        broker.name = "kafka3"
        r = run("kafka_broker_sigkill", broker)
        started.append(r)
        gw = r.gateway("gw")
        load = r.start_load(gw)
        load.wait_until(1 / 4, acked_at_least=1)
        r.fault("SIGKILL Kafka broker 1 of 3", lambda: cluster.kill_node(1))
        load.wait_until(3 / 5)
        r.fault("Kafka broker 1 started again", lambda: cluster.start_node(1))
        r.finish()
    finally:
        for made in started:
            made.stop()  # the gateway goes before the cluster it talks to
        cluster.stop()
