"""MLLP (HL7 minimal lower layer protocol): framing, an asyncio server and a small client.

A frame is ``<VT> payload <FS><CR>``. The framer survives what real links deliver: frames
split over reads, several frames in one read, noise between frames, a sender that never
ends a frame. Logs carry peers and error types, never payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from ssl import SSLContext

import structlog

__all__ = [
    "END",
    "MAX_FRAME",
    "START",
    "FrameBudget",
    "FrameTooLarge",
    "Framer",
    "OverBudget",
    "frame",
    "send",
    "serve",
]

START = b"\x0b"
END = b"\x1c\r"
MAX_FRAME = 16 * 1024 * 1024
_READ = 64 * 1024

log = structlog.get_logger(__name__)


HEAD = 4096  # bytes of a refused frame kept, so the refusal can still read MSH


class FrameTooLarge(ValueError):
    """A frame grew past the limit; ``frames`` holds complete frames read before it and
    ``head`` the refused frame's first bytes (enough for its MSH)."""

    def __init__(self, limit: int, frames: list[bytes] | None = None, head: bytes = b"") -> None:
        super().__init__(f"MLLP frame larger than {limit} bytes")
        self.limit = limit
        self.frames = frames or []
        self.head = head


class OverBudget(FrameTooLarge):
    """Unfinished frames of all connections together hold more than the process allows."""


class FrameBudget:
    """Bytes held in unfinished frames across the connections of one process.

    Each connection's framer charges what its partial frame holds; a framer that would
    push the total past ``limit`` refuses its frame instead, so many slow senders cannot
    together take the memory that one sender may not.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP start and end bytes."""
    return START + payload + END


