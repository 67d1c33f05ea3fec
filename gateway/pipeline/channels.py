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

from gateway.pipeline.ledger import State


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a channel reached: DELIVERED (the transport took it) or RECEIVED (the recipient's
    application accepted it: a FHIR MessageHeader.response ``ok``, an HL7 AA), with a note
    for people."""

    state: State
    detail: str = ""


class ChannelUnavailable(Exception):
    """The recipient could not be reached or did not answer: worth resending later.

    The message is shown to operations staff: never patient data in it.
    """


class ChannelRejected(Exception):
    """The recipient's system refused this message (an HL7 AE, a FHIR ``fatal-error``):
    resending the same message will not help; the next channel in the list is tried."""


@dataclass(frozen=True, slots=True)
class DeliveryContext:
    delivery_id: str
    message_id: str
    recipient_hsa_id: str
    bundle: dict[str, Any]
    address: str = ""  # the recipient's endpoint for this channel (URL, host:port, number)
    attempt: int = 1  # 1 for the first send on this channel, 2 and 3 for resends
    # The same for every send of this delivery, on every channel: the receiver's dedup key
    # (the FHIR Bundle.id and MessageHeader.id, the HL7 MSH-10).
    dedup_key: str = ""


class Channel(Protocol):
    name: str
    # May this channel carry notices about a patient with protected identity (skyddad
    # folkbokföring, sekretessmarkering)? Never a channel that shows an address on paper.
    protected_identity: bool
    # Does the recipient's system answer with an application receipt? If so, a delivery
    # left at DELIVERED is resent after a while, then falls back to the next channel.
    application_receipts: bool

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        """Hand the message to the recipient.

        Raise :class:`ChannelUnavailable` for a failure worth resending later, and
        :class:`ChannelRejected` when the recipient refused the message itself.
        """
        ...


class InboxChannel:
    """The provider inbox: delivering means making the notice visible to the recipient's staff.

    Reading and acknowledging are recorded by the inbox API when a person does them.
    """

    name = "inbox"
    protected_identity = True  # behind login; lists hide the name
    application_receipts = False  # the next receipt is a person reading it

    async def deliver(self, ctx: DeliveryContext) -> Outcome:
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
