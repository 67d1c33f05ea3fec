"""Alembic environment: async engines for both PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from gateway.store.db import MIGRATION_LOCK, make_engine
from gateway.store.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Processes starting together on an empty database migrate one at a time.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = make_engine(config.attributes["database_url"])
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():  # pragma: no cover - SQL script generation
    context.configure(url=config.attributes["database_url"], target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_main())
