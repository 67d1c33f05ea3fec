"""Small SQL helpers that differ by dialect."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crypto.columns import seal_row


async def insert_ignore(conn: AsyncConnection, table: Table, values: dict[str, Any]) -> bool:
    """INSERT that does nothing on a unique conflict. True if the row was inserted.

    Used for idempotency keys: a conflict must not abort a PostgreSQL transaction. Encrypted
    columns are sealed for the row ``values["id"]``.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).values(**seal_row(table, values)).on_conflict_do_nothing()
    result = await conn.execute(stmt)
    return bool(result.rowcount)


async def lock_rows(conn: AsyncConnection, table: Table, ids: Iterable[Any]) -> None:
    """Lock ``table``'s rows ``ids`` for this transaction, in primary-key order.

    The one order of row locks (see docs/architecture.md, "Locks"): two transactions that
    lock some of the same rows take them in the same order, so one waits for the other
    instead of both waiting for each other. SQLite: nothing to do (one writer at a time).
    """
    wanted = sorted(set(ids))
    if not wanted or conn.dialect.name != "postgresql":
        return
    await conn.execute(
        select(table.c.id).where(table.c.id.in_(wanted)).order_by(table.c.id).with_for_update()
    )
