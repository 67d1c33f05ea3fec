"""Inbound sources (MLLP, files, …) plug in here, found through entry points.

The gateway core never imports an adapter: ``adapters/takecare`` registers itself in the
``brygga.sources`` entry point group (pyproject.toml) and is started by the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from gateway.pipeline.intake import Intake
from gateway.settings import Settings


@dataclass(frozen=True, slots=True)
class SourceContext:
    settings: Settings
    intake: Intake


class Source(Protocol):
    name: str

    async def start(self, ctx: SourceContext) -> None:
        """Start listening; return once ready to accept."""
        ...

    async def stop(self) -> None: ...


def discover() -> list[Source]:
    return [ep.load()() for ep in entry_points(group="brygga.sources")]
