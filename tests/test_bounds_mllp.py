"""Bounded work per MLLP input, over real sockets: frame and process-wide memory caps, a
frame that never ends, hundreds of idle connections, a connection cap, and a large message
that neither blocks other senders nor /healthz.

The in-process tests drive ``mllp.serve`` with the gateway's own refusal; the others start
the gateway process and measure its RSS from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.takecare import mllp
from adapters.takecare.source import TakeCareSource, refusal
from gateway.demo import admission
from tests.support import Broker, GatewayProcess, now_sthlm, personnummer
from tests.test_e2e_path import err, msa

MIB = 1024 * 1024
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _admission(control_id: str, n: int) -> bytes:
    return admission(control_id, now_sthlm(), pnr=personnummer(n))


def _partial(control_id: str, n: int, size: int) -> bytes:
    """The start of a frame (a readable MSH first) that goes on for ``size`` bytes."""
    head = mllp.START + _admission(control_id, n) + b"ZXX|"
    return head + b"x" * max(0, size - len(head))


async def _connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


async def _answer(conn: Conn, timeout: float = 10) -> bytes:
    """The next frame the server sends, b"" when it closes first."""
    framer, reader = mllp.Framer(), conn[0]
    while True:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            return b""
        frames = framer.feed(data)
        if frames:
            return frames[0]


async def _closed(conn: Conn, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` (reading what comes)."""
    try:
        async with asyncio.timeout(timeout):
            while await conn[0].read(65536):
                pass
        return True
    except ConnectionError:  # reset: closed with our unread bytes in its buffer
        return True
    except TimeoutError:
        return False


def _close(*conns: Conn) -> None:
    for _, writer in conns:
        writer.close()


async def _ack(_: bytes) -> bytes:
    return b"MSH|^~\\&|ACK\rMSA|AA|1"


@contextlib.asynccontextmanager
async def _server(**limits: Any) -> AsyncIterator[int]:
    server = await mllp.serve("127.0.0.1", 0, _ack, refuse=refusal, **limits)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- in process


async def test_a_frame_that_never_ends_is_closed_after_the_frame_timeout() -> None:
    async with _server(frame_timeout=0.6, idle_timeout=30) as port:
        conn = await _connect(port)
        conn[1].write(mllp.START + b"MSH|")
        began = time.monotonic()
        for _ in range(40):  # a byte every 0.05 s: never idle, never finished
            conn[1].write(b"x")
            await asyncio.sleep(0.05)
            if conn[0].at_eof():
                break
        assert await _closed(conn, 2)
        assert 0.5 < time.monotonic() - began < 2.5
        # a connection that finishes its frames is not cut off by the frame timeout
        conn = await _connect(port)
        for _ in range(4):
            conn[1].write(mllp.START + b"MSH|")
            await asyncio.sleep(0.3)
            conn[1].write(mllp.END)
            assert msa(await _answer(conn))[1] == "AA"
        _close(conn)


async def test_process_cap_refuses_new_partial_data_with_an_ar() -> None:
    async with _server(max_frame=200_000, max_pending=300_000) as port:
        holders = [await _connect(port) for _ in range(2)]
        for i, conn in enumerate(holders):
            conn[1].write(_partial(f"HOLD-{i}", 10 + i, 140_000))
            await conn[1].drain()
        await asyncio.sleep(0.2)
        late = await _connect(port)
        late[1].write(_partial("LATE-1", 20, 140_000))
        answer = await _answer(late)
        assert msa(answer)[1:3] == ["AR", "LATE-1"]
        error = err(answer)
        assert error is not None and error[3].startswith("207^")
        assert "busy" in msa(answer)[3] and await _closed(late, 5)
        # the holders were not hurt: their frames finish and are answered
        for conn in holders:
            conn[1].write(mllp.END)
            assert msa(await _answer(conn))[1] == "AA"
        # and what they held is free again
        again = await _connect(port)
        again[1].write(_partial("AGAIN-1", 21, 140_000) + mllp.END)
        assert msa(await _answer(again))[1] == "AA"
        _close(*holders, again)


async def test_oversized_frame_gets_an_ar_and_garbage_a_plain_close() -> None:
    async with _server(max_frame=50_000) as port:
        conn = await _connect(port)
        conn[1].write(_partial("BIG-1", 30, 60_000))
        answer = await _answer(conn)
        assert msa(answer)[1:3] == ["AR", "BIG-1"] and "larger" in msa(answer)[3]
        assert await _closed(conn, 5)  # after a grace to read the AR
        conn = await _connect(port)
        conn[1].write(mllp.START + b"\x00" * 60_000)
        assert await _answer(conn) == b""  # no MSH to answer: closed without a word


async def test_connection_cap_closes_the_extra_connection_at_once() -> None:
    async with _server(max_connections=3) as port:
        kept = [await _connect(port) for _ in range(3)]
        await asyncio.sleep(0.1)
        extra = await _connect(port)
        assert await _closed(extra, 2)
        _close(*kept)
        await asyncio.sleep(0.1)
        again = await _connect(port)
        again[1].write(mllp.frame(b"MSH|x"))
        assert msa(await _answer(again))[1] == "AA"
        _close(again)


async def test_parse_over_the_time_budget_is_refused_with_an_ar() -> None:
    source = TakeCareSource()
    source._inline_max, source._parse_timeout = 1000, 0.01
    big = _admission("SLOW-1", 40).replace(b"|M|", b"|" + b"\\E\\" * 2_000_000 + b"|")
    answer = await source.handle(big)
    assert msa(answer)[1:3] == ["AR", "SLOW-1"] and "too long" in msa(answer)[3]
    await source.stop()


# --------------------------------------------------------------------------- the gateway


