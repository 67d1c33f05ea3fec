"""Signed checkpoints of the audit chain: the gateway vouches for its head now and then.

The chain alone shows a row changed in the middle; it cannot show that its newest rows were
removed, or that someone rewrote a stretch and computed every hash again. A checkpoint can:
an Ed25519 signature, by a key of the gateway's own (``keys/audit-ed25519.pem``, created
mode 0600 on first use), over::

    b"brygga-audit-checkpoint-v1\\n" + "<seq>\\n<head hash>\\n<at ISO 8601 UTC, µs>\\n<key id>\\n"

``key id`` is the first 16 hex digits of SHA-256 over the raw 32-byte public key. A checkpoint
is written every ``audit_checkpoint_every`` entries or when the oldest entry not yet covered
is ``audit_checkpoint_seconds`` old, by the ``audit-checkpoint`` stage, and on demand by
``brygga audit checkpoint``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.audit.chain import head
from gateway.keyfiles import ed25519_private_key
from gateway.logs import error_fields
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.sql import insert_ignore
from gateway.store.tables import audit_checkpoints, audit_log

log = structlog.get_logger("brygga.audit")
KEY_FILE = "audit-ed25519.pem"
POLL_SECONDS = 5.0


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    head_hash: str
    at: datetime
    key_id: str
    signature: str

    @classmethod
    def from_row(cls, row: Any) -> Checkpoint:
        return cls(int(row.seq), row.head_hash, row.at, row.key_id, row.signature)

    def message(self) -> bytes:
        at = self.at.astimezone(UTC).isoformat(timespec="microseconds")
        return (
            f"brygga-audit-checkpoint-v1\n{self.seq}\n{self.head_hash}\n{at}\n{self.key_id}\n"
        ).encode()

    def signed_by(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(bytes.fromhex(self.signature), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True


class AuditSigner:
    """The gateway's audit signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def from_dir(cls, keys_dir: Path, *, create: bool = True) -> AuditSigner:
        return cls(ed25519_private_key(keys_dir / KEY_FILE, create=create))

    def sign(self, seq: int, head_hash: str, at: datetime) -> Checkpoint:
        unsigned = Checkpoint(seq, head_hash, at, self.key_id, "")
        signature = self._private.sign(unsigned.message()).hex()
        return Checkpoint(seq, head_hash, at, self.key_id, signature)

    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


async def last_checkpoint(conn: AsyncConnection) -> Checkpoint | None:
    row = (
        await conn.execute(
            select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()).limit(1)
        )
    ).first()
    return Checkpoint.from_row(row) if row else None


async def checkpoint_due(conn: AsyncConnection, every: int, seconds: float) -> bool:
    """True when ``every`` entries or more, or one older than ``seconds``, are not covered."""
    seq, _ = await head(conn)
    last = await last_checkpoint(conn)
    covered = last.seq if last else 0
    if seq <= covered:
        return False
    if seq - covered >= every:
        return True
    oldest = (
        await conn.execute(select(audit_log.c.at).where(audit_log.c.seq == covered + 1))
    ).scalar_one_or_none()
    return oldest is None or clock.now() - oldest >= timedelta(seconds=seconds)


async def write_checkpoint(db: Database, signer: AuditSigner) -> Checkpoint | None:
    """Sign the chain's current head; None when the last checkpoint already covers it.

    The committed rows are always a gap-free prefix of the chain (see ``chain``), so the head
    read here is a state of the chain that will never change. Two processes signing the same
    head at once write one row (same key: Ed25519 signatures are deterministic).
    """
    async with db.transaction() as conn:
        seq, head_hash = await head(conn)
        last = await last_checkpoint(conn)
        if seq == 0 or (last is not None and last.seq >= seq):
            return None
        checkpoint = signer.sign(seq, head_hash, clock.now())
        await insert_ignore(
            conn,
            audit_checkpoints,
            {
                "seq": checkpoint.seq,
                "head_hash": checkpoint.head_hash,
                "at": checkpoint.at,
                "key_id": checkpoint.key_id,
                "signature": checkpoint.signature,
            },
        )
    log.info("audit.checkpoint", seq=checkpoint.seq, key_id=checkpoint.key_id)
    return checkpoint


class Checkpointer:
    """The loop of the ``audit-checkpoint`` stage."""

    def __init__(self, db: Database, signer: AuditSigner, every: int, seconds: float) -> None:
        self.db = db
        self.signer = signer
        self.every = every
        self.seconds = seconds

    async def once(self) -> Checkpoint | None:
        async with self.db.read() as conn:
            due = await checkpoint_due(conn, self.every, self.seconds)
        return await write_checkpoint(self.db, self.signer) if due else None

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again at the next tick
                log.warning("audit.checkpoint_retry", **error_fields(exc))
            await asyncio.sleep(min(self.seconds, POLL_SECONDS))


class CheckpointPlugin:
    """Entry point ``brygga.stages: audit-checkpoint``: signs checkpoints in the background.

    The runtime calls ``enabled`` with the process's settings before ``background``.
    """

    name = "audit-checkpoint"

    def __init__(self) -> None:
        self.settings: Settings | None = None

    def enabled(self, settings: Settings) -> bool:
        self.settings = settings
        return True

    def stage(self, db: Database) -> None:
        return None

    def background(self, db: Database) -> Coroutine[Any, Any, None]:
        assert self.settings is not None, "enabled(settings) comes first"
        s = self.settings
        signer = AuditSigner.from_dir(s.keys_dir)
        return Checkpointer(db, signer, s.audit_checkpoint_every, s.audit_checkpoint_seconds).run()
