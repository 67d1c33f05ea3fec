"""MLLP: the framer against what real links deliver, and the server and client on a socket."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.takecare.ack import build_ack, parse_ack
from adapters.takecare.hl7in import Hl7Rejection, parse
from adapters.takecare.mllp import END, START, Framer, FrameTooLarge, frame, send, serve
from mappings import MAPPINGS_DIR

ADMISSION = (MAPPINGS_DIR / "takecare" / "golden" / "adt_a01_full.hl7").read_bytes()


def _message(n: int) -> bytes:
    return ADMISSION.replace(b"TC20250310-0001", f"TC-{n:04d}".encode())


# --------------------------------------------------------------------------- framer


def test_frame_helper() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"


def test_one_frame_in_pieces() -> None:
    framer = Framer()
    data = frame(b"MSH|^~\\&|A")
    assert framer.feed(data[:1]) == []
    assert framer.feed(data[1:5]) == []
    assert framer.pending > 0
    assert framer.feed(data[5:-1]) == []  # \x1c arrived, \r not yet
    assert framer.feed(data[-1:]) == [b"MSH|^~\\&|A"]
    assert framer.pending == 0


def test_several_frames_in_one_read() -> None:
    assert Framer().feed(frame(b"a") + frame(b"b") + frame(b"c")) == [b"a", b"b", b"c"]


def test_garbage_between_and_around_frames_is_discarded() -> None:
    data = b"noise\r\n" + frame(b"a") + b"\x00\xff junk \x1c\r" + frame(b"b") + b"tail"
    framer = Framer()
    assert framer.feed(data) == [b"a", b"b"]
    assert framer.pending == 0
    assert framer.feed(frame(b"c")) == [b"c"]


def test_a_new_start_byte_abandons_an_unfinished_frame() -> None:
    assert Framer().feed(START + b"half a mess" + frame(b"whole")) == [b"whole"]


def test_payload_may_contain_a_lone_fs_or_cr() -> None:
    assert Framer().feed(frame(b"a\x1cb\rc")) == [b"a\x1cb\rc"]


def test_oversize_frame_unfinished() -> None:
    framer = Framer(max_frame=10)
    assert framer.feed(START + b"12345") == []
    with pytest.raises(FrameTooLarge):
        framer.feed(b"678901")
    assert framer.pending == 0
    # the rest of the oversize frame is noise; the next frame is read again
    assert framer.feed(b"more" + END + frame(b"ok")) == [b"ok"]


def test_oversize_frame_complete_keeps_earlier_frames() -> None:
    framer = Framer(max_frame=10)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(frame(b"small") + frame(b"x" * 11) + frame(b"after"))
    assert info.value.frames == [b"small"]
    assert framer.feed(b"") == [b"after"]


def test_exactly_max_frame_is_accepted() -> None:
    framer = Framer(max_frame=10)
    assert framer.feed(START + b"x" * 10) == []
    assert framer.feed(END) == [b"x" * 10]


def test_default_limit_is_16_mib() -> None:
    assert Framer().max_frame == 16 * 1024 * 1024


_PAYLOAD = st.binary(max_size=200).map(lambda b: b.replace(START, b"").replace(END, b""))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_PAYLOAD, min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    st.lists(st.binary(max_size=20).map(lambda b: b.replace(START, b"")), max_size=8),
)
def test_any_split_of_a_stream_gives_the_same_frames(
    payloads: list[bytes], cuts: list[int], noise: list[bytes]
) -> None:
    stream = b"".join(
        (noise[i] if i < len(noise) else b"") + frame(p) for i, p in enumerate(payloads)
    )
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    framer = Framer()
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        got += framer.feed(stream[a:b])
    assert got == payloads


# --------------------------------------------------------------------------- sockets


async def _echo_ack(payload: bytes) -> bytes:
    """What the gateway does, minus storage: parse, then AA or the precise AE/AR."""
    try:
        inbound = parse(payload)
    except Hl7Rejection as rej:
        ack_id = "ACK-" + rej.header.control_id
        return build_ack(rej, rej.ack_code, ack_control_id=ack_id, error=rej)
    return build_ack(inbound, "AA", ack_control_id="ACK-" + inbound.control_id)


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv = await serve("127.0.0.1", 0, _echo_ack, idle_timeout=5)
    port = srv.sockets[0].getsockname()[1]
    yield port
    srv.close()
    await srv.wait_closed()


async def test_send_client_gets_acks_in_order(server: int) -> None:
    messages = [_message(i) for i in range(5)] + [b"not hl7"]
    acks = await send("127.0.0.1", server, messages, timeout=5)
    parsed = [parse_ack(a) for a in acks]
    assert [p[:2] for p in parsed[:5]] == [("AA", f"TC-{i:04d}") for i in range(5)]
    assert parsed[5][:3] == ("AR", "", "MSH^1")


async def test_three_pipelined_messages_in_one_write(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"".join(frame(_message(i)) for i in (1, 2, 3)))
    await writer.drain()
    framer, acks = Framer(), list[bytes]()
    while len(acks) < 3:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "server closed early"
        acks += framer.feed(data)
    writer.close()
    await writer.wait_closed()
    assert [parse_ack(a)[1] for a in acks] == ["TC-0001", "TC-0002", "TC-0003"]


async def test_raw_socket_split_frames_and_noise(server: int) -> None:
    data = b"\r\n" + frame(_message(7)) + b"junk" + frame(_message(8))

    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
            for i in range(0, len(data), 97):  # odd-sized writes
                sock.sendall(data[i : i + 97])
            framer, got = Framer(), list[bytes]()
            while len(got) < 2:
                got += framer.feed(sock.recv(4096))
            return got

    acks = await asyncio.to_thread(talk)
    assert [parse_ack(a)[:2] for a in acks] == [("AA", "TC-0007"), ("AA", "TC-0008")]


async def test_hl7_package_mllp_client_interoperates(server: int) -> None:
    from hl7.client import MLLPClient

    def talk() -> bytes:
        with MLLPClient("127.0.0.1", server) as client:
            reply: bytes = client.send_message(_message(42))
            return reply

    reply = await asyncio.to_thread(talk)
    assert reply.startswith(START) and reply.endswith(END)
    assert parse_ack(reply[1:-2])[:2] == ("AA", "TC-0042")


async def test_oversize_frame_closes_the_connection() -> None:
    srv = await serve("127.0.0.1", 0, _echo_ack, max_frame=1000)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(START + b"x" * 5000)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_idle_connection_is_closed() -> None:
    srv = await serve("127.0.0.1", 0, _echo_ack, idle_timeout=0.2)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_handler_failure_closes_without_answer() -> None:
    async def broken(payload: bytes) -> bytes:
        raise RuntimeError("boom")

    srv = await serve("127.0.0.1", 0, broken)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionError):
            await send("127.0.0.1", port, [_message(1)], timeout=5)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_send_times_out_without_an_answer() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await send("127.0.0.1", port, [_message(1)], timeout=0.3)
    finally:
        srv.close()
        await srv.wait_closed()


async def _pipeline(
    handler: Callable[[bytes], Awaitable[bytes]], payloads: list[bytes], expect: int
) -> tuple[list[bytes], bool]:
    """Serve ``handler``; write all frames in one write; read until ``expect`` answers or the
    server closes. Returns the answers and whether the server closed."""
    srv = await serve("127.0.0.1", 0, handler)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        writer.write(b"".join(frame(p) for p in payloads))
        await writer.drain()
        framer, acks, closed = Framer(), list[bytes](), False
        while len(acks) < expect:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                closed = True
                break
            acks += framer.feed(data)
        writer.close()
        return acks, closed
    finally:
        srv.close()
        await srv.wait_closed()


async def test_pipelined_frames_run_together_and_are_answered_in_order() -> None:
    running: list[int] = []
    peak = [0]

    async def slow_first(payload: bytes) -> bytes:
        n = int(payload)
        running.append(n)
        peak[0] = max(peak[0], len(running))
        await asyncio.sleep(0.05 * (4 - n))  # the first finishes last
        running.remove(n)
        return b"ACK %d" % n

    acks, _ = await _pipeline(slow_first, [b"1", b"2", b"3"], 3)
    assert acks == [b"ACK 1", b"ACK 2", b"ACK 3"]
    assert peak[0] == 3  # handled concurrently, not one after another


async def test_a_failing_frame_among_pipelined_ones_stops_the_answers_there() -> None:
    async def second_fails(payload: bytes) -> bytes:
        if payload == b"2":
            raise RuntimeError("boom")
        return b"ACK " + payload

    acks, closed = await _pipeline(second_fails, [b"1", b"2", b"3"], 3)
    assert acks == [b"ACK 1"] and closed  # no answer for 2, none out of order for 3


async def test_an_empty_answer_sends_nothing_and_keeps_the_order() -> None:
    """MSH-15 NE: the handler answers b"" and no frame goes out; the next frames are answered."""

    async def quiet_second(payload: bytes) -> bytes:
        return b"" if payload == b"2" else b"ACK " + payload

    acks, closed = await _pipeline(quiet_second, [b"1", b"2", b"3"], 2)
    assert acks == [b"ACK 1", b"ACK 3"] and not closed