class Framer:
    """Incremental MLLP decoder: feed it bytes as they arrive, get back complete payloads.

    Bytes outside a frame are discarded; a start byte inside an unfinished frame starts
    over (the sender gave up on the previous frame).
    """

    def __init__(self, max_frame: int = MAX_FRAME, budget: FrameBudget | None = None) -> None:
        self.max_frame = max_frame
        self.budget = budget
        self._charged = 0  # bytes of this framer counted in the budget
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # payload bytes already searched for END / START

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data``; raises FrameTooLarge (or OverBudget) when the
        unfinished frame passes a limit, after dropping it."""
        frames = self._feed(data)
        if self.budget is not None:
            grow = self.pending - self._charged
            if grow > 0 and self.budget.held + grow > self.budget.limit:
                head = bytes(self._buf[:HEAD])
                self.reset()
                raise OverBudget(self.budget.limit, frames, head)
            self._charge()
        return frames

    def _feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while True:
            if not self._in_frame:
                start = buf.find(START)
                if start < 0:
                    buf.clear()
                    return frames
                del buf[: start + 1]
                self._in_frame, self._scanned = True, 0
            end = buf.find(END, self._scanned)
            restart = buf.find(START, self._scanned, len(buf) if end < 0 else end)
            if restart >= 0:
                del buf[: restart + 1]
                self._scanned = 0
                continue
            if end < 0:
                self._scanned = max(0, len(buf) - 1)
                if len(buf) - buf.endswith(END[:1]) > self.max_frame:
                    head = bytes(buf[:HEAD])
                    self.reset()
                    raise FrameTooLarge(self.max_frame, frames, head)
                return frames
            if end > self.max_frame:
                head = bytes(buf[: min(end, HEAD)])
                del buf[: end + len(END)]
                self._in_frame = False
                self._charge()
                raise FrameTooLarge(self.max_frame, frames, head)
            frames.append(bytes(buf[:end]))
            del buf[: end + len(END)]
            self._in_frame = False

    def _charge(self) -> None:
        """Bring this framer's share of the budget to what it holds now."""
        if self.budget is not None:
            held = self.pending
            self.budget.held += held - self._charged
            self._charged = held

    def reset(self) -> None:
        """Drop any partial frame (after an error, before reusing the framer)."""
        self._buf.clear()
        self._in_frame = False
        self._scanned = 0
        self._charge()

    def close(self) -> None:
        """Give back this framer's share of the budget (the connection is gone)."""
        self.reset()

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held in the buffer."""
        return len(self._buf) if self._in_frame else 0


Handler = Callable[[bytes], Awaitable[bytes]]
Refusal = Callable[[bytes, str], bytes | None]
"""(head of the refused frame, reason) -> the answer to send before closing, or None."""

MAX_PENDING = 64 * 1024 * 1024
MAX_CONNECTIONS = 512
REFUSAL_GRACE = 2.0  # seconds a refused sender gets to read its AR before the close


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    idle_timeout: float = 300,
    frame_timeout: float = 60,
    max_frame: int = MAX_FRAME,
    max_pending: int = MAX_PENDING,
    max_connections: int = MAX_CONNECTIONS,
    refuse: Refusal | None = None,
    ssl: SSLContext | None = None,
) -> asyncio.Server:
    """Listen for MLLP (over TLS when ``ssl`` is given); one task per connection, frames
    answered in arrival order; frames that arrive together are handled concurrently.

    ``handler`` gets the payload and returns the complete ACK message, which is framed
    here; an empty answer sends nothing (the sender asked for no ACK, MSH-15 ``NE``). A
    handler error closes the connection without an answer, so the sender resends.

    Bounded per input: a frame larger than ``max_frame``, or one that would take the bytes
    held in unfinished frames of all connections past ``max_pending``, is refused (with
    ``refuse``'s answer when it gives one) and its connection closed; so is a frame not
    finished ``frame_timeout`` seconds after it began, a connection silent for
    ``idle_timeout``, and any connection beyond ``max_connections``.
    """
    budget = FrameBudget(max_pending)
    open_connections = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        peer = _peer(writer)
        if open_connections >= max_connections:
            log.warning("mllp.too_many_connections", peer=peer, limit=max_connections)
            await _close(writer)
            return
        open_connections += 1
        framer = Framer(max_frame, budget)
        began = 0.0  # when the unfinished frame began
        try:
            while True:
                timeout = idle_timeout
                if framer.pending:
                    timeout = min(timeout, began + frame_timeout - time.monotonic())
                try:
                    data = await asyncio.wait_for(reader.read(_READ), max(timeout, 0))
                except TimeoutError:
                    if framer.pending:
                        log.warning("mllp.frame_timeout", peer=peer, seconds=frame_timeout)
                    else:
                        log.info("mllp.idle_timeout", peer=peer, seconds=idle_timeout)
                    break
                if not data:
                    break
                was_pending = framer.pending
                payloads = framer.feed(data)
                if framer.pending and (payloads or not was_pending):
                    began = time.monotonic()
                if len(payloads) == 1:
                    _answer(writer, await handler(payloads[0]))
                elif payloads:
                    # Pipelined frames are handled together (intake commits them as one
                    # group) and answered in their order; a failure stops the answers there.
                    answers = await asyncio.gather(
                        *(handler(p) for p in payloads), return_exceptions=True
                    )
                    for answer in answers:
                        if isinstance(answer, BaseException):
                            raise answer
                        _answer(writer, answer)
                await writer.drain()
        except FrameTooLarge as exc:
            busy = isinstance(exc, OverBudget)
            reason = "busy" if busy else "too_large"
            log.warning(f"mllp.frame_{reason}", peer=peer, limit=exc.limit, held=budget.held)
            answer = refuse(exc.head, reason) if refuse is not None else None
            if answer is not None:
                with contextlib.suppress(ConnectionError, TimeoutError):
                    writer.write(frame(answer))
                    await writer.drain()
                    await _discard(reader, REFUSAL_GRACE)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("mllp.connection_lost", peer=peer, error=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler failed: no ACK, the sender will resend
            log.error("mllp.handler_error", peer=peer, error=type(exc).__name__)
        finally:
            open_connections -= 1
            framer.close()
            await _close(writer)

    return await asyncio.start_server(connection, host, port, ssl=ssl)


def _answer(writer: asyncio.StreamWriter, answer: bytes) -> None:
    """Frame and queue one answer; nothing for an empty one."""
    if answer:
        writer.write(frame(answer))


async def _discard(reader: asyncio.StreamReader, seconds: float) -> None:
    """Read and drop what the sender still sends, for a while: closing with unread bytes
    resets the connection, and a reset can destroy the refusal before the sender reads it."""
    async with asyncio.timeout(seconds):
        while await reader.read(_READ):
            pass


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    return f"{info[0]}:{info[1]}" if isinstance(info, tuple) and len(info) >= 2 else "unknown"


async def send(
    host: str,
    port: int,
    messages: list[bytes],
    timeout: float = 10,
    ssl: SSLContext | None = None,
) -> list[bytes]:
    """Send each message on one connection and wait for its ACK before the next."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ssl), timeout)
    framer = Framer()
    acks: list[bytes] = []
    ready: list[bytes] = []
    try:
        for message in messages:
            writer.write(frame(message))
            await writer.drain()
            while not ready:
                data = await asyncio.wait_for(reader.read(_READ), timeout)
                if not data:
                    raise ConnectionError("connection closed before the ACK arrived")
                ready.extend(framer.feed(data))
            acks.append(ready.pop(0))
    finally:
        await _close(writer)
    return acks
