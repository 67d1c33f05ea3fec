"""Assembles one gateway process from settings: broker, database, stages, sources, HTTP.

``brygga run`` starts every stage; ``brygga worker --stages …`` starts some. Each stage is
an asyncio task in this process; they share nothing but the database and Kafka, so any
subset can run anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from gateway import plugins, sources
from gateway.api.app import create_app
from gateway.api.auth import TokenKeys
from gateway.bus import kafka
from gateway.bus.broker import EmbeddedBroker
from gateway.bus.keys import PatientKeyer
from gateway.bus.outbox import Relay
from gateway.crypto import columns, kek
from gateway.crypto.keyring import Keyring
from gateway.directory import store as directory_store
from gateway.directory.residence import lookup_from
from gateway.logs import error_fields
from gateway.pipeline.channels import ChannelRegistry
from gateway.pipeline.consent import ConsentStage
from gateway.pipeline.deadlines import DEADLINES_FILE, Deadlines
from gateway.pipeline.delivery import DeliverStage
from gateway.pipeline.escalation import Escalator
from gateway.pipeline.followup import FollowUp, Policy
from gateway.pipeline.intake import Intake
from gateway.pipeline.receipts import ReceiptsStage
from gateway.pipeline.reconciler import Reconciler
from gateway.pipeline.returns import RETURNS_FILE
from gateway.pipeline.routing import RouteStage, RoutingRules
from gateway.pipeline.stage import Stage, StageRunner
from gateway.settings import ALL_STAGES, Settings
from gateway.store.db import Database, migrate
from mappings import MAPPINGS_DIR

log = structlog.get_logger("brygga.runtime")
STOP_TIMEOUT = 8.0  # seconds any one shutdown step may take


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: the runtime owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def available_stages(found: dict[str, plugins.StagePlugin] | None = None) -> tuple[str, ...]:
    """The core stages and those adapters contribute."""
    return ALL_STAGES + tuple(found if found is not None else plugins.discover())


def directory_path(settings: Settings) -> Path:
    return settings.directory_file or MAPPINGS_DIR / "directory" / "demo.toml"


class Gateway:
    def __init__(self, settings: Settings, stages: tuple[str, ...] | None = None) -> None:
        self.plugins = plugins.discover()
        available = available_stages(self.plugins)
        stages = available if stages is None else stages
        unknown = set(stages) - set(available)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {available}")
        self.settings = settings
        self.stages = stages
        self.broker: EmbeddedBroker | None = None
        self.db: Database | None = None
        self.keyring: Keyring | None = None
        self.runners: list[StageRunner] = []
        self.sources: list[sources.Source] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started: set[str] = set()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._server: _Server | None = None

    def waiting_for(self) -> list[str]:
        """Stages not yet running; empty means ready."""
        waiting = [s for s in self.stages if s not in self._started]
        waiting += [f"stage:{r.stage.name}" for r in self.runners if not r.ready.is_set()]
        return waiting

    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        await migrate(s.db_url)
        self.db = db = Database(s.db_url)
        # Patient data is sealed in the database and on Kafka: nothing runs without the keys.
        self.keyring = keyring = Keyring(
            db,
            kek.from_settings(s),
            cache_seconds=s.key_cache_seconds,
            allow_plaintext=s.read_plaintext_rows,
        )
        await keyring.start()
        columns.install(keyring)
        kafka.install(kafka.Connection.from_settings(s))
        bootstrap = s.kafka_bootstrap
        if bootstrap is None:
            self.broker = EmbeddedBroker(s.data_dir, s.embedded_broker_port)
            await self.broker.start()
            self._spawn(self.broker.supervise(), "broker")
            bootstrap = self.broker.bootstrap
        await kafka.ensure_topics(bootstrap, create=s.kafka_create_topics)
        session_ms = s.consumer_session_timeout_ms or (3000 if self.broker else 10000)
        channels = ChannelRegistry.discover()
        # The directory lives in the database (managed over /fhir/Organization, …); the file
        # seeds it the first time.
        async with db.transaction() as conn:
            await directory_store.seed_from_file(conn, directory_path(s))
        directory = directory_store.StoredDirectory()  # read per message: API edits count
        rules = RoutingRules.load(
            s.routing_file or MAPPINGS_DIR / "routing" / "lus.toml", RETURNS_FILE
        )
        deadlines = Deadlines.load(s.deadlines_file or DEADLINES_FILE)
        residence = lookup_from(s.residence_lookup, s.postcodes_file)
        # The patient HMAC key names every pseudonym: created by the stages that key new
        # data (intake, route), only read by the others, never created twice.
        hmac_key = s.keys_dir / "patient-hmac.key"
        keyer = (
            PatientKeyer.from_file(hmac_key)
            if hmac_key.exists() or {"intake", "route"} & set(self.stages)
            else None
        )

        if "relay" in self.stages:
            producer = kafka.producer(bootstrap)
            await producer.start()
            self._closers.append(producer.stop)
            self._spawn(Relay(db, producer, s.relay_poll_seconds, keyring).run(), "relay")
            if s.kafka_create_topics:
                self._spawn(kafka.keep_topics(bootstrap), "keep_topics")
            self._started.add("relay")
        if "reconcile" in self.stages:
            probe = kafka.LagProbe(bootstrap)  # how far behind the stages' groups are
            self._closers.append(probe.close)
            self._spawn(
                Reconciler(
                    db,
                    s.reconcile_after_seconds,
                    s.reconcile_interval_seconds,
                    s.retention_days,
                    lag=probe.behind,
                ).run(),
                "reconcile",
            )
            self._started.add("reconcile")
        resend_after = timedelta(minutes=s.resend_after_minutes)
        if "followup" in self.stages:
            policy = Policy(resend_after, s.max_resends, deadlines.escalation)
            escalator = Escalator(directory, channels, deadlines.escalation)
            followup = FollowUp(
                db, channels, escalator, policy, s.followup_interval_seconds, deadlines
            )
            self._spawn(followup.run(), "followup")
            self._started.add("followup")
        stage_objects = {
            "consent": lambda: ConsentStage(db),
            "route": lambda: RouteStage(
                db, directory, rules, channels, _required(keyer), deadlines, residence
            ),
            "deliver": lambda: DeliverStage(db, channels, directory, resend_after, deadlines),
            "receipts": lambda: ReceiptsStage(db),
        }

        def run_stage(name: str, stage: Stage) -> None:
            runner = StageRunner(
                stage,
                bootstrap,
                fetch_wait_ms=s.consumer_fetch_wait_ms,
                max_attempts=s.max_attempts,
                session_timeout_ms=session_ms,
                cipher=keyring,
            )
            self.runners.append(runner)
            self._spawn(runner.run(), f"stage:{name}")

        for name, make in stage_objects.items():
            if name in self.stages:
                run_stage(name, make())
                self._started.add(name)
        for name, plugin in self.plugins.items():
            if name not in self.stages:
                continue
            if not plugin.enabled(s):
                log.info("gateway.stage_not_configured", stage=name)
                self._started.add(name)
                continue
            stage = plugin.stage(db)
            if stage is not None:
                run_stage(name, stage)
            loop = plugin.background(db)
            if loop is not None:
                self._spawn(loop, f"{name}:background")
            self._started.add(name)
        if "intake" in self.stages:
            ctx = sources.SourceContext(s, Intake(db, _required(keyer), s.fhir_endpoint))
            for source in sources.discover():
                await source.start(ctx)
                self.sources.append(source)
            self._started.add("intake")
        if "api" in self.stages:
            app = create_app(
                db, TokenKeys.from_dir(s.keys_dir), self.waiting_for, keyer, s.http_max_body_bytes
            )
            app.state.deadlines = deadlines  # the statistics count the same clocks as routing
            config = uvicorn.Config(
                app,
                host=s.http_host,
                port=s.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                **s.http_tls(),
            )
            self._server = server = _Server(config)
            self._server_task = self._spawn(server.serve(), "http")
            while not server.started:
                await asyncio.sleep(0.02)
            self._started.add("api")
        log.info(
            "gateway.started",
            stages=list(self.stages),
            http_port=s.http_port,
            mllp_port=s.mllp_port,
            database=db.engine.dialect.name,
            embedded_broker=self.broker is not None,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str = "") -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name or None)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)
        return task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway.task_failed", **error_fields(task.exception()))  # type: ignore[arg-type]

    async def stop(self) -> None:
        for source in self.sources:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(source.stop(), STOP_TIMEOUT)
        if self._server is not None:  # let in-flight HTTP requests finish
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._server_task), 5)
        for task in self._tasks:
            task.cancel()
        _, pending = (
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT) if self._tasks else (set(), set())
        )
        if pending:
            log.warning("gateway.stop_incomplete", tasks=sorted(t.get_name() for t in pending))
        for close in self._closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), STOP_TIMEOUT)
        if self.db:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.db.close(), STOP_TIMEOUT)
        if self.broker:
            self.broker.stop()
        log.info("gateway.stopped")

    async def run_until(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()


def _required(keyer: PatientKeyer | None) -> PatientKeyer:
    assert keyer is not None, "intake and route create the patient key when they start"
    return keyer
