"""Key operations behind ``brygga keys``: rotate data keys, rotate the KEK, re-encrypt rows.

Each runs while the gateway runs. Key changes take the keys lock
(:func:`~gateway.crypto.keyring.lock_keys`), so two operations never interleave; the
running processes pick the changes up by themselves (see :mod:`gateway.crypto.keyring`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, not_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway import clock
from gateway.crypto.columns import encrypted_columns, starts_with
from gateway.crypto.envelope import key_prefix
from gateway.crypto.kek import KekProvider, LocalKek, new_key, parse_keys, write_key_file
from gateway.crypto.keyring import ACTIVE, RETIRED, Keyring, insert_key, key_rows, lock_keys
from gateway.store.db import Database
from gateway.store.tables import data_keys, metadata

REENCRYPT_BATCH = 200


async def rotate_data_key(db: Database, kek: KekProvider) -> tuple[str, list[str]]:
    """A new active data key; the active ones become retired. Returns (new id, retired ids)."""
    async with db.transaction() as conn:
        await lock_keys(conn)
        retired = list(
            (
                await conn.execute(
                    data_keys.update()
                    .where(data_keys.c.state == ACTIVE)
                    .values(state=RETIRED, retired_at=clock.now())
                    .returning(data_keys.c.id)
                )
            ).scalars()
        )
        dek_id = await insert_key(conn, kek)
    return dek_id, retired


async def _rewrap(conn: AsyncConnection, kek: KekProvider) -> int:
    rows = [r for r in await key_rows(conn) if r.kek_id != kek.key_id]
    for row in rows:
        dek = await asyncio.to_thread(kek.unwrap, row.wrapped_key, row.id, row.kek_id)
        wrapped = await asyncio.to_thread(kek.wrap, dek, row.id)
        await conn.execute(
            data_keys.update()
            .where(data_keys.c.id == row.id)
            .values(wrapped_key=wrapped, kek_id=kek.key_id)
        )
    return len(rows)


async def rewrap_data_keys(db: Database, kek: KekProvider) -> int:
    """Wrap every data key under the provider's current KEK. Returns how many changed.

    For ``BRYGGA_KEK`` and KMS providers: the new KEK is configured first (with the old one
    still readable), then this moves every data key to it.
    """
    async with db.transaction() as conn:
        await lock_keys(conn)
        kek.reload()
        return await _rewrap(conn, kek)


@dataclass(frozen=True, slots=True)
class KekRotation:
    old_ids: list[str]
    new_id: str
    rewrapped: int


async def rotate_local_kek(db: Database, kek: LocalKek) -> KekRotation:
    """A new KEK in the key file, every data key re-wrapped under it, the old KEK dropped.

    Safe to interrupt at any point: the file holds the new KEK first and the old ones after
    it until every data key is re-wrapped (one transaction), and only then the new one alone.
    Processes sharing the file re-read it when they meet a KEK id they do not have.
    """
    path = kek.path
    if path is None:
        raise ValueError("this KEK is not from a file")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(
            f"cannot write {path} (mounted read-only?): put a new KEK as the first line of the "
            "key file yourself, keep the current one after it, restart, and run this again"
        )
    async with db.transaction() as conn:
        await lock_keys(conn)
        old = parse_keys(path.read_text())
        old_ids = LocalKek(old).key_ids
        fresh = new_key()
        write_key_file(path, [fresh, *old])
        kek.reload()
        count = await _rewrap(conn, kek)
    write_key_file(path, [fresh])
    kek.reload()
    return KekRotation(old_ids, kek.key_id, count)


async def reencrypt(
    db: Database,
    keyring: Keyring,
    *,
    batch: int = REENCRYPT_BATCH,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Seal every encrypted value not under the active data key again, under it.

    Rows stored before encryption are sealed too. Works in batches of ``batch`` rows, one
    short transaction each, in id order, so it can run beside the gateway and be stopped
    and started again. Returns the number of values re-encrypted per ``table.column``.
    """
    await keyring.refresh()
    done: dict[str, int] = {}
    for table in metadata.sorted_tables:
        for name in encrypted_columns(table):
            done[f"{table.name}.{name}"] = await _reencrypt_column(
                db, keyring, table, name, batch, on_batch
            )
    return done


async def _reencrypt_column(
    db: Database,
    keyring: Keyring,
    table: Table,
    name: str,
    batch: int,
    on_batch: Callable[[str, int], None] | None,
) -> int:
    column = table.c[name]
    update = (
        table.update().where(table.c.id == bindparam("_id")).values({name: bindparam("_value")})
    )
    count, last = 0, ""
    while True:
        assert keyring.active_key_id
        prefix = key_prefix(keyring.active_key_id)
        async with db.transaction() as conn:
            rows = (
                await conn.execute(
                    select(table.c.id, column)
                    .where(
                        table.c.id > last, column.is_not(None), not_(starts_with(column, prefix))
                    )
                    .order_by(table.c.id)
                    .limit(batch)
                )
            ).all()
            if rows:
                await conn.execute(
                    update,
                    [{"_id": r.id, "_value": column.type.seal(r.id, r[1])} for r in rows],
                )
        if not rows:
            return count
        count += len(rows)
        last = rows[-1].id
        if on_batch:
            on_batch(f"{table.name}.{name}", count)


async def key_table(db: Database) -> list[dict[str, Any]]:
    """Every data key (no key material), oldest first."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(
                data_keys.c.id,
                data_keys.c.state,
                data_keys.c.kek_id,
                data_keys.c.created_at,
                data_keys.c.retired_at,
            ).order_by(data_keys.c.created_at, data_keys.c.id)
        )
        return [dict(r._mapping) for r in rows]
