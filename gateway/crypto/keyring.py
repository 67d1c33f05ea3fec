"""The keyring: data keys (DEKs) loaded from ``data_keys``, unwrapped by the KEK, in memory.

One per process. It encrypts with the *active* data key and decrypts with whichever key a
value names. Rotation needs no restart:

- the active key is looked up again when it is older than ``cache_seconds`` (default 5 s):
  ``brygga keys rotate`` creates a new active key, and every process encrypts with it within
  that time;
- a value under a key this process has not loaded yet (written by a process that picked up
  the new key first) loads that key on demand: without blocking from async code
  (:meth:`Keyring.prepare`, used for Kafka records), or, inside a database result processor,
  with one short blocking read of ``data_keys`` in a worker thread (:meth:`Keyring.open`).
  Either happens once per key per process.

Retired keys stay readable for as long as rows or records use them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from gateway import clock
from gateway.crypto.envelope import (
    DecryptionError,
    dek_id_of,
    is_sealed,
    open_sealed,
    raw_dek_id,
    seal,
)
from gateway.crypto.kek import KekProvider, KeyUnavailable
from gateway.crypto.kek import new_key as new_data_key
from gateway.logs import error_fields
from gateway.store.db import KEYS_LOCK, Database, advisory_xact_lock
from gateway.store.tables import data_keys

log = structlog.get_logger("brygga.crypto")

ACTIVE, RETIRED = "active", "retired"


@dataclass(frozen=True, slots=True)
class KeyRow:
    id: str
    wrapped_key: bytes
    kek_id: str
    state: str


class Keyring:
    """Seals and opens values (see :mod:`gateway.crypto.envelope`) with the data keys."""

    def __init__(
        self,
        db: Database,
        kek: KekProvider,
        *,
        cache_seconds: float = 5.0,
        allow_plaintext: bool = True,
    ) -> None:
        self.db = db
        self.kek = kek
        self.cache_seconds = cache_seconds
        self.allow_plaintext = allow_plaintext
        self._keys: dict[bytes, AESGCM] = {}
        self._active: tuple[bytes, AESGCM] | None = None
        self._fresh_until = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._load_lock = threading.Lock()

    @property
    def active_key_id(self) -> str | None:
        return str(uuid.UUID(bytes=self._active[0])) if self._active else None

    @property
    def loaded(self) -> int:
        return len(self._keys)

    async def start(self) -> None:
        """Create the first data key if there is none, then load every key (or fail loudly)."""
        await ensure_active_key(self.db, self.kek)
        await self.refresh(strict=True)

    async def refresh(self, *, strict: bool = False) -> None:
        """Load keys not loaded yet and look up the active one.

        ``strict``: a key that cannot be unwrapped is an error (at start: a process without
        the right KEK must not run); otherwise it is logged and skipped.
        """
        self._fresh_until = time.monotonic() + self.cache_seconds
        async with self.db.read() as conn:
            rows = await key_rows(conn)
        active: tuple[bytes, AESGCM] | None = None
        for row in rows:  # oldest first: the newest active key wins
            raw_id = uuid.UUID(row.id).bytes
            if raw_id not in self._keys:
                try:
                    self._keys[raw_id] = await asyncio.to_thread(self._unwrap, row)
                except KeyUnavailable as exc:
                    if strict:
                        raise
                    log.error("crypto.key_unavailable", dek_id=row.id, **error_fields(exc))
                    continue
            if row.state == ACTIVE:
                active = (raw_id, self._keys[raw_id])
        if active is not None:
            if self._active is not None and active[0] != self._active[0]:
                log.info("crypto.active_key_changed", dek_id=str(uuid.UUID(bytes=active[0])))
            self._active = active

    def _unwrap(self, row: KeyRow) -> AESGCM:
        return AESGCM(self.kek.unwrap(row.wrapped_key, row.id, row.kek_id))

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt under the active data key (looked up again every ``cache_seconds``)."""
        if time.monotonic() >= self._fresh_until:
            self._refresh_soon()
        if self._active is None:
            raise RuntimeError("the keyring has no active data key: Keyring.start() not run")
        raw_id, aead = self._active
        return seal(aead, raw_id, plaintext, context)

    def open(self, value: bytes, context: bytes) -> bytes:
        """Decrypt; a key not loaded yet is read from ``data_keys`` here and now."""
        aead = self._keys.get(raw_dek_id(value))
        if aead is None:
            aead = self._load_blocking(value)
        return open_sealed(aead, value, context)

    async def prepare(self, value: bytes) -> None:
        """Load the key ``value`` is sealed under, if needed, without blocking the loop."""
        if is_sealed(value) and raw_dek_id(value) not in self._keys:
            await self.refresh()
            if raw_dek_id(value) not in self._keys:
                raise DecryptionError(f"data key {dek_id_of(value)} is not in data_keys")

    def _refresh_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._fresh_until = time.monotonic() + self.cache_seconds  # one refresh at a time
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = loop.create_task(self._refresh_logged(), name="keyring-refresh")

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the database is away: keep the keys we have, retry later
            log.warning("crypto.refresh_failed", **error_fields(exc))

    def _load_blocking(self, value: bytes) -> AESGCM:
        dek_id = dek_id_of(value)  # raises DecryptionError for what is not an envelope
        raw_id = raw_dek_id(value)
        with self._load_lock:
            if raw_id in self._keys:
                return self._keys[raw_id]
            with ThreadPoolExecutor(1, thread_name_prefix="keyring-load") as pool:
                row = pool.submit(asyncio.run, _fetch_row(self.db.url, dek_id)).result(30)
            if row is None:
                raise DecryptionError(f"data key {dek_id} is not in data_keys")
            aead = self._keys[raw_id] = self._unwrap(row)
        log.info("crypto.key_loaded_on_demand", dek_id=dek_id)
        return aead


