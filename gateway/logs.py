"""Structured JSON logs, with patient data kept out.

Log calls name ids, states and error *classes*, never values. As a second line of defence a
processor masks anything shaped like an identity number in every field, and exceptions are
logged as class name and location only: an exception's text (a database error quotes its
parameters) may hold patient data.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

import structlog

_IDENTITY_NUMBER = re.compile(r"(?<!\d)(\d{6}|\d{8})[-+]?\d{4}(?!\d)")


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return _IDENTITY_NUMBER.sub("<redacted>", value)
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
    """Describe an exception without its text: class, cause class, and where it was raised."""
    fields = {"error": type(exc).__name__}
    cause = exc.__cause__ or getattr(exc, "orig", None)
    if cause is not None:
        fields["cause"] = type(cause).__name__
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        frame = tb[-1]
        fields["at"] = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
    return fields


def flush() -> None:
    """Flush the log handlers (before an immediate exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(level: str = "info") -> None:
    """Route structlog and the standard library (uvicorn, aiokafka) into one JSON stream."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
