"""``brygga bench``: throughput and latency of the TakeCare adapter and the accept path.

Every figure is printed next to its reference from the same run on the same machine, because
absolute numbers say little on a shared 2-core box; the targets (DESIGN.md, issue 3) are
ratios and latencies:

A. CPU cost per core, no I/O: raw ``hl7.parse``, raw hl7apy, the adapter's ``parse()``
   (parse + map), + ``to_bundle`` and JSON (what intake stores), + FHIR R4B validation.
B. The accept path over MLLP with PostgreSQL: a bare MLLP server that only parses with
   ``hl7`` and answers AA, against the real gateway process (intake, relay, api), driven by
   the same asyncio load generator: closed loop (throughput) and open loop at a fixed rate
   (ACK latency).

The bare server runs as its own process, like the gateway:
``python -m adapters.takecare.bench bare --port N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import hl7
import typer
from rich.console import Console
from rich.table import Table

from adapters.takecare import mllp
from gateway.bus.broker import free_port, kill_with_parent
from gateway.clock import STOCKHOLM
from gateway.demo import admission
from gateway.model.identifiers import synthetic_personnummer as personnummer
from mappings import MAPPINGS_DIR

app = typer.Typer(help="Benchmarks; print figures and ratios.", no_args_is_help=True)

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
HOST = "127.0.0.1"
ADAPTER_TARGET = 2000.0  # ADT messages/s per core, parse + map
# Where DESIGN.md set that target, raw hl7.parse managed about 3,500/s and hl7apy about 130/s:
# the same target as a ratio holds on a slower or faster machine.
REFERENCE_HL7_RATE = 3500.0
RATIO_TARGET = 0.5  # gateway accept rate / bare MLLP server rate
P99_TARGET_MS = 25.0  # p99 ACK latency at the fixed rate (500 msg/s)
ACK_TIMEOUT = 30.0  # seconds; a server that does not answer in this long has failed
# A command to run the gateway under, for profiling it where it runs, e.g.
# BRYGGA_BENCH_PROFILER="py-spy record -r 250 -f raw -o /tmp/gateway.txt --"
_PROFILER = os.environ.get("BRYGGA_BENCH_PROFILER", "").split()

_PLACEHOLDER = "XCIDX"  # stands for MSH-10 in message templates
_FAMILIES = ("Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Öberg")
_GIVEN = ("Anna", "Maria", "Karl", "Erik", "Ingrid", "Margareta", "Åsa", "Sven")


# --------------------------------------------------------------------------- messages


def _templates(patients: int) -> list[bytes]:
    """Realistic Swedish ADT^A01 admissions, one per patient, MSH-10 left as a placeholder."""
    now = datetime.now(STOCKHOLM)
    return [
        admission(
            _PLACEHOLDER,
            now,
            pnr=personnummer(i),
            family=_FAMILIES[i % len(_FAMILIES)],
            given=_GIVEN[i % len(_GIVEN)],
        )
        for i in range(patients)
    ]


class MessageSource:
    """Hands out admissions with a unique MSH-10 each, cheaply (the load generator shares the
    cores with the server, so building a message must cost next to nothing)."""

    def __init__(self, tag: str, patients: int = 64) -> None:
        self._templates = _templates(patients)
        self._tag = tag
        self._n = 0

    def next(self) -> tuple[str, bytes]:
        self._n += 1
        control_id = f"{self._tag}{self._n:08d}"
        template = self._templates[self._n % len(self._templates)]
        return control_id, template.replace(_PLACEHOLDER.encode(), control_id.encode())


def cpu_corpus(patients: int = 64) -> list[bytes]:
    """The messages every CPU measurement runs over: generated admissions (varying control
    ids and personnummer) plus the golden TakeCare ADT files the adapter accepts (UTF-8 and
    ISO-8859-1). Only ADT: the target is in ADT messages/s, and one large MDM document
    would say more about its size than about the adapter."""
    from adapters.takecare.hl7in import Hl7Rejection, parse

    generated = [
        t.replace(_PLACEHOLDER.encode(), f"CPU{i:05d}".encode())
        for i, t in enumerate(_templates(patients))
    ]
    golden = []
    for path in sorted((MAPPINGS_DIR / "takecare" / "golden").glob("*.hl7")):
        raw = path.read_bytes()
        if "|ADT^" not in _text(raw).split("\r", 1)[0]:
            continue
        with contextlib.suppress(Hl7Rejection):  # golden rejections test the errors, not speed
            parse(raw)
            golden.append(raw)
    return generated + golden


def _text(raw: bytes) -> str:
    """Bytes to text for the raw parsers, which take str (the adapter decodes by MSH-18)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")