_KEY_ROWS = select(data_keys.c.id, data_keys.c.wrapped_key, data_keys.c.kek_id, data_keys.c.state)


async def key_rows(conn: AsyncConnection) -> list[KeyRow]:
    result = await conn.execute(_KEY_ROWS.order_by(data_keys.c.created_at, data_keys.c.id))
    return [KeyRow(*r) for r in result]


async def _fetch_row(url: str, dek_id: str) -> KeyRow | None:
    """One ``data_keys`` row over a connection of its own (for a thread with its own loop)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(_KEY_ROWS.where(data_keys.c.id == dek_id))).first()
    finally:
        await engine.dispose()
    return KeyRow(*row) if row else None


async def lock_keys(conn: AsyncConnection) -> None:
    """Serialise key changes across processes, for the rest of ``conn``'s transaction.

    PostgreSQL: an advisory transaction lock. SQLite: the transaction already holds the
    database's write lock (BEGIN IMMEDIATE).
    """
    await advisory_xact_lock(conn, KEYS_LOCK)


async def insert_key(conn: AsyncConnection, kek: KekProvider) -> str:
    kek.reload()  # a KEK rotated by another process meanwhile: wrap under the new one
    dek_id = str(uuid.uuid4())
    wrapped = await asyncio.to_thread(kek.wrap, new_data_key(), dek_id)
    await conn.execute(
        data_keys.insert().values(
            id=dek_id, wrapped_key=wrapped, kek_id=kek.key_id, state=ACTIVE, created_at=clock.now()
        )
    )
    return dek_id


async def ensure_active_key(db: Database, kek: KekProvider) -> str | None:
    """Create the first data key if none is active. Returns its id, or None if there was one."""
    async with db.read() as conn:
        if await _active_id(conn):
            return None
    async with db.transaction() as conn:
        await lock_keys(conn)
        if await _active_id(conn):  # another process was first
            return None
        dek_id = await insert_key(conn, kek)
    log.info("crypto.first_key_created", dek_id=dek_id)
    return dek_id


async def _active_id(conn: AsyncConnection) -> str | None:
    return (
        await conn.execute(
            select(data_keys.c.id)
            .where(data_keys.c.state == ACTIVE)
            .order_by(data_keys.c.created_at.desc(), data_keys.c.id.desc())
            .limit(1)
        )
    ).scalar()
