"""Structured JSON logs, with patient data kept out.

Log calls name ids, states and error *classes*, never values. As a second line of defence a
processor masks anything shaped like an identity number in every field, and exceptions are
logged as class name and location only: an exception's text (a database error quotes its
parameters) may hold patient data. A database error adds what the server said, cut down to
what holds none: its SQLSTATE, the constraint and table it names, and its primary message with
every quoted value but the schema's own names masked. Never its DETAIL line, which quotes rows
(``Key (x)=(19121212-1212) already exists``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import orjson
import structlog

# Shaped like an identity number and standing alone: a run of digits inside a longer token (a
# hex key id such as "local-ef427216465626f6", an HSA-id "SE2321000016-...") is not one.
_IDENTITY_NUMBER = re.compile(r"(?<![0-9A-Za-z])(\d{6}|\d{8})[-+]?\d{4}(?![0-9A-Za-z])")


def redact_identity_numbers(text: str) -> str:
    """``text`` with everything shaped like a personnummer replaced by ``<redacted>``."""
    return _IDENTITY_NUMBER.sub("<redacted>", text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_identity_numbers(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    exc = event_dict.pop("exc_info", None)
    if exc:
        err = exc if isinstance(exc, BaseException) else sys.exc_info()[1]
        if err is not None:
            event_dict.update(error_fields(err))
    return {k: _redact(v) for k, v in event_dict.items()}


def error_fields(exc: BaseException) -> dict[str, str]:
    """Describe an exception without its text: class, cause class, and where it was raised;
    for a database error also :func:`database_fields`."""
    fields = {"error": type(exc).__name__}
    cause = exc.__cause__ or getattr(exc, "orig", None)
    if cause is not None:
        fields["cause"] = type(cause).__name__
    fields.update(database_fields(exc))
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        frame = tb[-1]
        fields["at"] = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
    return fields


# A quoted token in a server message: an identifier ("deliveries") or a value ("Tolvan").
_QUOTED = re.compile(r'"([^"]*)"')


@functools.cache
def _schema_names() -> frozenset[str]:
    from gateway.store.tables import metadata  # late: the store imports this module's users

    names = set()
    for table in metadata.tables.values():
        names.add(table.name)
        names.update(c.name for c in table.columns)
        names.update(str(c.name) for c in table.constraints if c.name)
        names.update(str(i.name) for i in table.indexes if i.name)
    return frozenset(names)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything behind it: SQLAlchemy's ``orig``, causes and contexts."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        stack += [err.__context__, err.__cause__, getattr(err, "orig", None)]


def _server_error(exc: BaseException) -> Any:
    """asyncpg's own error behind ``exc`` (message, constraint_name, table_name), if any."""
    for err in exception_chain(exc):
        if getattr(err, "sqlstate", None) and getattr(err, "message", None) is not None:
            return err
    return None


def database_fields(exc: BaseException) -> dict[str, str]:
    """What PostgreSQL said about ``exc``, without patient data (see the module docstring)."""
    err = _server_error(exc)
    if err is None:
        return {}
    names = _schema_names()
    message = _QUOTED.sub(
        lambda m: m.group(0) if m.group(1) in names else '"?"', str(getattr(err, "message", ""))
    )
    fields = {"sqlstate": str(err.sqlstate), "db_message": redact_identity_numbers(message)}
    for attr, name in (("constraint_name", "constraint"), ("table_name", "table")):
        value = getattr(err, attr, None)
        if value:
            fields[name] = value if value in names else "?"
    return fields


def flush() -> None:
    """Flush the log handlers (before an immediate exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


class _LineLogger:
    """structlog's output end: one rendered JSON line to stderr, looked up at each write (so a
    test that captures stderr sees it). ``name`` is what ``add_logger_name`` reports."""

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _logger(*args: Any) -> _LineLogger:
    return _LineLogger(str(args[0]) if args else "brygga")


def _dumps(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, default=kw.get("default")).decode()


def configure(level: str = "info") -> None:
    """One JSON stream on stderr for structlog and the standard library (uvicorn, aiokafka).

    structlog's own loggers render directly (no trip through ``logging``: a log line costs
    about a fifth as much on the accept path); the standard library's go through a handler
    with the same processors.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer(serializer=_dumps)],
        logger_factory=_logger,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