# --------------------------------------------------------------------------- A: CPU cost


@dataclass
class CpuRow:
    """One CPU measurement; ``rate`` is messages per CPU-second, None when not measured."""

    key: str
    label: str
    rate: float | None
    wall_rate: float | None = None
    messages: int = 0
    note: str = ""
    vs_hl7: float | None = None
    vs_hl7apy: float | None = None


def _run_for(
    fn: Callable[[bytes], object], corpus: Sequence[bytes], seconds: float
) -> tuple[int, float, float]:
    """Call fn over the corpus, round and round, for ``seconds`` of wall time.

    Returns (messages, CPU seconds, wall seconds). CPU time is the figure: this machine is
    shared, and CPU time does not count the moments another process had the core.
    """
    wall, cpu = time.perf_counter, time.process_time
    w0, c0 = wall(), cpu()
    deadline = w0 + seconds
    n = 0
    while True:
        for raw in corpus:
            fn(raw)
            n += 1
            if wall() >= deadline:
                return n, cpu() - c0, wall() - w0


def _hl7_raw(raw: bytes) -> object:
    return hl7.parse(_text(raw))


def _cases() -> list[tuple[str, str, Callable[[bytes], object] | None, str]]:
    """(key, label, function, note) for each CPU row; function None = not measurable here."""
    from adapters.takecare.hl7in import parse
    from gateway.model.bundle import to_bundle, validate_bundle

    try:
        from hl7apy.parser import parse_message
    except ImportError:
        hl7apy_fn: Callable[[bytes], object] | None = None
        hl7apy_note = "not installed (pip install -e '.[test]')"
    else:

        def hl7apy_fn(raw: bytes) -> object:
            return parse_message(_text(raw))

        hl7apy_note = ""

    def adapter(raw: bytes) -> object:
        return parse(raw)

    def stored(raw: bytes) -> object:
        return json.dumps(to_bundle(parse(raw).canonical, "bench"), ensure_ascii=False)

    def validated(raw: bytes) -> object:
        bundle = to_bundle(parse(raw).canonical, "bench")
        validate_bundle(bundle)
        return json.dumps(bundle, ensure_ascii=False)

    return [
        ("hl7", "raw hl7.parse", _hl7_raw, ""),
        ("hl7apy", "raw hl7apy parse_message", hl7apy_fn, hl7apy_note),
        ("adapter", "adapter parse() = parse + map", adapter, ""),
        ("bundle", "adapter + to_bundle + JSON (as stored)", stored, ""),
        ("validate", "adapter + to_bundle + FHIR R4B validation", validated, ""),
    ]


