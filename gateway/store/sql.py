"""Small SQL helpers that differ by dialect."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
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
