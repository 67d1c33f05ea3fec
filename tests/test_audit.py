"""The audit trail on real databases: the chain, tampering found to the row, checkpoints,
concurrent writers, the CLI.

Tampering is done the way an administrator would do it: SQL straight into the tables, with
the append-only triggers switched off first.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from gateway import audit
from gateway.audit import AuditEntry
from gateway.audit.chain import FIELDS, GENESIS, VERSION, canonical, row_hash
from gateway.audit.checkpoints import (
    AuditSigner,
    Checkpointer,
    CheckpointPlugin,
    write_checkpoint,
)
from gateway.audit.verify import Report, verify
from gateway.model.identifiers import SYSTEMS, IdentifierKind
from gateway.runtime import available_stages
from gateway.settings import Settings
from gateway.store.db import Database, migrate_sync
from gateway.store.tables import audit_checkpoints, audit_log
from tests.conftest import FixedClock
from tests.inprocess import HOME_CARE, KEYER
from tests.support import personnummer

SIGNER = AuditSigner(Ed25519PrivateKey.generate())
PNR_SYSTEM = SYSTEMS[IdentifierKind.PERSONNUMMER]
AUDITORS = "SE2321000016-AUD1"


def entry(n: int) -> AuditEntry:
    pnr = personnummer(n)
    return AuditEntry(
        actor=f"Person {n}",
        actor_org=HOME_CARE,
        role="staff",
        action="message.read",
        purpose=audit.PURPOSE_LUS,
        patient_key=KEYER.key(PNR_SYSTEM, pnr),
        subject=f"delivery-{n}",
    )


async def append(db: Database, count: int, start: int = 1) -> None:
    for n in range(start, start + count):
        async with db.transaction() as conn:
            await audit.record(conn, entry(n))


async def tamper(db: Database, *statements: str) -> None:
    """Run SQL on the audit tables as an administrator would: triggers off."""
    async with db.transaction() as conn:
        if db.is_sqlite:
            for table in ("audit_log", "audit_checkpoints"):
                for verb in ("update", "delete"):
                    await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{verb}"))
        else:
            for table in ("audit_log", "audit_checkpoints"):
                await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        for sql in statements:
            await conn.execute(text(sql))


async def check(db: Database) -> Report:
    return await verify(db, [SIGNER.public_key])


def findings(report: Report) -> list[tuple[int, str]]:
    return [(f.seq, f.kind) for f in report.findings]


async def test_chain_appends_links_and_verifies(db: Database) -> None:
    await append(db, 12)
    async with db.read() as conn:
        rows = (await conn.execute(select(audit_log).order_by(audit_log.c.seq))).all()
    assert [r.seq for r in rows] == list(range(1, 13))
    assert rows[0].prev_hash == GENESIS
    for before, row in zip(rows, rows[1:], strict=False):
        assert row.prev_hash == before.hash
        assert row.hash == row_hash(row.prev_hash, row._mapping)
    assert all(r.at.tzinfo is not None for r in rows)

    report = await check(db)
    assert report.intact and report.rows == 12 and report.uncovered == 12
    checkpoint = await write_checkpoint(db, SIGNER)
    assert checkpoint is not None and checkpoint.seq == 12 and checkpoint.head_hash == rows[-1].hash
    assert await write_checkpoint(db, SIGNER) is None  # nothing new to cover
    await append(db, 3, start=13)
    report = await check(db)
    assert report.intact and report.last_checkpoint == checkpoint and report.uncovered == 3


async def test_an_entry_rolls_back_with_the_effect_it_describes(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await audit.record(conn, entry(1))
            raise RuntimeError("the effect failed")
    await append(db, 1, start=2)
    async with db.read() as conn:
        assert (await conn.execute(select(audit_log.c.seq, audit_log.c.subject))).all() == [
            (1, "delivery-2")
        ]


async def test_the_tables_refuse_update_and_delete(db: Database) -> None:
    await append(db, 2)
    await write_checkpoint(db, SIGNER)
    for sql in (
        "UPDATE audit_log SET actor = 'x' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 2",
        "DELETE FROM audit_checkpoints",
    ):
        with pytest.raises(DBAPIError) as caught:
            async with db.transaction() as conn:
                await conn.execute(text(sql))
        assert "append-only" in str(caught.value)
    assert (await check(db)).intact


TAMPERING = {
    "edit": (
        ["UPDATE audit_log SET actor_org = 'SE0000000000-EVIL' WHERE seq = 17"],
        [(17, "changed")],
        "row seq 17 was changed: its hash does not match its content",
    ),
    "delete": (
        ["DELETE FROM audit_log WHERE seq = 17"],
        [(17, "missing")],
        "rows between seq 16 and 18 are missing",
    ),
    "reorder": (  # swap the seq of two rows
        [
            "UPDATE audit_log SET seq = -1 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = 9",
            "UPDATE audit_log SET seq = 9 WHERE seq = -1",
        ],
        [(5, "reordered"), (9, "reordered")],
        "row seq 5 was reordered: its content is entry 9 of the chain",
    ),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
async def test_tampering_is_named_to_the_row(db: Database, how: str) -> None:
    statements, expected, first_text = TAMPERING[how]
    await append(db, 30)
    await write_checkpoint(db, SIGNER)  # covers all 30: tampering inside is the chain's to find
    await tamper(db, *statements)
    report = await check(db)
    assert findings(report) == expected
    assert report.findings[0].text == first_text


async def test_a_row_rewritten_with_a_new_hash_breaks_the_link(db: Database) -> None:
    await append(db, 20)
    async with db.read() as conn:
        row = (await conn.execute(select(audit_log).where(audit_log.c.seq == 12))).one()
    forged = {**row._mapping, "purpose": "nyfikenhet"}
    new_hash = row_hash(row.prev_hash, forged)
    await tamper(
        db, f"UPDATE audit_log SET purpose = 'nyfikenhet', hash = '{new_hash}' WHERE seq = 12"
    )
    report = await check(db)
    assert findings(report) == [(12, "relinked")]
    assert "row seq 13 does not link to row seq 12" in report.findings[0].text


async def test_checkpoints_catch_a_rewritten_or_truncated_tail(db: Database) -> None:
    await append(db, 10)
    await write_checkpoint(db, SIGNER)
    await append(db, 10, start=11)
    await write_checkpoint(db, SIGNER)
    # Rewrite seq 15 to 20 and compute every hash again: only the checkpoint at 20 sees it.
    async with db.read() as conn:
        rows = (await conn.execute(select(audit_log).where(audit_log.c.seq >= 15))).all()
    prev, updates = rows[0].prev_hash, []
    for row in sorted(rows, key=lambda r: r.seq):
        forged = {**row._mapping, "prev_hash": prev, "detail": "omskriven"}
        prev = row_hash(prev, forged)
        updates.append(
            f"UPDATE audit_log SET detail = 'omskriven', prev_hash = '{forged['prev_hash']}', "
            f"hash = '{prev}' WHERE seq = {row.seq}"
        )
    await tamper(db, *updates)
    report = await check(db)
    assert findings(report) == [(20, "checkpoint")]
    assert "rows between seq 10 and 20 were rewritten" in report.findings[0].text
    # Deleting the newest rows leaves a checkpoint pointing past the end.
    await tamper(db, "DELETE FROM audit_log WHERE seq > 18")
    report = await check(db)
    assert findings(report) == [(20, "missing")]
    assert "rows after seq 18 up to seq 20 are missing" in report.findings[0].text


async def test_a_forged_checkpoint_is_reported(db: Database) -> None:
    await append(db, 5)
    cp = await write_checkpoint(db, SIGNER)
    assert cp is not None
    forged = "0" * 128
    await tamper(db, f"UPDATE audit_checkpoints SET signature = '{forged}' WHERE seq = 5")
    report = await check(db)
    assert findings(report) == [(5, "checkpoint")]
    assert "signature is not valid" in report.findings[0].text
    # A checkpoint signed with a key that is not the gateway's.
    stranger = AuditSigner(Ed25519PrivateKey.generate()).sign(5, cp.head_hash, cp.at)
    await tamper(
        db,
        f"UPDATE audit_checkpoints SET signature = '{stranger.signature}', "
        f"key_id = '{stranger.key_id}' WHERE seq = 5",
    )
    report = await check(db)
    assert findings(report) == [(5, "checkpoint")]
    assert "not a known audit key" in report.findings[0].text


async def test_concurrent_writers_keep_one_linear_chain(db: Database) -> None:
    """Eight writers, each its own connection (a process of its own, as far as the database
    can tell), interleaving transactions of two entries with pauses inside them."""
    other = Database(db.url)  # a second engine: a second pool, as another process has
    rng = random.Random(7)

    async def writer(w: int, database: Database) -> None:
        for i in range(8):
            async with database.transaction() as conn:
                await audit.record(conn, entry(w * 100 + i))
                await asyncio.sleep(rng.random() / 200)
                await audit.record(conn, entry(w * 100 + i + 50))

    try:
        await asyncio.gather(*(writer(w, db if w % 2 else other) for w in range(8)))
    finally:
        await other.close()
    report = await check(db)
    assert report.intact and report.rows == 128 and report.head_seq == 128
    async with db.read() as conn:
        subjects = (await conn.execute(select(audit_log.c.subject))).scalars().all()
    assert len(set(subjects)) == 128


async def test_checkpoints_come_after_n_entries_or_t_seconds(
    db: Database, fixed_clock: FixedClock
) -> None:
    checkpointer = Checkpointer(db, SIGNER, every=5, seconds=60)
    assert await checkpointer.once() is None  # empty
    await append(db, 4)
    assert await checkpointer.once() is None  # 4 < 5, and young
    await append(db, 1, start=5)
    first = await checkpointer.once()
    assert first is not None and first.seq == 5
    await append(db, 2, start=6)
    fixed_clock.at += timedelta(seconds=59)
    assert await checkpointer.once() is None
    fixed_clock.at += timedelta(seconds=1)
    second = await checkpointer.once()
    assert second is not None and second.seq == 7
    async with db.read() as conn:
        assert (await conn.execute(select(audit_checkpoints.c.seq))).scalars().all() == [5, 7]


async def test_the_gateway_runs_the_checkpoint_stage_with_its_own_key(
    db: Database, tmp_path: Path
) -> None:
    assert "audit-checkpoint" in available_stages()
    plugin = CheckpointPlugin()
    assert plugin.enabled(Settings(data_dir=tmp_path, audit_checkpoint_seconds=0.05))
    assert plugin.stage(db) is None
    await append(db, 3)
    task = asyncio.create_task(plugin.background(db))
    try:
        for _ in range(100):
            async with db.read() as conn:
                if (await conn.execute(select(audit_checkpoints.c.seq))).scalars().all():
                    break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    key_file = tmp_path / "keys" / "audit-ed25519.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    signer = AuditSigner.from_dir(tmp_path / "keys", create=False)
    report = await verify(db, [signer.public_key])
    assert report.intact and report.last_checkpoint and report.last_checkpoint.seq == 3


async def test_any_text_survives_the_round_trip_through_the_database(db: Database) -> None:
    odd = AuditEntry(
        actor="Åsa Öberg-Ærø 'x'; \"y\" 🙂  ",
        actor_org="",
        role="Sjuksköterska\tnatt\n",
        action="message.read",
        purpose="lus-utskrivning",
        detail="\x00ž\ud800" * 300,
    )
    async with db.transaction() as conn:
        await audit.record_many(conn, [odd, entry(1), odd])
    report = await check(db)
    assert report.intact and report.rows == 3


def test_entries_refuse_identity_numbers_and_mask_them_in_free_text() -> None:
    pnr = personnummer(3)
    with pytest.raises(ValueError, match="pseudonym") as caught:
        AuditEntry(
            actor="a", actor_org=HOME_CARE, role="r", action="x", purpose="p", patient_key=pnr
        )
    assert pnr not in str(caught.value)
    with pytest.raises(ValueError, match="action"):
        AuditEntry(actor="a", actor_org=HOME_CARE, role="r", action="Läste", purpose="p")
    row = AuditEntry(
        actor="a", actor_org="", role="r", action="x", purpose="p", detail=f"om {pnr}\x00" * 40
    ).row(1, datetime(2026, 1, 1, tzinfo=UTC), GENESIS)
    assert pnr not in row["detail"] and "<redacted>" in row["detail"]
    assert len(row["detail"]) == 500 and "\x00" not in row["detail"]


def _netstrings(data: bytes) -> list[str]:
    """Parse canonical(): the proof that it can be read back, so it is injective."""
    assert data.startswith(VERSION)
    rest, out = data[len(VERSION) :], []
    while rest:
        length, _, rest = rest.partition(b":")
        out.append(rest[: int(length)].decode())
        assert rest[int(length) : int(length) + 1] == b","
        rest = rest[int(length) + 1 :]
    return out


@given(
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    at=st.datetimes(timezones=st.just(UTC)),
    texts=st.lists(st.text(), min_size=len(FIELDS) - 2, max_size=len(FIELDS) - 2),
)
def test_canonical_encoding_reads_back_field_by_field(
    seq: int, at: datetime, texts: list[str]
) -> None:
    row = {"seq": seq, "at": at, **dict(zip(FIELDS[2:], texts, strict=True))}
    fields = _netstrings(canonical(row))
    assert fields == [str(seq), at.isoformat(timespec="microseconds"), *texts]
    # Any one field changed changes the hash; so does the previous hash.
    for name in FIELDS[2:]:
        assert row_hash(GENESIS, {**row, name: row[name] + "x"}) != row_hash(GENESIS, row)
    assert row_hash("1" * 64, row) != row_hash(GENESIS, row)


# --- the CLI ---------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def gateway_env(database_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    migrate_sync(database_url)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "patient-hmac.key").write_bytes(b"k" * 32)  # the same secret as KEYER
    yield {"BRYGGA_DATA_DIR": str(tmp_path), "BRYGGA_DATABASE_URL": database_url}


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    from gateway.cli import app

    result = runner.invoke(app, ["audit", *args], env=env)
    return result.exit_code, " ".join(result.output.split())


def _with_db(url: str, work) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        db = Database(url)
        try:
            await work(db)
        finally:
            await db.close()

    asyncio.run(go())


def test_cli_verify_checkpoint_show_and_their_exit_codes(gateway_env: dict[str, str]) -> None:
    url = gateway_env["BRYGGA_DATABASE_URL"]
    code, out = cli(gateway_env, "verify")
    assert code == 0 and "empty" in out
    _with_db(url, lambda db: append(db, 6))
    code, out = cli(gateway_env, "checkpoint")
    assert code == 0 and "Checkpoint at seq 6" in out
    _with_db(url, lambda db: append(db, 2, start=7))
    code, out = cli(gateway_env, "verify")
    assert code == 0 and "intact: 8 entries" in out and "the last at seq 6" in out
    assert "Not yet covered by a checkpoint: 2 entries (seq 7 to 8)" in out

    pnr = personnummer(3)
    code, out = cli(gateway_env, "show", "--patient", pnr, "--org", AUDITORS)
    assert code == 0 and "1 audit entries" in out and "delivery-3" in out and pnr not in out
    code, out = cli(gateway_env, "show", "--patient", "191212121213", "--org", AUDITORS)
    assert code == 2 and "Luhn" in out and "191212121213" not in out

    async def read_back(db: Database) -> None:
        async with db.read() as conn:
            row = (await conn.execute(select(audit_log).where(audit_log.c.seq == 9))).one()
        assert (row.action, row.role, row.actor_org) == ("audit.read", "auditor", AUDITORS)
        assert row.patient_key == KEYER.key(PNR_SYSTEM, pnr)

    _with_db(url, read_back)
    _with_db(url, lambda db: tamper(db, "UPDATE audit_log SET subject = 'x' WHERE seq = 3"))
    code, out = cli(gateway_env, "verify")
    assert code == 1 and "TAMPERED" in out and "row seq 3 was changed" in out

    # An outside auditor with only the public key; a wrong key makes every checkpoint unknown.
    code, out = cli(gateway_env, "public-key")
    assert code == 0 and "BEGIN PUBLIC KEY" in out
    other = Path(gateway_env["BRYGGA_DATA_DIR"]) / "other.pem"
    other.write_text(AuditSigner(Ed25519PrivateKey.generate()).public_pem())
    code, out = cli(gateway_env, "verify", "--public-key", str(other))
    assert code == 1 and "not a known audit key" in out


def test_cli_show_never_creates_a_patient_key(gateway_env: dict[str, str]) -> None:
    key = Path(gateway_env["BRYGGA_DATA_DIR"]) / "keys" / "patient-hmac.key"
    key.unlink()
    code, out = cli(gateway_env, "show", "--patient", personnummer(1), "--org", HOME_CARE)
    assert code == 2 and "No patient key" in out and not key.exists()
