"""Topics and the event envelope every topic carries.

Payloads carry identifiers and states only, never patient data: a consumer reads what it
needs from the system of record by id. Schemas are documented in docs/architecture.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EVENTS = "brygga.events"
DELIVERIES = "brygga.deliveries"
RECEIPTS = "brygga.receipts"
DEADLETTER = "brygga.deadletter"
ALL_TOPICS = (EVENTS, DELIVERIES, RECEIPTS, DEADLETTER)


@dataclass(frozen=True, slots=True)
class Event:
    """One record on a topic.

    ``id`` is stable for the fact it announces (e.g. ``message.accepted:<message id>``), so a
    republished event is recognised by the consumers that already handled it.
    """

    id: str
    type: str
    message_id: str
    delivery_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        obj = json.loads(raw)
        return cls(
            id=obj["id"],
            type=obj["type"],
            message_id=obj["message_id"],
            delivery_id=obj.get("delivery_id"),
            data=obj.get("data") or {},
        )