def _rss(gw: GatewayProcess) -> int:
    """Resident set of the gateway process, in bytes (from /proc)."""
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


async def _timed_admission(port: int, control_id: str, n: int) -> tuple[float, str]:
    began = time.monotonic()
    ack = (await mllp.send("127.0.0.1", port, [_admission(control_id, n)], timeout=20))[0]
    return time.monotonic() - began, msa(ack)[1]


async def _timed_healthz(base_url: str) -> float:
    began = time.monotonic()
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{base_url}/healthz", timeout=20)
    assert response.status_code == 200
    return time.monotonic() - began


def _no_patient_data(gw: GatewayProcess, *numbers: int) -> None:
    logs = gw.logs()
    for n in numbers:
        assert personnummer(n) not in logs
    assert "Tolvansson" not in logs


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_gateway_limits_refuse_and_keep_serving(
    tmp_path: Path, database_url: str, broker: Broker
) -> None:
    gw = GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker.bootstrap,
        BRYGGA_MLLP_MAX_FRAME=str(2 * MIB),
        BRYGGA_MLLP_MAX_PENDING=str(4 * MIB),
        BRYGGA_MLLP_FRAME_TIMEOUT="2",
    )
    gw.start()
    try:
        asyncio.run(_limits(gw))
    finally:
        gw.stop()
    logs = gw.logs()
    for event in ("mllp.frame_too_large", "mllp.frame_busy", "mllp.frame_timeout"):
        assert event in logs
    _no_patient_data(gw, *range(500, 520))


async def _limits(gw: GatewayProcess) -> None:
    port = gw.mllp_port
    rss0 = _rss(gw)
    # oversized: refused with an AR naming the message, then closed
    conn = await _connect(port)
    conn[1].write(_partial("HUGE-1", 500, 3 * MIB))
    answer = await _answer(conn)
    assert msa(answer)[1:3] == ["AR", "HUGE-1"] and await _closed(conn, 5)
    # the process cap: 12 connections try to hold 1 MiB each, 4 MiB are allowed
    conns = [await _connect(port) for _ in range(12)]
    for i, c in enumerate(conns):
        c[1].write(_partial(f"HOLD-{i}", 501 + i, MIB))
        await c[1].drain()
    answers = await asyncio.gather(*(_answer(c, 3) for c in conns), return_exceptions=True)
    refused = [a for a in answers if isinstance(a, bytes) and a and msa(a)[1] == "AR"]
    assert len(refused) >= 8, answers
    assert _rss(gw) - rss0 < 4 * MIB + 48 * MIB
    # a frame that never ends: closed after the frame timeout (the holders too)
    assert all([await _closed(c, 6) for c in conns])
    _close(*conns)
    # normal traffic is served afterwards
    seconds, code = await _timed_admission(port, "AFTER-1", 519)
    assert code == "AA" and seconds < 5


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hundreds_of_idle_connections_and_a_large_message(
    tmp_path: Path, database_url: str, broker: Broker
) -> None:
    gw = GatewayProcess(
        tmp_path / "gw",
        database_url,
        broker.bootstrap,
        BRYGGA_MLLP_MAX_CONNECTIONS="320",
        BRYGGA_MLLP_MAX_FRAME=str(12 * MIB),
    )
    gw.start()
    try:
        asyncio.run(_idle_and_large(gw))
    finally:
        gw.stop()
    assert "mllp.too_many_connections" in gw.logs()
    _no_patient_data(gw, *range(600, 604))


async def _idle_and_large(gw: GatewayProcess) -> None:
    port = gw.mllp_port
    await _timed_admission(port, "WARM-1", 600)  # first-use allocations out of the way
    rss0 = _rss(gw)
    idle = [await _connect(port) for _ in range(300)]
    for i, c in enumerate(idle):
        c[1].write(mllp.START + b"MSH|^~\\&|" + str(i).encode())  # a frame begun, then silence
    await asyncio.sleep(1)
    grown = _rss(gw) - rss0
    print(f"RSS {rss0 / MIB:.0f} MiB, +{grown / MIB:.1f} MiB with 300 idle connections")
    assert grown < 32 * MIB
    # beyond the cap: closed at once; within it, still served
    extra = [await _connect(port) for _ in range(40)]
    closed = await asyncio.gather(*(_closed(c, 3) for c in extra))
    assert sum(closed) >= 15
    _close(*extra)
    await asyncio.sleep(0.2)
    # a 9 MB message parsed off the event loop, while others are answered at once (as
    # fast as without it, give or take the load of a shared machine: once this took 41 s)
    baseline, _ = await _timed_admission(port, "BASE-1", 603)
    big = _admission("LARGE-1", 601).replace(b"|M|", b"|" + b"\\E\\" * 3_000_000 + b"|")
    conn = await _connect(port)
    conn[1].write(mllp.frame(big))
    await conn[1].drain()
    async def big_answered() -> tuple[bytes, float]:
        answer = await _answer(conn, 60)
        return answer, time.monotonic()

    big_answer = asyncio.create_task(big_answered())
    await asyncio.sleep(0.1)
    probes_began = time.monotonic()
    small, health = await asyncio.gather(
        _timed_admission(port, "SMALL-1", 602), _timed_healthz(gw.base_url)
    )
    print(
        f"during the large message: admission {small[0]:.3f} s (alone {baseline:.3f} s), "
        f"/healthz {health:.3f} s"
    )
    assert small[1] == "AA" and small[0] < max(3, 4 * baseline) and health < 3
    answer, big_done = await big_answer
    assert big_done > probes_began  # the probes ran while the large one was being parsed
    location = err(answer)
    assert msa(answer)[1:3] == ["AE", "LARGE-1"] and location and location[2] == "PID^1^8"
    _close(conn, *idle)
