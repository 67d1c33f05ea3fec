"""The one place the gateway reads the time from, so tests and deadline previews can set it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

STOCKHOLM = ZoneInfo("Europe/Stockholm")  # the users' time: every clock and page shows it


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


clock: Clock = SystemClock()


def now() -> datetime:
    """Aware UTC now, from the injectable clock."""
    return clock.now()
