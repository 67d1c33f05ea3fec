"""``brygga audit verify``: recompute the chain from seq 1 and say exactly where it breaks.

Rows are read in seq order, in batches (each its own short read, so a long check does not
hold SQLite's write lock), up to the head as it was when the check began. For each row:

- **missing**: its seq is not one more than the previous row's: the rows between are gone.
- **changed**: its hash does not match its content (any field, including prev_hash).
- **reordered**: its content matches its hash only under another row's seq: rows were moved.
- **relinked**: it matches its hash, but its prev_hash is not the previous row's hash: one of
  the two was rewritten and its hash computed again.

Then each checkpoint: its signature must be valid under a known audit key, and the row at its
seq must still have the hash it signed (**checkpoint** findings). What a whole rewrite of the
chain's tail, or a deletion of its newest rows, leaves behind is a checkpoint that no longer
matches; rows after the last checkpoint are reported as not yet covered, which is no error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select

from gateway.audit.chain import GENESIS, row_hash
from gateway.audit.checkpoints import Checkpoint, key_id
from gateway.store.db import Database
from gateway.store.tables import audit_checkpoints, audit_log

BATCH = 5000
MAX_SUSPECTS = 1000  # rows whose content fails, kept to look for reordering


@dataclass(frozen=True, slots=True)
class Finding:
    seq: int
    kind: str  # missing | changed | reordered | relinked | checkpoint
    text: str


@dataclass(slots=True)
class Report:
    rows: int = 0
    head_seq: int = 0
    checkpoints: int = 0
    last_checkpoint: Checkpoint | None = None  # the newest one that is valid and matches
    findings: list[Finding] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def uncovered(self) -> int:
        """Rows after the newest valid checkpoint."""
        return self.head_seq - (self.last_checkpoint.seq if self.last_checkpoint else 0)


async def _rows(db: Database, top: int) -> AsyncIterator[Any]:
    after = 0
    while True:
        async with db.read() as conn:
            batch = (
                await conn.execute(
                    select(audit_log)
                    .where(audit_log.c.seq > after, audit_log.c.seq <= top)
                    .order_by(audit_log.c.seq)
                    .limit(BATCH)
                )
            ).all()
        if not batch:
            return
        for row in batch:
            yield row
        after = batch[-1].seq


def _missing(before: int, after: int) -> Finding:
    if before == 0:
        return Finding(after, "missing", f"rows before seq {after} are missing")
    return Finding(before + 1, "missing", f"rows between seq {before} and {after} are missing")


async def verify(db: Database, public_keys: Iterable[Ed25519PublicKey]) -> Report:
    keys = {key_id(k): k for k in public_keys}
    report = Report()
    async with db.read() as conn:
        # Checkpoints first: each was written after the rows it covers had committed, so a
        # checkpoint beyond the head read next means rows were removed, not a race.
        stored = (
            await conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq))
        ).all()
        top = int((await conn.execute(select(func.max(audit_log.c.seq)))).scalar() or 0)
    report.head_seq = top
    report.checkpoints = len(stored)
    signed: dict[int, Checkpoint] = {}
    for row in stored:
        cp = Checkpoint.from_row(row)
        if cp.key_id not in keys:
            report.findings.append(
                Finding(
                    cp.seq,
                    "checkpoint",
                    f"checkpoint at seq {cp.seq} is signed with key {cp.key_id}, which is not "
                    f"a known audit key (known: {', '.join(sorted(keys)) or 'none'})",
                )
            )
        elif not cp.signed_by(keys[cp.key_id]):
            report.findings.append(
                Finding(
                    cp.seq,
                    "checkpoint",
                    f"checkpoint at seq {cp.seq}: the signature is not valid (forged or altered)",
                )
            )
        else:
            signed[cp.seq] = cp

    prev_seq, prev_hash, prev_suspect = 0, GENESIS, False
    suspects: list[Any] = []
    gaps: list[tuple[int, int]] = []
    last_match = 0
    async for row in _rows(db, top):
        report.rows += 1
        gap = row.seq != prev_seq + 1
        if gap:
            report.findings.append(_missing(prev_seq, row.seq))
            gaps.append((prev_seq + 1, row.seq - 1))
        suspect = row_hash(row.prev_hash, row._mapping) != row.hash
        if suspect:
            suspects.append(row)
        elif not gap and not prev_suspect and row.prev_hash != prev_hash:
            report.findings.append(
                Finding(
                    prev_seq,
                    "relinked",
                    f"row seq {row.seq} does not link to row seq {prev_seq}: one of the two "
                    "was rewritten and its hash computed again",
                )
            )
        cp = signed.get(row.seq)
        if cp is not None:
            if cp.head_hash == row.hash:
                last_match = row.seq
                report.last_checkpoint = cp
            else:
                where = (
                    f"between seq {last_match} and {row.seq}"
                    if last_match
                    else f"up to seq {row.seq}"
                )
                report.findings.append(
                    Finding(
                        row.seq,
                        "checkpoint",
                        f"checkpoint at seq {row.seq} does not match the chain: rows {where} "
                        "were rewritten after it was signed",
                    )
                )
        prev_seq, prev_hash, prev_suspect = row.seq, row.hash, suspect

    seen_to = prev_seq
    for seq in sorted(signed):
        if seq > seen_to:
            report.findings.append(
                Finding(
                    seq,
                    "missing",
                    f"rows after seq {seen_to} up to seq {seq} are missing "
                    f"(the checkpoint at seq {seq} covered them)",
                )
            )
            break
    report.findings.extend(_explain(suspects, gaps))
    report.findings.sort(key=lambda f: f.seq)
    return report


def _explain(suspects: list[Any], gaps: list[tuple[int, int]]) -> list[Finding]:
    """A changed row whose content fits another seq was moved there, else it was changed."""
    candidates = {r.seq for r in suspects[:MAX_SUSPECTS]}
    for first, last in gaps:
        candidates.update(range(first, min(last, first + MAX_SUSPECTS) + 1))
    findings = []
    for i, row in enumerate(suspects):
        home = None
        if i < MAX_SUSPECTS:
            content = dict(row._mapping)
            for seq in sorted(candidates - {row.seq}):
                if row_hash(row.prev_hash, {**content, "seq": seq}) == row.hash:
                    home = seq
                    break
        if home is None:
            text = f"row seq {row.seq} was changed: its hash does not match its content"
            findings.append(Finding(row.seq, "changed", text))
        else:
            text = f"row seq {row.seq} was reordered: its content is entry {home} of the chain"
            findings.append(Finding(row.seq, "reordered", text))
    return findings
