"""The one interface every delivery channel implements, and the registry that finds them.

The gateway ships the web inbox; other channels (FHIR, HL7 v2, Vodok, fax, letter) live in
``adapters/`` and register through the ``brygga.channels`` entry point group, so the core
never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.pipeline.ledger import State


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a channel reached: usually DELIVERED (transport receipt), with a note for people."""

    state: State
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    delivery_id: str
    message_id: str
    recipient_hsa_id: str
    bundle: dict[str, Any]


class Channel(Protocol):
    name: str
    # May this channel carry notices about a patient with protected identity (skyddad
    # folkbokföring, sekretessmarkering)? Never a channel that shows an address on paper.
    protected_identity: bool

    async def deliver(self, conn: AsyncConnection, ctx: DeliveryContext) -> Outcome:
        """Hand the message to the recipient. Raise on a failure worth retrying."""
        ...


class InboxChannel:
    """The provider inbox: delivering means making the notice visible to the recipient's staff.

    Reading and acknowledging are recorded by the inbox API when a person does them.
    """

    name = "inbox"
    protected_identity = True  # behind login; lists hide the name

    async def deliver(self, conn: AsyncConnection, ctx: DeliveryContext) -> Outcome:
        return Outcome(State.DELIVERED, "Tillgängligt i webbinkorgen")


class ChannelRegistry:
    def __init__(self, channels: Iterable[Channel]) -> None:
        self._channels = {c.name: c for c in channels}

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def best(self, preferences: Iterable[str], protected_identity: bool = False) -> str | None:
        """The first channel in the recipient's order of preference that is available here
        (and, for a patient with protected identity, approved for it)."""
        return next(
            (
                p
                for p in preferences
                if p in self._channels
                and (not protected_identity or self._channels[p].protected_identity)
            ),
            None,
        )

    @classmethod
    def discover(cls) -> ChannelRegistry:
        found: list[Channel] = [InboxChannel()]
        for ep in entry_points(group="brygga.channels"):
            found.append(ep.load()())
        return cls(found)
