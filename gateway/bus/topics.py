"""Topics and the event envelope every topic carries.

Payloads carry identifiers and states only, never patient data: a consumer reads what it
needs from the system of record by id (decision 0001). On the wire a record's value is the
event JSON sealed with the gateway's data keys, bound to the record's topic and key
(:func:`seal_record`, :func:`open_record`; decision 0007), so the broker holds no plaintext.
Schemas are documented in docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from gateway.crypto.columns import FieldCipher
from gateway.crypto.envelope import record_context

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
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        obj = orjson.loads(raw)
        return cls(
            id=obj["id"],
            type=obj["type"],
            message_id=obj["message_id"],
            delivery_id=obj.get("delivery_id"),
            data=obj.get("data") or {},
        )


def seal_record(cipher: FieldCipher, topic: str, key: str, payload: str) -> bytes:
    """The Kafka record value of an event's JSON (as the outbox holds it)."""
    return cipher.seal(payload.encode(), record_context(topic, key))


async def open_record(cipher: FieldCipher, topic: str, key: bytes | None, value: bytes) -> Event:
    """The event in a record value; :class:`~gateway.crypto.envelope.DecryptionError` if it is
    not sealed for this topic and key (plaintext is refused)."""
    await cipher.prepare(value)
    return Event.from_json(cipher.open(value, record_context(topic, key)))
