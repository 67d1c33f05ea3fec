"""MLLP (HL7 minimal lower layer protocol): framing, an asyncio server and a small client.

A frame is ``<VT> payload <FS><CR>``. The framer survives what real links deliver: frames
split over reads, several frames in one read, noise between frames, a sender that never
ends a frame. Logs carry peers and error types, never payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from ssl import SSLContext

import structlog

__all__ = ["END", "MAX_FRAME", "START", "FrameTooLarge", "Framer", "frame", "send", "serve"]

START = b"\x0b"
END = b"\x1c\r"
MAX_FRAME = 16 * 1024 * 1024
_READ = 64 * 1024

log = structlog.get_logger(__name__)


class FrameTooLarge(ValueError):
    """A frame grew past the limit; ``frames`` holds complete frames read before it."""

    def __init__(self, limit: int, frames: list[bytes] | None = None) -> None:
        super().__init__(f"MLLP frame larger than {limit} bytes")
        self.frames = frames or []


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP start and end bytes."""
    return START + payload + END


class Framer:
    """Incremental MLLP decoder: feed it bytes as they arrive, get back complete payloads.

    Bytes outside a frame are discarded; a start byte inside an unfinished frame starts
    over (the sender gave up on the previous frame).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # payload bytes already searched for END / START

    def feed(self, data: bytes) -> list[bytes]:
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
                    self.reset()
                    raise FrameTooLarge(self.max_frame, frames)
                return frames
            if end > self.max_frame:
                del buf[: end + len(END)]
                self._in_frame = False
                raise FrameTooLarge(self.max_frame, frames)
            frames.append(bytes(buf[:end]))
            del buf[: end + len(END)]
            self._in_frame = False

    def reset(self) -> None:
        """Drop any partial frame (after an error, before reusing the framer)."""
        self._buf.clear()
        self._in_frame = False
        self._scanned = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held in the buffer."""
        return len(self._buf) if self._in_frame else 0


Handler = Callable[[bytes], Awaitable[bytes]]


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    idle_timeout: float = 300,
    max_frame: int = MAX_FRAME,
    ssl: SSLContext | None = None,
) -> asyncio.Server:
    """Listen for MLLP (over TLS when ``ssl`` is given); one task per connection, frames
    answered in arrival order; frames that arrive together are handled concurrently.

    ``handler`` gets the payload and returns the complete ACK message, which is framed
    here. A handler error closes the connection without an answer, so the sender resends.
    """

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        framer = Framer(max_frame)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(_READ), idle_timeout)
                if not data:
                    break
                payloads = framer.feed(data)
                if len(payloads) == 1:
                    writer.write(frame(await handler(payloads[0])))
                elif payloads:
                    # Pipelined frames are handled together (intake commits them as one
                    # group) and answered in their order; a failure stops the answers there.
                    answers = await asyncio.gather(
                        *(handler(p) for p in payloads), return_exceptions=True
                    )
                    for answer in answers:
                        if isinstance(answer, BaseException):
                            raise answer
                        writer.write(frame(answer))
                await writer.drain()
        except TimeoutError:
            log.info("mllp.idle_timeout", peer=peer, seconds=idle_timeout)
        except FrameTooLarge:
            log.warning("mllp.frame_too_large", peer=peer, limit=max_frame)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("mllp.connection_lost", peer=peer, error=type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler failed: no ACK, the sender will resend
            log.error("mllp.handler_error", peer=peer, error=type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(connection, host, port, ssl=ssl)


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
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return acks