@contextlib.contextmanager
def _one_core() -> Iterator[None]:
    """Pin this process to one core while measuring, so 'per core' means one core."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def run_cpu(
    seconds: float, warmup: float | None = None, say: Callable[[str], None] = print
) -> list[CpuRow]:
    """Part A: messages per CPU-second for each row, single-threaded, after a warm-up."""
    corpus = cpu_corpus()
    warmup = min(1.0, max(0.1, seconds / 3)) if warmup is None else warmup
    rows: list[CpuRow] = []
    with _one_core():
        for key, label, fn, note in _cases():
            if fn is None:
                rows.append(CpuRow(key, label, None, note=note))
                continue
            say(f"A: {label} ...")
            try:
                _run_for(fn, corpus, warmup)
                n, cpu, wall = _run_for(fn, corpus, seconds)
            except Exception as exc:  # a parser that cannot read these messages is a finding
                rows.append(CpuRow(key, label, None, note=f"failed: {type(exc).__name__}"))
                continue
            rows.append(CpuRow(key, label, n / max(cpu, 1e-9), n / wall, n, note))
    base, slow = rows[0].rate, rows[1].rate
    for row in rows:
        if row.rate is not None:
            row.vs_hl7 = row.rate / base if base else None
            row.vs_hl7apy = row.rate / slow if slow else None
    return rows


# --------------------------------------------------------------------------- bare server


def _bare_ack(raw: bytes) -> bytes:
    """Parse with ``hl7`` and answer AA: the least any MLLP receiver can do."""
    msg = hl7.parse(_text(raw))
    ts = time.strftime("%Y%m%d%H%M%S")
    control_id = str(msg["MSH.F10"])
    header = (
        f"MSH|^~\\&|{msg['MSH.F5']}|{msg['MSH.F6']}|{msg['MSH.F3']}|{msg['MSH.F4']}|{ts}||ACK|"
        f"B{control_id}|P|{msg['MSH.F12']}"
    )
    return f"{header}\rMSA|AA|{control_id}\r".encode()


async def serve_bare(host: str, port: int) -> None:
    """Run the bare MLLP server until cancelled (same framing code as the gateway)."""

    async def handler(raw: bytes) -> bytes:
        return _bare_ack(raw)

    server = await mllp.serve(host, port, handler)
    async with server:
        await server.serve_forever()


@app.command(hidden=True)
def bare(
    port: Annotated[int, typer.Option(help="Loopback port to listen on.")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = HOST,
) -> None:
    """The bare reference server: parse with ``hl7``, answer AA, store nothing.

    It runs on the same event loop as the gateway (uvloop by default), so the ratio compares
    the work done per message, not the loops.
    """
    from gateway.cli import run_loop
    from gateway.settings import Settings

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(serve_bare(host, port), Settings().event_loop)


# --------------------------------------------------------------------------- load generator


def _msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK; ("", "") when it has no MSA."""
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            fields = segment.decode("utf-8", "replace").split(segment[3:4].decode() or "|")
            return (fields[1] if len(fields) > 1 else ""), (fields[2] if len(fields) > 2 else "")
    return "", ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass
class LoadResult:
    """What one load run saw: counts, rate, ACK latencies (seconds)."""

    server: str
    mode: str
    sent: int = 0
    acked: int = 0
    non_aa: int = 0  # MSA-1 was not AA
    unmatched: int = 0  # MSA-2 did not name the message sent
    errors: int = 0  # messages that got no ACK (connection lost, timeout)
    elapsed: float = 0.0
    offered_rate: float | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)

    def record(self, latency: float, ack: bytes, control_id: str) -> None:
        code, echoed = _msa(ack)
        self.acked += 1
        self.latencies.append(latency)
        if code != "AA":
            self.non_aa += 1
        if echoed != control_id:
            self.unmatched += 1

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        ms = {f"p{q}_ms": percentile(ordered, q) * 1000 for q in (50, 95, 99)}
        return {
            "server": self.server,
            "mode": self.mode,
            "rate": self.rate,
            "offered_rate": self.offered_rate,
            "sent": self.sent,
            "acked": self.acked,
            "non_aa": self.non_aa,
            "unmatched": self.unmatched,
            "errors": self.errors,
            "seconds": self.elapsed,
            **ms,
            "max_ms": (ordered[-1] * 1000) if ordered else 0.0,
            "cpu_ms_per_message": {
                name: 1000 * used / self.acked if self.acked else 0.0
                for name, used in self.cpu_seconds.items()
            },
        }


