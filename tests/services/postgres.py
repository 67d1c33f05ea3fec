"""A private PostgreSQL cluster for the test session, started from the machine's binaries.

No PostgreSQL server runs when a fresh machine or CI starts, and Debian's own cluster does not
accept passwordless connections on loopback. So, unless ``BRYGGA_TEST_PG`` names a server to use,
the tests make their own cluster in a temporary folder (``initdb`` with trust on loopback only),
start it on a free port, and stop it when the session ends. Its server log is kept so that a
test can read what the database itself said (a ``deadlock detected`` line, for instance).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.bus.broker import free_port

ENV = "BRYGGA_TEST_PG"
INSTALL_HINT = "install PostgreSQL's server (Debian: apt-get install -y postgresql)"


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(f"no PostgreSQL server binaries (initdb) on this machine: {INSTALL_HINT}")


@dataclass
class PrivateCluster:
    """One ``initdb``-made cluster; ``dsn`` is its superuser's admin DSN."""

    root: Path
    port: int
    bin_dir: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # PostgreSQL refuses to run as root; as root, run it as the package's own user.
        prefix: list[str] = []
        if os.geteuid() == 0:
            prefix = ["runuser", "-u", "postgres", "--"]
        return subprocess.run(
            [*prefix, *args], check=check, capture_output=True, text=True, timeout=120
        )

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        )  # fmt: skip
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# brygga tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 400\n"
                "fsync = off\n"  # a test cluster; a process kill still keeps every commit
                "full_page_writes = off\n"
                "log_line_prefix = '%m [%p] %d '\n"
                "deadlock_timeout = '200ms'\n"
            )

    def start(self, timeout: float = 60) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(int(timeout)), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
            check=False,
        )  # fmt: skip

    def restart(self, mode: str = "immediate") -> float:
        """Stop (``immediate`` is a crash as far as clients can tell) and start; seconds taken."""
        began = time.monotonic()
        self.stop(mode)
        self.start()
        return time.monotonic() - began

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


_cluster: PrivateCluster | None = None


def ensure() -> str:
    """The admin DSN the tests use: ``$BRYGGA_TEST_PG``, else a private cluster started now."""
    global _cluster
    if os.environ.get(ENV):
        return os.environ[ENV]
    root = Path(tempfile.mkdtemp(prefix="brygga-pg-"))
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
    cluster = PrivateCluster(root=root / "pg", port=free_port(), bin_dir=_bin_dir())
    cluster.init()
    cluster.start()
    _cluster = cluster
    os.environ[ENV] = cluster.dsn  # gateway processes and the bench read it too
    return cluster.dsn


def cluster() -> PrivateCluster | None:
    """The private cluster, when the tests started one (None with ``$BRYGGA_TEST_PG``)."""
    return _cluster


def shutdown() -> None:
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        shutil.rmtree(_cluster.root.parent, ignore_errors=True)
        _cluster = None
