"""The audit log: one hash chain of entries, appended in the caller's transaction.

Every entry says who (``actor``, ``actor_org`` HSA-id, ``role``), what (``action``,
``subject``), about which patient (``patient_key``, the HMAC pseudonym of
``gateway.bus.keys``; never the identity number), why (``purpose``) and when (``at``), as
HSLF-FS 2016:40 ch. 4 asks.

**The chain.** Entries are numbered ``seq`` = 1, 2, 3, … without gaps. Each row stores the
hash of the row before it (``prev_hash``; 64 zeros for seq 1) and its own hash::

    hash = SHA-256( prev_hash as 64 ASCII hex digits || canonical(row) )   (lowercase hex)

    canonical(row) = b"brygga-audit-v1\\n" followed by, for each field in FIELDS order,
                     the field as UTF-8 bytes in netstring form: b"<byte length>:<bytes>,"

    seq        decimal digits, no sign or leading zeros
    at         ISO 8601 in UTC with microseconds: 2026-11-23T08:15:02.123456+00:00
    the rest   the stored text as is (empty string for "none")

A netstring says its own length, so no choice of text in one field can imitate another field:
the encoding is injective, and it can be rebuilt in any language from the stored row.

**Concurrency.** The chain stays linear with any number of writers in any number of
processes: on PostgreSQL an append first takes a transaction-level advisory lock
(``pg_advisory_xact_lock(AUDIT_LOCK)``, held until the caller commits or rolls back), then
reads the head; SQLite lets one writer at a time in (``BEGIN IMMEDIATE``, see
``gateway/store/db.py``). So the committed rows are always a gap-free prefix. The lock is held
until commit: call ``record`` as the last step of a transaction, after every row lock it takes
(the one lock order, docs/architecture.md "Locks": a transaction holding the chain that then
waits for a row is how deadlocks happened). Collect several entries and append them once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.logs import redact_identity_numbers
from gateway.store.db import AUDIT_LOCK, advisory_xact_lock
from gateway.store.tables import audit_log

GENESIS = "0" * 64
VERSION = b"brygga-audit-v1\n"
FIELDS = (
    "seq",
    "at",
    "actor",
    "actor_org",
    "role",
    "action",
    "patient_key",
    "subject",
    "purpose",
    "outcome",
    "detail",
)

# Purposes (why the data was used), as recorded in ``purpose``.
PURPOSE_LUS = "lus-utskrivning"  # samverkan vid utskrivning: the reason the gateway exists
PURPOSE_OPERATIONS = "drift"  # following a message's delivery as operations staff
PURPOSE_AUDIT = "logguppfoljning"  # reading the audit log itself
SYSTEM_ROLE = "system"  # the role of a gateway stage acting on its own

_CODE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_PSEUDONYM = re.compile(r"^[0-9a-f]{32,64}$")
_LIMITS = {c.name: c.type.length for c in audit_log.columns if hasattr(c.type, "length")}


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One thing done with a patient's data. Keyword arguments only.

    ``actor``, ``role`` and ``detail`` are free text: cut to their column's length, and
    anything shaped like an identity number is masked. The other fields are codes and ids;
    a wrong one raises ``ValueError`` (a programming error, never the caller's data).
    """

    actor: str
    actor_org: str
    role: str
    action: str
    purpose: str
    patient_key: str = ""
    subject: str = ""
    outcome: str = "ok"
    detail: str = ""

    def __post_init__(self) -> None:
        for name in ("action", "purpose", "outcome"):
            value = getattr(self, name)
            if not _CODE.match(value) or len(value) > _LIMITS[name]:
                raise ValueError(f"audit {name} must be a short lowercase code")
        if self.patient_key and not _PSEUDONYM.match(self.patient_key):
            raise ValueError("audit patient_key must be the HMAC pseudonym (hex), never an id")
        for name in ("actor_org", "subject"):
            if len(getattr(self, name)) > _LIMITS[name]:
                raise ValueError(f"audit {name} is longer than {_LIMITS[name]} characters")

    def row(self, seq: int, at: datetime, prev_hash: str) -> dict[str, Any]:
        """The ``audit_log`` row of this entry at ``seq``, with its hash."""
        values: dict[str, Any] = {
            "seq": seq,
            "at": at.astimezone(UTC),
            "actor": _free_text(self.actor, "actor"),
            "actor_org": self.actor_org,
            "role": _free_text(self.role, "role"),
            "action": self.action,
            "patient_key": self.patient_key,
            "subject": self.subject,
            "purpose": self.purpose,
            "outcome": self.outcome,
            "detail": _free_text(self.detail, "detail"),
            "prev_hash": prev_hash,
        }
        values["hash"] = row_hash(prev_hash, values)
        return values


def _free_text(value: str, column: str) -> str:
    # Storable everywhere (no NUL, no lone surrogates); identity numbers never belong here.
    clean = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return redact_identity_numbers(clean)[: _LIMITS[column]]


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers (see the module docstring)."""
    parts = [VERSION]
    for name in FIELDS:
        value = row[name]
        if name == "seq":
            value = str(int(value))
        elif name == "at":
            value = value.astimezone(UTC).isoformat(timespec="microseconds")
        data = value.encode("utf-8")
        parts.append(b"%d:%s," % (len(data), data))
    return b"".join(parts)


def row_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(row)).hexdigest()


async def head(conn: AsyncConnection) -> tuple[int, str]:
    """(seq, hash) of the newest row, or (0, GENESIS) when the log is empty."""
    last = (
        await conn.execute(
            select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
        )
    ).first()
    return (int(last.seq), str(last.hash)) if last else (0, GENESIS)


async def record(conn: AsyncConnection, entry: AuditEntry) -> None:
    """Append ``entry`` in the caller's transaction: it commits or rolls back with the effect
    it describes. Call it last, just before commit (it holds the chain's lock until then)."""
    await record_many(conn, (entry,))


async def record_many(conn: AsyncConnection, entries: Sequence[AuditEntry]) -> None:
    """Append several entries at once (one lock, one INSERT), in the given order."""
    if not entries:
        return
    await advisory_xact_lock(conn, AUDIT_LOCK)
    seq, prev_hash = await head(conn)
    at = clock.now()  # read under the lock, so that time never goes back along the chain
    rows = []
    for entry in entries:
        seq += 1
        row = entry.row(seq, at, prev_hash)
        prev_hash = row["hash"]
        rows.append(row)
    await conn.execute(insert(audit_log), rows)