class _Link:
    """One MLLP client connection: write frames, read ACK frames in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = mllp.Framer()
        self.ready: deque[bytes] = deque()

    @classmethod
    async def open(cls, host: str, port: int) -> _Link:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        return cls(reader, writer)

    async def next_ack(self) -> bytes:
        while not self.ready:
            data = await asyncio.wait_for(self.reader.read(65536), ACK_TIMEOUT)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.ready.extend(self.framer.feed(data))
        return self.ready.popleft()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def closed_loop(
    server: str, port: int, connections: int, seconds: float, source: MessageSource
) -> LoadResult:
    """Each connection sends back-to-back, waiting for each ACK: the server's throughput."""
    result = LoadResult(server, f"closed loop, {connections} conn")
    links = [await _Link.open(HOST, port) for _ in range(connections)]
    start = time.perf_counter()
    deadline = start + seconds

    async def drive(link: _Link) -> None:
        try:
            while time.perf_counter() < deadline:
                control_id, message = source.next()
                sent = time.perf_counter()
                link.writer.write(mllp.frame(message))
                result.sent += 1
                await link.writer.drain()
                ack = await link.next_ack()
                result.record(time.perf_counter() - sent, ack, control_id)
        except (OSError, TimeoutError):
            result.errors += 1

    try:
        await asyncio.gather(*(drive(link) for link in links))
        result.elapsed = time.perf_counter() - start
    finally:
        for link in links:
            await link.close()
    return result


async def open_loop(
    server: str, port: int, connections: int, rate: float, seconds: float, source: MessageSource
) -> LoadResult:
    """Send at a fixed rate whatever the server does (pipelined, round-robin over the
    connections); latency counts from the moment each message was due, so a server that
    falls behind shows it (no coordinated omission)."""
    result = LoadResult(server, f"open loop {rate:g}/s, {connections} conn", offered_rate=rate)
    links = [await _Link.open(HOST, port) for _ in range(connections)]
    total = max(1, int(rate * seconds))
    interval = 1.0 / rate
    inflight: list[deque[tuple[float, str]]] = [deque() for _ in links]
    dead: set[int] = set()
    outstanding = [total]
    done = asyncio.Event()

    def settle(count: int) -> None:
        outstanding[0] -= count
        if outstanding[0] <= 0:
            done.set()

    async def read(k: int) -> None:
        queue = inflight[k]
        try:
            while True:
                ack = await links[k].next_ack()
                due, control_id = queue.popleft()
                result.record(time.perf_counter() - due, ack, control_id)
                settle(1)
        except (OSError, TimeoutError, IndexError):
            dead.add(k)
            result.errors += len(queue)
            settle(len(queue))
            queue.clear()

    readers = [asyncio.create_task(read(k)) for k in range(len(links))]
    t0 = time.perf_counter() + 0.005
    i = 0
    try:
        while i < total:
            due_now = min(total, int((time.perf_counter() - t0) / interval) + 1)
            touched: set[int] = set()
            while i < due_now:
                k = i % len(links)
                i += 1
                if k in dead:
                    result.errors += 1
                    settle(1)
                    continue
                control_id, message = source.next()
                inflight[k].append((t0 + (i - 1) * interval, control_id))
                links[k].writer.write(mllp.frame(message))
                result.sent += 1
                touched.add(k)
            for k in touched:
                with contextlib.suppress(OSError):
                    await links[k].writer.drain()
            if i < total:
                await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), ACK_TIMEOUT)
        result.elapsed = time.perf_counter() - t0
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for link in links:
            await link.close()
    result.errors += max(0, outstanding[0])
    return result


# --------------------------------------------------------------------------- B: processes


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=kill_with_parent,
            start_new_session=True,  # Ctrl-C reaches the bench, which stops its children
        )


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGINT, wait: float = 30) -> None:
    """Stop a child gracefully, then for sure."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_pids() -> list[int]:
    """The PostgreSQL server processes on this machine (the database does part of the work
    of every accepted message, so its CPU belongs in the bill)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError, ValueError):
            if comm.read_text().strip() == "postgres":
                pids.append(int(comm.parent.name))
    return pids


