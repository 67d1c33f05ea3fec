"""A steady MLLP sender, as a hospital's integration engine is: several connections, a fixed
rate, and every message resent until it gets a positive ACK (after a timeout, a refused
connection or a dropped one). What it records is what the fault figures start from."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.takecare.mllp import Framer, frame
from tests.support import iter_segments

ACK_TIMEOUT = 10.0  # seconds a sender waits for an ACK before it resends
RETRY_PAUSE = 0.25  # between failed attempts on one connection


@dataclass
class Sent:
    """What happened to one message at the sender."""

    first_sent: float = 0.0
    acked_at: float | None = None
    attempts: int = 0
    answers: list[str] = field(default_factory=list)  # MSA-1 of every answer, in order


class Load:
    """Send ``messages`` over ``connections`` MLLP connections at ``rate`` messages a second
    in total (each connection its share, in order), resending each until it is ACKed AA.
    ``port`` is asked again on every reconnect, so the receiving process may be replaced."""

    def __init__(
        self,
        port: Callable[[], int],
        messages: dict[str, bytes],
        *,
        connections: int = 4,
        rate: float = 10.0,
    ) -> None:
        self.port = port
        self.messages = messages
        self.connections = connections
        self.rate = rate
        self.sent = {cid: Sent() for cid in messages}
        self.t0 = 0.0
        self._lock = threading.Lock()
        self._acked = 0
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def acked(self) -> int:
        return self._acked

    def start(self) -> Load:
        self.t0 = time.monotonic()
        ids = list(self.messages)
        self._threads = [
            threading.Thread(target=self._connection, args=(i, ids[i :: self.connections]))
            for i in range(self.connections)
        ]
        for t in self._threads:
            t.daemon = True
            t.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait for every message to be ACKed; False if some were not within ``timeout``."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self._threads)
        self._stop.set()
        return done

    @property
    def duration(self) -> float:
        """Seconds the load lasts when nothing goes wrong."""
        return len(self.messages) / self.rate

    def wait_until(self, fraction: float, *, acked_at_least: int = 0) -> None:
        """Wait until ``fraction`` of the load's time has passed and ``acked_at_least``
        messages are ACKed (so the next fault comes after the gateway took work again)."""
        time.sleep(max(0.0, self.t0 + fraction * self.duration - time.monotonic()))
        deadline = time.monotonic() + 300
        while self._acked < acked_at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self._acked} ACKed, waiting for {acked_at_least}")
            time.sleep(0.005)
        assert self.unacked(), "the load was over before the fault"

    def resent_messages(self) -> int:
        """Messages the sender had to send more than once."""
        return sum(s.attempts > 1 for s in self.sent.values())

    def first_ack_after(self, t: float) -> float | None:
        """Seconds from ``t`` (monotonic) to the first positive ACK given after it."""
        after = [s.acked_at for s in self.sent.values() if s.acked_at and s.acked_at >= t]
        return min(after) - t if after else None

    def resends(self) -> int:
        return sum(max(0, s.attempts - 1) for s in self.sent.values())

    def unacked(self) -> list[str]:
        return [cid for cid, s in self.sent.items() if s.acked_at is None]

    def _connection(self, index: int, ids: list[str]) -> None:
        sock: socket.socket | None = None
        try:
            for k, cid in enumerate(ids):
                due = self.t0 + (k * self.connections + index) / self.rate
                time.sleep(max(0.0, due - time.monotonic()))
                record = self.sent[cid]
                record.first_sent = time.monotonic()
                while not self._stop.is_set():
                    try:
                        sock = sock or socket.create_connection(
                            ("127.0.0.1", self.port()), timeout=ACK_TIMEOUT
                        )
                        sock.sendall(frame(self.messages[cid]))
                        record.attempts += 1  # sent (as far as the sender can tell)
                        answer = _read_ack(sock)
                    except OSError:
                        answer = None
                    if answer is None:  # no ACK: a new connection, and send it again
                        if sock is not None:
                            sock.close()
                            sock = None
                        time.sleep(RETRY_PAUSE)
                        continue
                    record.answers.append(answer)
                    if answer == "AA":
                        record.acked_at = time.monotonic()
                        with self._lock:
                            self._acked += 1
                        break
                    time.sleep(RETRY_PAUSE)  # AE/AR: a sender would resend, as we do
        finally:
            if sock is not None:
                sock.close()


def _read_ack(sock: socket.socket) -> str | None:
    """Read one ACK; its MSA-1, or None if the connection closed first."""
    framer = Framer()
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        for payload in framer.feed(data):
            msa = next((s for s in iter_segments(payload) if s[0] == "MSA"), None)
            return msa[1] if msa and len(msa) > 1 else None
