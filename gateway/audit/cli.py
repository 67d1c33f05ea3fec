"""``brygga audit``: verify the trail, sign a checkpoint, show one patient's entries.

Registered in the ``brygga.commands`` entry point group. Exit codes: 0 done (``verify``: the
trail is intact), 1 ``verify`` found tampering, 2 the command could not run (no database, no
key, an invalid identity number).
"""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from gateway import audit, logs
from gateway.audit.checkpoints import KEY_FILE, AuditSigner, Checkpoint, write_checkpoint
from gateway.audit.search import entries_for_patient, patient_key_for
from gateway.audit.verify import Report, verify
from gateway.bus.keys import PatientKeyer
from gateway.clock import STOCKHOLM
from gateway.keyfiles import ed25519_public_key
from gateway.model.identifiers import InvalidIdentifier, is_hsa_id
from gateway.settings import Settings
from gateway.store.db import Database

app = typer.Typer(help="The audit trail: verify it, sign a checkpoint, show entries.")
console = Console(soft_wrap=True)  # hashes and findings stay on one line each
MAX_FINDINGS_SHOWN = 50
T = TypeVar("T")


@app.callback()
def audit_group() -> None:
    """The audit trail: verify it, sign a checkpoint, show entries."""


def _local(at: datetime) -> str:
    return at.astimezone(STOCKHOLM).strftime("%Y-%m-%d %H:%M:%S")


def _run(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    logs.configure(settings.log_level)  # JSON on stderr, as the gateway's

    async def go() -> T:
        db = Database(settings.db_url)
        try:
            return await work(db)
        finally:
            await db.close()

    try:
        return asyncio.run(go())
    except SQLAlchemyError as exc:  # never print the SQL: its parameters may hold patient data
        console.print(
            f"Cannot read the audit log ({type(exc).__name__}). Is the database there and "
            "migrated? Run this where the gateway runs, or set BRYGGA_DATA_DIR / "
            "BRYGGA_DATABASE_URL."
        )
        raise typer.Exit(2) from None


def print_report(report: Report) -> None:
    if report.intact:
        if report.rows == 0:
            console.print("The audit trail is empty: nothing to verify.")
            return
        console.print(
            f"Audit trail intact: {report.rows} entries, seq 1 to {report.head_seq}; every row "
            "matches its hash and links to the one before.",
            highlight=False,
        )
        last = report.last_checkpoint
        if last is not None:
            console.print(
                f"Signed checkpoints: {report.checkpoints}, all valid; the last at seq "
                f"{last.seq} ({_local(last.at)} Europe/Stockholm, key {last.key_id}).",
                highlight=False,
            )
        if report.uncovered:
            first = report.head_seq - report.uncovered + 1
            console.print(
                f"Not yet covered by a checkpoint: {report.uncovered} entries (seq {first} to "
                f"{report.head_seq}); the next checkpoint will cover them.",
                highlight=False,
            )
        return
    console.print(
        f"[bold red]AUDIT TRAIL TAMPERED[/]: {len(report.findings)} findings in {report.rows} "
        f"entries (head seq {report.head_seq}).",
        highlight=False,
    )
    for finding in report.findings[:MAX_FINDINGS_SHOWN]:
        console.print(f"  {finding.text}", highlight=False)
    if len(report.findings) > MAX_FINDINGS_SHOWN:
        console.print(f"  … and {len(report.findings) - MAX_FINDINGS_SHOWN} more", highlight=False)
    console.print(
        "Keep the database as it is (take a copy) and follow docs/operations.md, "
        "'The audit trail: verify it, and what to do when it fails'."
    )


@app.command("verify")
def verify_command(
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="PEM public (or private) key that signed checkpoints; repeatable. "
            f"Default: keys/{KEY_FILE} in the data directory."
        ),
    ] = None,
) -> None:
    """Recompute the hash chain from seq 1 and check every checkpoint. Exit 1 if tampered."""
    settings = Settings()
    keys: list[Ed25519PublicKey] = []
    try:
        keys = [ed25519_public_key(p) for p in public_key or []]
        if not public_key and (settings.keys_dir / KEY_FILE).exists():
            keys.append(AuditSigner.from_dir(settings.keys_dir, create=False).public_key)
    except (OSError, ValueError) as exc:
        console.print(f"Cannot read the audit key: {exc}")
        raise typer.Exit(2) from None
    report = _run(settings, lambda db: verify(db, keys))
    if not keys and report.checkpoints:
        console.print(
            f"No audit key at {settings.keys_dir / KEY_FILE}, so the checkpoints cannot be "
            "checked: run this where the gateway runs, or pass --public-key."
        )
        raise typer.Exit(2)
    print_report(report)
    if not report.intact:
        raise typer.Exit(1)


