"""Stages contributed by adapters (e.g. receipts back to a source), found by entry points.

An adapter names its stage in the ``brygga.stages`` entry point group; ``brygga run``
starts it with the core stages and ``brygga worker --stages NAME`` starts it alone.
"""

from __future__ import annotations

from collections.abc import Coroutine
from importlib.metadata import entry_points
from typing import Any, Protocol

from gateway.pipeline.stage import Stage
from gateway.settings import Settings
from gateway.store.db import Database


class StagePlugin(Protocol):
    name: str

    def enabled(self, settings: Settings) -> bool:
        """False when it is not configured; the runtime then skips it (and says so)."""
        ...

    def stage(self, db: Database) -> Stage | None:
        """The Kafka consumer part, if any."""
        ...

    def background(self, db: Database) -> Coroutine[Any, Any, None] | None:
        """A loop of its own (a sender with retries), if any."""
        ...


def discover() -> dict[str, StagePlugin]:
    return {ep.name: ep.load()() for ep in entry_points(group="brygga.stages")}
