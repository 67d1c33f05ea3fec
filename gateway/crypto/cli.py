"""``brygga keys``: data keys and the key-encryption key, while the gateway runs.

Registered in the ``brygga.commands`` entry point group (pyproject.toml) as ``keys``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from gateway.crypto import columns, kek, maintenance
from gateway.crypto.keyring import Keyring
from gateway.settings import Settings
from gateway.store.db import Database, migrate

app = typer.Typer(help="Encryption keys: rotate, re-encrypt, show.", no_args_is_help=True)
console = Console()
T = TypeVar("T")


def _run(work: Callable[[Settings, Database], Awaitable[T]]) -> T:
    settings = Settings()

    async def go() -> T:
        await migrate(settings.db_url)
        db = Database(settings.db_url)
        try:
            return await work(settings, db)
        finally:
            await db.close()

    try:
        return asyncio.run(go())
    except (FileNotFoundError, ValueError, kek.KeyUnavailable) as exc:
        console.print(str(exc), highlight=False)
        raise typer.Exit(2) from None
    except (SQLAlchemyError, OSError) as exc:  # never print SQL parameters
        console.print(
            f"Cannot reach the database ({type(exc).__name__}). Run this where the gateway "
            "runs, or set BRYGGA_DATA_DIR / BRYGGA_DATABASE_URL."
        )
        raise typer.Exit(2) from None


def _provider(settings: Settings) -> kek.KekProvider:
    return kek.from_settings(settings, create=False)


@app.command()
def rotate(
    new_kek: Annotated[
        bool,
        typer.Option(
            "--kek",
            help="Rotate the key-encryption key instead: a new KEK in the key file (or, with "
            "BRYGGA_KEK or a KMS, the one configured first), every data key re-wrapped.",
        ),
    ] = False,
) -> None:
    """Start encrypting with a new data key; older keys stay readable. No restart needed."""

    async def dek(settings: Settings, db: Database) -> None:
        new_id, retired = await maintenance.rotate_data_key(db, _provider(settings))
        console.print(
            f"New active data key {new_id}"
            + (f"; retired {', '.join(retired)}" if retired else "")
            + f". Running processes use it within {settings.key_cache_seconds:g} s.",
            highlight=False,
        )

    async def kek_rotation(settings: Settings, db: Database) -> None:
        provider = _provider(settings)
        if (
            isinstance(provider, kek.LocalKek)
            and provider.path is not None
            and len(provider.key_ids) == 1
        ):
            done = await maintenance.rotate_local_kek(db, provider)
            console.print(
                f"New key-encryption key {done.new_id} in {provider.path}; {done.rewrapped} "
                f"data keys re-wrapped under it. The old KEK ({', '.join(done.old_ids)}) is no "
                "longer needed by this database, only by backups taken before now. Back up the "
                "new key file now, apart from the database backups.",
                highlight=False,
            )
            return
        # The operator staged the new KEK (first) beside the old one, or a KMS rotated it.
        count = await maintenance.rewrap_data_keys(db, provider)
        if count:
            console.print(
                f"{count} data keys re-wrapped under {provider.key_id}. The other KEKs "
                "configured are no longer needed by this database: remove them from "
                "BRYGGA_KEK or the key file at the next restart.",
                highlight=False,
            )
        else:
            console.print(
                f"Every data key is already wrapped under {provider.key_id}. To rotate, "
                "configure the new KEK first and the current one after it (BRYGGA_KEK=new,old "
                "or two lines in the key file), restart the processes, then run this again.",
                highlight=False,
            )

    _run(kek_rotation if new_kek else dek)


@app.command()
def reencrypt(
    batch: Annotated[int, typer.Option(help="Rows per transaction.")] = maintenance.REENCRYPT_BATCH,
) -> None:
    """Re-encrypt every value under the active data key (and rows stored before encryption).

    Runs beside the gateway, in short transactions; safe to stop and run again.
    """

    async def work(settings: Settings, db: Database) -> dict[str, int]:
        keyring = Keyring(db, _provider(settings), allow_plaintext=True)
        await keyring.refresh(strict=True)
        columns.install(keyring)

        def progress(column: str, count: int) -> None:
            console.print(f"  {column}: {count}", highlight=False)

        try:
            return await maintenance.reencrypt(db, keyring, batch=batch, on_batch=progress)
        finally:
            columns.install(None)

    done = _run(work)
    for column, count in done.items():
        console.print(f"{column}: {count} values re-encrypted", highlight=False)


@app.command()
def show() -> None:
    """List the data keys (ids, states, which KEK wraps each); never key material."""

    async def work(settings: Settings, db: Database) -> tuple[str, list[dict[str, Any]]]:
        return _provider(settings).key_id, await maintenance.key_table(db)

    current, rows = _run(work)
    lines = [f"Current key-encryption key: {current}"]
    for r in rows:
        line = (
            f"{r['id']}  {r['state']:<7}  wrapped by {r['kek_id']}  "
            f"created {r['created_at'].isoformat(timespec='seconds')}"
        )
        if r["retired_at"]:
            line += f"  retired {r['retired_at'].isoformat(timespec='seconds')}"
        lines.append(line)
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
