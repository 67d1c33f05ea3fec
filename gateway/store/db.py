"""The database handle: one async engine, transactions, and hooks that run after commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# PostgreSQL advisory lock ids: each names one thing that happens one at a time across every
# Brygga process sharing the database.
MIGRATION_LOCK = 7_264_003
AUDIT_LOCK = 7_264_004  # appending to the audit chain
KEYS_LOCK = 7_264_005  # creating, retiring and re-wrapping data keys


async def advisory_xact_lock(conn: AsyncConnection, lock_id: int) -> None:
    """Hold ``lock_id`` until ``conn``'s transaction ends. SQLite: nothing to do, its
    transactions already hold the database's one write lock (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": lock_id})


def make_engine(url: str) -> AsyncEngine:
    """An engine tuned for its backend.

    SQLite: WAL, a busy timeout, and BEGIN IMMEDIATE so that writers queue for the lock
    instead of failing when a read transaction tries to upgrade (several stages write at once).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the ACK goes out, even across a power loss.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping: it costs a round trip per checkout on the hot path; connections are
    # recycled instead, and a stage retries a transaction that failed on a dead one.
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_recycle=1800)


class DatabaseUnavailable(Exception):
    """No connection to the database could be made (it is restarting, or unreachable)."""


class Database:
    """Owns the engine. ``transaction()`` is the unit of work of every stage.

    Callbacks registered with ``on_commit`` run after every successful commit; the outbox
    relay uses one to publish at once instead of waiting for its next poll.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._after_commit: list[Callable[[], None]] = []

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    async def _connect(self) -> AsyncConnection:
        try:
            return await self.engine.connect()
        except (OSError, TimeoutError) as exc:  # refused, unreachable, connect timeout
            raise DatabaseUnavailable("the database cannot be reached") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        conn = await self._connect()
        try:
            async with conn.begin():
                yield conn
        finally:
            await conn.close()
        self.committed()

    def committed(self) -> None:
        """Run the after-commit callbacks (for writers that commit outside ``transaction``)."""
        for callback in self._after_commit:
            callback()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        conn = await self._connect()
        try:
            yield conn
        finally:
            await conn.close()

    async def close(self) -> None:
        await self.engine.dispose()


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["database_url"] = url
    return cfg


def migrate_sync(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (blocking; runs its own event loop)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


async def migrate(url: str, revision: str = "head") -> None:
    """Apply migrations from async code (Alembic's async env needs its own loop)."""
    await asyncio.to_thread(migrate_sync, url, revision)