class CpuMeter:
    """CPU seconds used during one run by the server, PostgreSQL, the broker and the load
    generator: where the machine's two cores went, per message."""

    def __init__(self, server_pid: int, broker_pid: int | None = None) -> None:
        self.pids = {"server": [server_pid], "broker": [broker_pid] if broker_pid else []}
        self._start: dict[str, dict[int, float]] = {}
        self._own = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        groups = {**self.pids, "postgres": _postgres_pids()}
        out: dict[str, dict[int, float]] = {}
        for name, pids in groups.items():
            out[name] = {pid: cpu for pid in pids if (cpu := _proc_cpu(pid)) is not None}
        return out

    def start(self) -> None:
        self._start = self._read()
        self._own = time.process_time()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since start (processes alive at both ends)."""
        end = self._read()
        used = {
            name: sum(
                cpu - self._start[name][pid]
                for pid, cpu in end[name].items()
                if pid in self._start[name]
            )
            for name in end
        }
        used["load generator"] = time.process_time() - self._own
        return used


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


async def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited on start:\n{_tail(log)}")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}:\n{_tail(log)}") from None
            await asyncio.sleep(0.05)


async def _wait_ready(
    http_port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited on start:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                reply = await client.get(f"http://{HOST}:{http_port}/readyz", timeout=1)
                if reply.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway was not ready in {timeout}s:\n{_tail(log)}")
            await asyncio.sleep(0.1)


def _asyncpg_dsn(dsn: str) -> str:
    return dsn.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(pg: str, sql: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(pg))
    try:
        return str(await conn.fetchval(sql) or "")
    finally:
        await conn.close()


async def _unpublished(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
    finally:
        await conn.close()


async def _drain_outbox(url: str, timeout: float = 60) -> float:
    """Wait until the relay has published every outbox row; returns the seconds it took.

    Between runs, so that the latency run does not pay for the throughput run's backlog.
    """
    start = time.monotonic()
    while await _unpublished(url) and time.monotonic() - start < timeout:
        await asyncio.sleep(0.2)
    return time.monotonic() - start


@dataclass
class AcceptReport:
    """Part B: the four load runs, and what the gateway left behind."""

    runs: list[LoadResult]
    postgres: str = ""
    gateway_stages: str = ""
    outbox_drain_seconds: float = 0.0
    stored_messages: int = 0

    def run(self, server: str, closed: bool) -> LoadResult:
        return next(
            r for r in self.runs if r.server == server and r.mode.startswith("closed") == closed
        )


async def _measure(
    server: str,
    port: int,
    seconds: float,
    connections: int,
    rate: float,
    warmup: float,
    meter: CpuMeter,
    between: Callable[[], Any] | None = None,
) -> list[LoadResult]:
    """Warm-up, the closed-loop run, then the open-loop run, against one server."""
    source = MessageSource(uuid.uuid4().hex[:6].upper() + server[0].upper())
    await closed_loop(server, port, connections, warmup, source)  # warm-up, not counted
    meter.start()
    closed = await closed_loop(server, port, connections, seconds, source)
    closed.cpu_seconds = meter.stop()
    if between is not None:
        await between()
    meter.start()
    opened = await open_loop(server, port, connections, rate, seconds, source)
    opened.cpu_seconds = meter.stop()
    return [closed, opened]


def run_accept(
    seconds: float,
    connections: int,
    rate: float,
    pg: str = DEFAULT_PG,
    say: Callable[[str], None] = print,
    warmup: float | None = None,
) -> AcceptReport:
    """Part B: bare server, then the gateway, on fresh loopback ports and a fresh database.

    Everything started here is stopped here, and the database is dropped, whatever fails.
    """
    warmup = min(1.0, max(0.2, seconds / 3)) if warmup is None else warmup
    work = Path(tempfile.mkdtemp(prefix="brygga-bench-"))
    db_name = f"brygga_bench_{uuid.uuid4().hex[:12]}"
    base = _asyncpg_dsn(pg).rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    db_url = f"{base}/{db_name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRYGGA_")}
    stages = "intake,relay,api"
    procs: list[subprocess.Popen[bytes]] = []
    broker: subprocess.Popen[bytes] | None = None
    created = False
    runs: list[LoadResult] = []
    report = AcceptReport(runs, gateway_stages=stages)
    try:
        # The bare server first, alone: nothing else of ours is busy while it is measured.
        bare_port = free_port()
        bare_log = work / "bare.log"
        say(f"B: bare MLLP server on port {bare_port} ...")
        bare_proc = _spawn(
            [sys.executable, "-m", "adapters.takecare.bench", "bare", "--port", str(bare_port)],
            env,
            bare_log,
        )
        procs.append(bare_proc)
        asyncio.run(_wait_port(bare_port, bare_proc, bare_log, 30))
        runs += asyncio.run(
            _measure("bare", bare_port, seconds, connections, rate, warmup, CpuMeter(bare_proc.pid))
        )
        _stop(bare_proc, signal.SIGTERM)

        from gateway.bus import broker as broker_mod

        say("B: PostgreSQL database and Kafka-protocol broker (Tansu) ...")
        report.postgres = asyncio.run(_admin(pg, "SHOW server_version"))
        asyncio.run(_admin(pg, f'CREATE DATABASE "{db_name}"'))
        created = True
        kafka_port = free_port()
        broker = broker_mod.spawn(kafka_port, work / "broker.log", die_with_parent=True)
        asyncio.run(broker_mod.wait_listening(kafka_port))

        http_port, mllp_port = free_port(), free_port()
        gw_log = work / "gateway.log"
        gw_env = {
            **env,
            "BRYGGA_DATA_DIR": str(work / "gateway"),
            "BRYGGA_DATABASE_URL": db_url,
            "BRYGGA_KAFKA_BOOTSTRAP": f"{HOST}:{kafka_port}",
            "BRYGGA_HTTP_PORT": str(http_port),
            "BRYGGA_MLLP_PORT": str(mllp_port),
        }
        say(f"B: gateway (worker --stages {stages}) on MLLP port {mllp_port} ...")
        gw_proc = _spawn(
            [*_PROFILER, sys.executable, "-m", "gateway", "worker", "--stages", stages],
            gw_env,
            gw_log,
        )
        procs.append(gw_proc)
        asyncio.run(_wait_ready(http_port, gw_proc, gw_log, 120))

        async def drained() -> None:
            report.outbox_drain_seconds = await _drain_outbox(db_url)

        meter = CpuMeter(gw_proc.pid, broker.pid)
        runs += asyncio.run(
            _measure("gateway", mllp_port, seconds, connections, rate, warmup, meter, drained)
        )
        report.stored_messages = int(
            asyncio.run(_admin(db_url, "SELECT count(*) FROM messages")) or 0
        )
        return report
    finally:
        for proc in reversed(procs):
            _stop(proc)
        _stop(broker, signal.SIGTERM, 5)
        if created:
            with contextlib.suppress(Exception):
                asyncio.run(_admin(pg, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean nothing without it."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("hl7", "hl7apy", "fhir.resources", "asyncpg", "sqlalchemy", "uvloop"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "cores": os.cpu_count() or 0,
        "cpu": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "event_loop": _event_loop(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def _event_loop() -> str:
    """The loop both servers run on (the gateway's setting, as the bare server reads it)."""
    from gateway.settings import Settings

    kind = Settings().event_loop
    if kind == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio (uvloop not installed)"
    return kind


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _verdict(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]not met[/]"


def targets(cpu: list[CpuRow], accept: AcceptReport | None, rate: float) -> list[dict[str, Any]]:
    """Each target of issue 3 with the figure measured for it."""
    out: list[dict[str, Any]] = []
    for row in cpu:
        if row.key in ("adapter", "bundle", "validate") and row.rate is not None:
            out.append(
                {
                    "figure": f"{row.label}, msg/s per core",
                    "measured": row.rate,
                    "target": f">= {ADAPTER_TARGET:,.0f}",
                    "met": row.rate >= ADAPTER_TARGET,
                }
            )
    adapter = next((r for r in cpu if r.key == "adapter"), None)
    if adapter is not None and adapter.vs_hl7 is not None:
        need = ADAPTER_TARGET / REFERENCE_HL7_RATE
        out.append(
            {
                "figure": "adapter parse + map / raw hl7.parse (the 2,000/s target as a ratio)",
                "measured": adapter.vs_hl7,
                "target": f">= {need:.2f}",
                "met": adapter.vs_hl7 >= need,
            }
        )
    if accept is not None:
        bare, gw = accept.run("bare", True), accept.run("gateway", True)
        ratio = gw.rate / bare.rate if bare.rate else 0.0
        out.append(
            {
                "figure": "gateway accept rate / bare MLLP server rate",
                "measured": ratio,
                "target": f">= {RATIO_TARGET}",
                "met": ratio >= RATIO_TARGET,
            }
        )
        gw_open = accept.run("gateway", False)
        p99 = gw_open.summary()["p99_ms"]
        out.append(
            {
                "figure": f"gateway p99 ACK latency at {rate:g} msg/s, ms",
                "measured": p99,
                "target": f"<= {P99_TARGET_MS:g} (at 500/s)",
                "met": p99 <= P99_TARGET_MS and gw_open.errors == 0,
            }
        )
        bad = sum(r.non_aa + r.unmatched + r.errors for r in accept.runs)
        out.append(
            {
                "figure": "ACKs that were not AA for the message sent, or missing",
                "measured": float(bad),
                "target": "0",
                "met": bad == 0,
            }
        )
    return out


def render(
    console: Console,
    info: dict[str, Any],
    cpu: list[CpuRow],
    accept: AcceptReport | None,
    rate: float,
    seconds: float,
) -> None:
    """Print the tables people read."""
    console.print(
        f"[bold]brygga bench takecare[/]  {info['cores']} cores ({info['cpu']}), "
        f"Python {info['python']}, {info['event_loop']} event loop, "
        f"load average {info['load_average']}, "
        f"{seconds:g} s per measurement",
        highlight=False,
    )
    a = Table(title="A. Adapter CPU cost, one core pinned, same messages (no I/O)")
    a.add_column("measure")
    a.add_column("msg/s per core", justify="right")
    a.add_column("µs/msg", justify="right")
    a.add_column("vs raw hl7", justify="right")
    a.add_column("vs hl7apy", justify="right")
    a.add_column("msg/s wall", justify="right")
    a.add_column("note")
    for row in cpu:
        us = None if not row.rate else 1e6 / row.rate
        ratio = "-" if row.vs_hl7 is None else f"{row.vs_hl7:.2f}x"
        slow = "-" if row.vs_hl7apy is None else f"{row.vs_hl7apy:.1f}x"
        a.add_row(
            row.label, _fmt(row.rate), _fmt(us, 1), ratio, slow, _fmt(row.wall_rate), row.note
        )
    console.print(a)
    if accept is not None:
        b = Table(
            title="B. Accept path over MLLP (gateway: PostgreSQL, Tansu; same load generator)"
        )
        for name in (
            "server",
            "load",
            "msg/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "ACKs",
            "non-AA",
            "errors",
        ):
            b.add_column(name, justify="left" if name in ("server", "load") else "right")
        for run in accept.runs:
            s = run.summary()
            b.add_row(
                "bare hl7 + AA" if run.server == "bare" else f"gateway ({accept.gateway_stages})",
                run.mode,
                _fmt(s["rate"]),
                _fmt(s["p50_ms"], 2),
                _fmt(s["p95_ms"], 2),
                _fmt(s["p99_ms"], 2),
                _fmt(s["max_ms"], 2),
                f"{run.acked:,}",
                str(run.non_aa + run.unmatched),
                str(run.errors),
            )
        console.print(b)
        c = Table(title="CPU per acknowledged message, ms (from /proc; all four runs above)")
        groups = ("server", "postgres", "broker", "load generator")
        c.add_column("server")
        c.add_column("load")
        for name in (*groups, "total", "cores busy"):
            c.add_column(name, justify="right")
        for run in accept.runs:
            per = run.summary()["cpu_ms_per_message"]
            total = sum(per.values())
            busy = sum(run.cpu_seconds.values()) / run.elapsed if run.elapsed else 0.0
            c.add_row(
                run.server,
                run.mode,
                *(_fmt(per.get(name), 2) for name in groups),
                _fmt(total, 2),
                _fmt(busy, 2),
            )
        console.print(c)
        console.print(
            f"PostgreSQL {accept.postgres}; {accept.stored_messages:,} messages stored; the relay "
            f"needed {accept.outbox_drain_seconds:.1f} s after the throughput run to publish its "
            f"backlog. The load generator runs in this process on the same {info['cores']} cores "
            "as the server, PostgreSQL and the broker: every rate here is for the whole machine.",
            highlight=False,
        )
    t = Table(title="Targets (issue 3)")
    t.add_column("figure")
    t.add_column("measured", justify="right")
    t.add_column("target", justify="right")
    t.add_column("")
    for item in targets(cpu, accept, rate):
        digits = 2 if item["measured"] < 100 else 0
        t.add_row(
            item["figure"], _fmt(item["measured"], digits), item["target"], _verdict(item["met"])
        )
    console.print(t)


@app.command()
def takecare(
    seconds: Annotated[float, typer.Option(help="Length of each measurement, in seconds.")] = 3.0,
    connections: Annotated[int, typer.Option(help="MLLP connections of the load generator.")] = 4,
    rate: Annotated[float, typer.Option(help="Messages/s of the fixed-rate latency run.")] = 500.0,
    pg: Annotated[
        str, typer.Option(help="PostgreSQL admin DSN; the bench creates and drops a database.")
    ] = DEFAULT_PG,
    skip_accept: Annotated[
        bool, typer.Option("--skip-accept", help="Only part A (CPU cost; no processes).")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON instead of tables.")
    ] = False,
) -> None:
    """TakeCare adapter CPU cost and the MLLP accept path, each against its reference."""
    if seconds <= 0 or connections < 1 or rate <= 0:
        raise typer.BadParameter("--seconds and --rate must be > 0, --connections >= 1")
    console = Console()
    if not console.is_terminal and console.width < 140:
        console = Console(width=140)
    progress = Console(stderr=True)

    def say(text: str) -> None:
        if not json_out:
            progress.print(text, style="dim", highlight=False)

    info = machine()
    cpu = run_cpu(seconds, say=say)
    accept = None
    if not skip_accept:
        try:
            accept = run_accept(seconds, connections, rate, pg, say)
        except Exception as exc:  # database refused, a process did not start: say which
            progress.print(
                f"The accept-path benchmark failed ({type(exc).__name__}): {exc}", highlight=False
            )
            raise typer.Exit(1) from None
    if json_out:
        doc = {
            "machine": info,
            "seconds": seconds,
            "cpu": [asdict(row) for row in cpu],
            "accept": None
            if accept is None
            else {
                "runs": [run.summary() for run in accept.runs],
                "postgres": accept.postgres,
                "gateway_stages": accept.gateway_stages,
                "outbox_drain_seconds": accept.outbox_drain_seconds,
                "stored_messages": accept.stored_messages,
            },
            "targets": targets(cpu, accept, rate),
        }
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    render(console, info, cpu, accept, rate, seconds)


if __name__ == "__main__":  # the bare server runs as its own process, like the gateway
    app()
