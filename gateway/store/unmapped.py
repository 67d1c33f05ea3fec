"""Unit codes a sender used that are neither HSA-ids nor mapped: the message was accepted,
and the integration team sees the code here (``GET /api/v1/ops/unmapped-codes``) to map it
in ``mappings/``. A code is a unit's, never a patient's: it may be logged and listed."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.sql import insert_ignore
from gateway.store.tables import unmapped_codes

log = structlog.get_logger("brygga.unmapped")


async def record(
    conn: AsyncConnection, sender: str, found: Iterable[tuple[str, str]], now: datetime
) -> list[tuple[str, str]]:
    """Count each (field, code) once more for ``sender``; returns the ones seen first now.

    One log line per newly seen code, so it also reaches whoever reads the logs only."""
    new: list[tuple[str, str]] = []
    table = unmapped_codes.c
    for field, code in dict.fromkeys(found):  # a code twice in one message counts once
        key = {"sender": sender[:200], "field": field, "code": code[:200]}
        row = key | {"first_seen": now, "last_seen": now, "times_seen": 1}
        if await insert_ignore(conn, unmapped_codes, row):
            new.append((field, code))
            log.warning("unmapped_code.first_seen", **key)
            continue
        await conn.execute(
            update(unmapped_codes)
            .where(table.sender == key["sender"], table.field == field, table.code == key["code"])
            .values(last_seen=now, times_seen=table.times_seen + 1)
        )
    return new


async def listing(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every unmapped code, the most recently used first."""
    c = unmapped_codes.c
    rows = await conn.execute(
        select(unmapped_codes).order_by(c.last_seen.desc(), c.sender, c.field, c.code)
    )
    return [
        {
            "sender": r.sender,
            "field": r.field,
            "code": r.code,
            "first_seen": r.first_seen.isoformat(),
            "last_seen": r.last_seen.isoformat(),
            "count": r.times_seen,
        }
        for r in rows
    ]