def print_checkpoint(cp: Checkpoint) -> None:
    console.print(
        f"Checkpoint at seq {cp.seq}, {_local(cp.at)} Europe/Stockholm\n"
        f"  head       {cp.head_hash}\n  key id     {cp.key_id}\n  signature  {cp.signature}",
        highlight=False,
    )


@app.command("checkpoint")
def checkpoint_command() -> None:
    """Sign a checkpoint of the chain's head now (the gateway also does this by itself)."""
    settings = Settings()
    signer = AuditSigner.from_dir(settings.keys_dir)
    cp = _run(settings, lambda db: write_checkpoint(db, signer))
    if cp is None:
        console.print("Nothing new to sign: the last checkpoint covers the head (or it is empty).")
        return
    print_checkpoint(cp)
    console.print("Keep a copy of these lines outside the database: they prove this head.")


@app.command("public-key")
def public_key_command() -> None:
    """Print the public key that verifies the checkpoints (give it to outside auditors)."""
    try:
        signer = AuditSigner.from_dir(Settings().keys_dir, create=False)
    except FileNotFoundError as exc:
        console.print(f"{exc}: the gateway creates it when it signs its first checkpoint.")
        raise typer.Exit(2) from None
    print(signer.public_pem(), end="")
    console.print(f"key id {signer.key_id}", highlight=False)


@app.command("show")
def show_command(
    patient: Annotated[
        str,
        typer.Option(
            prompt="Personnummer or samordningsnummer",
            help="The patient (12 digits). Leave it out to be asked, so that it stays out of "
            "the shell history.",
        ),
    ],
    org: Annotated[str, typer.Option(help="Your organisation's HSA-id (recorded).")],
    name: Annotated[str, typer.Option(help="Your name (recorded); default: the OS user.")] = "",
    purpose: Annotated[str, typer.Option(help="Why you look (recorded).")] = audit.PURPOSE_AUDIT,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 1000,
) -> None:
    """Every audit entry about one patient. This lookup is itself recorded in the trail."""
    settings = Settings()
    if not is_hsa_id(org):
        raise typer.BadParameter("--org must be an HSA-id, e.g. SE2321000016-AUD1")
    key_file = settings.keys_dir / "patient-hmac.key"
    if not key_file.exists():
        console.print(f"No patient key at {key_file}: run this where the gateway runs.")
        raise typer.Exit(2)
    try:
        patient_key = patient_key_for(PatientKeyer.from_file(key_file), patient)
        entry = audit.AuditEntry(
            actor=name or getpass.getuser(),
            actor_org=org,
            role="auditor",
            action="audit.read",
            purpose=purpose,
            patient_key=patient_key,
            detail="brygga audit show",
        )
    except (InvalidIdentifier, ValueError) as exc:
        console.print(str(exc))
        raise typer.Exit(2) from None

    async def read(db: Database) -> list[dict[str, Any]]:
        async with db.transaction() as conn:
            found = await entries_for_patient(conn, patient_key, limit + 1)
            await audit.record(conn, entry)
        return found

    entries = _run(settings, read)
    more = f"the first {limit} of more: raise --limit" if len(entries) > limit else "all"
    entries = entries[:limit]
    console.print(
        f"{len(entries)} audit entries for patient key {patient_key}, oldest first ({more}); "
        "this lookup was recorded.",
        highlight=False,
    )
    for e in entries:
        detail = f" ({e['detail']})" if e["detail"] else ""
        console.print(
            f"seq {e['seq']:<8} {_local(datetime.fromisoformat(e['at']))}  {e['action']}  "
            f"purpose {e['purpose']}  {e['outcome']}{detail}\n"
            f"{'':13}by {e['actor']} ({e['role']}, {e['actor_org'] or 'the gateway'})"
            + (f"  subject {e['subject']}" if e["subject"] else ""),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
