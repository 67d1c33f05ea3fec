"""Run a transaction again when the database gave it up to let another one through.

PostgreSQL aborts one transaction of a deadlock (SQLSTATE 40P01) and, under SERIALIZABLE or
REPEATABLE READ, one of two conflicting ones (40001). Both roll back completely, so the same
work run again from the start is safe: nothing of the first try remains. Attempts are few and
spaced with jitter so that the transactions that met once do not meet again in step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.logs import error_fields, exception_chain
from gateway.store.db import Database, DatabaseUnavailable

log = structlog.get_logger("brygga.store")
T = TypeVar("T")
RETRYABLE = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
ATTEMPTS = 4
BASE_DELAY = 0.05  # seconds; the n-th wait is uniform in [0, BASE_DELAY * 2**n]


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind ``exc`` (SQLAlchemy wraps the driver's error, which may wrap
    asyncpg's), or None if it did not come from PostgreSQL."""
    for err in exception_chain(exc):
        code = getattr(err, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
    return None


# Connection exceptions (class 08) and the server shutting down or starting up (57P01-57P03).
UNAVAILABLE_CLASSES = ("08",)
UNAVAILABLE = frozenset({"57P01", "57P02", "57P03"})


def is_unavailable(exc: BaseException) -> bool:
    """The database could not be reached or went away mid-transaction (a restart, a network
    drop): nothing is wrong with the work itself, so it must wait, not count as a failure."""
    code = sqlstate(exc)
    if code is not None and (code in UNAVAILABLE or code.startswith(UNAVAILABLE_CLASSES)):
        return True
    for err in exception_chain(exc):
        if isinstance(err, DatabaseUnavailable):
            return True
        if getattr(err, "connection_invalidated", False):  # SQLAlchemy saw a disconnect
            return True
        if type(err).__name__ == "ConnectionDoesNotExistError":
            return True  # asyncpg: the connection closed under a query
    return False


def is_retryable(exc: BaseException) -> bool:
    """A deadlock or serialization failure: the transaction was rolled back, try it again."""
    return sqlstate(exc) in RETRYABLE


async def retrying(
    work: Callable[[], Awaitable[T]], attempts: int = ATTEMPTS, base_delay: float = BASE_DELAY
) -> T:
    """``await work()``, again (up to ``attempts`` in all) while it fails retryably.

    ``work`` must run one whole transaction of its own, so that a retry starts from nothing.
    The last failure is raised as it is.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await work()
        except Exception as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            log.info("db.retry", attempt=attempt, **error_fields(exc))
            await asyncio.sleep(random.uniform(0, base_delay * 2**attempt))
    raise AssertionError("unreachable")


async def in_transaction(
    db: Database, work: Callable[[AsyncConnection], Awaitable[T]], attempts: int = ATTEMPTS
) -> T:
    """Run ``work(conn)`` in a transaction of ``db``, retried as :func:`retrying` says."""

    async def once() -> T:
        async with db.transaction() as conn:
            return await work(conn)

    return await retrying(once, attempts)
