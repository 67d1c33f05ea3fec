"""Tables of the system of record. The same schema runs on PostgreSQL and SQLite.

Columns that hold patient data (names, identity numbers, addresses, the messages
themselves) have an encrypted type (:mod:`gateway.crypto.columns`): they store AES-GCM
ciphertext bound to their row, and read back as plaintext in a process with a keyring.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

from gateway.crypto.columns import EncryptedBytes, EncryptedText


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite drops the zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use gateway.clock.now()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite autoincrements only INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _republish_columns() -> list[Column[Any]]:
    """The reconciler's memory (gateway/pipeline/reconciler.py): when it last republished the
    row's next event, and until when that event counts as in flight."""
    return [
        Column("republished_at", UtcDateTime, nullable=True, comment="reconciler: last time"),
        Column("republish_after", UtcDateTime, nullable=True, comment="reconciler: in flight"),
    ]


messages = Table(
    "messages",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("source", String(200), nullable=False, comment="sending application|facility"),
    Column("control_id", String(200), nullable=False, comment="MSH-10 or Bundle id"),
    Column("event", String(40), nullable=False),
    Column("patient_key", String(64), nullable=False, comment="HMAC of the patient identity"),
    Column("episode_key", String(64), nullable=True, comment="HMAC of sender and visit number"),
    Column("raw", EncryptedBytes("messages.raw"), nullable=False, comment="encrypted"),
    Column(
        "canonical",
        EncryptedText("messages.canonical"),
        nullable=False,
        comment="FHIR message Bundle, JSON; encrypted, base64",
    ),
    Column("ack", LargeBinary, nullable=True, comment="the answer given; replayed for duplicates"),
    Column("status", String(20), nullable=False),
    Column("consent_decision", String(10), nullable=True),
    Column("consent_reason", String(200), nullable=True),
    Column("occurred_at", UtcDateTime, nullable=True, comment="when the event happened (routing)"),
    Column("received_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    *_republish_columns(),
    UniqueConstraint("source", "control_id"),
    Index(None, "status", "updated_at"),
    Index(None, "patient_key"),
    Index(None, "episode_key", "event"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("message_id", String(36), ForeignKey("messages.id"), nullable=False),
    Column("recipient_hsa_id", String(64), nullable=False),
    Column("recipient_name", String(200), nullable=False),
    Column("role", String(40), nullable=False, comment="why this party receives it"),
    Column("for_information", Boolean, nullable=False, default=False),
    Column("channel", String(20), nullable=True),
    Column("state", String(20), nullable=False),
    Column("detail", String(500), nullable=True),
    Column("superseded_by", String(36), nullable=True, comment="message id of a newer version"),
    Column("retracted_by", String(36), nullable=True, comment="message id of the cancellation"),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    # Follow-up (gateway/pipeline/followup.py): resends, fallback, deadlines, escalation.
    Column("municipality", String(20), nullable=True, comment="the recipient's, for statistics"),
    Column("district", String(60), nullable=True, comment="the recipient's city district"),
    Column("attempts", Integer, nullable=False, default=0, comment="sends on this channel"),
    Column("next_check_at", UtcDateTime, nullable=True, comment="when follow-up looks next"),
    Column("due_rule", String(40), nullable=True, comment="the LUS clock for its receipt"),
    Column("due_at", UtcDateTime, nullable=True, comment="when the receipt is due"),
    Column("escalation_level", Integer, nullable=False, default=0),
    Column("escalated_from", String(36), nullable=True, comment="the delivery it escalates"),
    Column("withheld", String(200), nullable=True, comment="contents not for this recipient"),
    *_republish_columns(),
    UniqueConstraint("message_id", "recipient_hsa_id"),
    Index(None, "recipient_hsa_id", "channel", "state"),
    Index(None, "state", "updated_at"),
    Index(None, "next_check_at"),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("delivery_id", String(36), ForeignKey("deliveries.id"), nullable=False),
    Column("channel", String(20), nullable=False),
    Column("attempt", Integer, nullable=False, comment="1, then 2 and 3 for resends"),
    Column("at", UtcDateTime, nullable=False),
    Column(
        "outcome",
        String(20),
        nullable=False,
        comment="delivered, received, unavailable, rejected, fallback, escalated",
    ),
    Column("detail", String(500), nullable=True, comment="for people; never patient data"),
    Index(None, "delivery_id", "id"),
)

# Deviations (avvikelser) the gateway raises itself: FHIR DetectedIssue, tracked until answered.
deviations = Table(
    "deviations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("message_id", String(36), ForeignKey("messages.id"), nullable=False),
    Column("delivery_id", String(36), ForeignKey("deliveries.id"), nullable=True),
    Column("patient_key", String(64), nullable=False, comment="HMAC pseudonym"),
    Column("kind", String(40), nullable=False, comment="missed-receipt, held-past-deadline, …"),
    Column("responsible_hsa_id", String(64), nullable=False, comment="whose inbox it is in"),
    Column("municipality", String(20), nullable=True),
    Column("district", String(60), nullable=True),
    Column("status", String(20), nullable=False, comment="open or answered"),
    Column("raised_at", UtcDateTime, nullable=False),
    Column("answered_at", UtcDateTime, nullable=True),
    Column("answered_by", String(200), nullable=True),
    Column("answer", EncryptedText("deviations.answer"), nullable=True, comment="encrypted"),
    Column("summary", String(500), nullable=False, comment="what went wrong; no patient data"),
    UniqueConstraint("delivery_id", "kind"),
    Index(None, "responsible_hsa_id", "status"),
)

# The routine's own clocks, run on the messages themselves (decision 0019): one per stay and
# rule, started by one message and stopped by another; a clock past its due time is a
# deviation to the party responsible.
lus_clocks = Table(
    "lus_clocks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("episode_key", String(64), nullable=False, comment="HMAC of sender and visit number"),
    Column("patient_key", String(64), nullable=False, comment="HMAC pseudonym"),
    Column("rule", String(40), nullable=False, comment="mappings/deadlines rule name"),
    Column("started_by", String(36), ForeignKey("messages.id"), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("due_at", UtcDateTime, nullable=False),
    Column("stopped_by", String(36), nullable=True, comment="message id that stopped it"),
    Column("stopped_at", UtcDateTime, nullable=True),
    Column("status", String(20), nullable=False, comment="running, met, late, cancelled"),
    Column("responsible_hsa_id", String(64), nullable=False, comment="who owes the step"),
    Column("municipality", String(20), nullable=True, comment="municipality code"),
    Column("district", String(60), nullable=True),
    Column("deviation_id", String(36), nullable=True, comment="raised when it ran out"),
    UniqueConstraint("episode_key", "rule"),
    Index(None, "status", "due_at"),
    Index(None, "patient_key", "rule"),
)

# When the event a message reports happened, where it is not the message's own time: the
# physician's ready-for-discharge decision (EVN-6) and the discharge (Encounter.period.end of
# the discharge event; NULL for discharge information sent as a document). For statistics.
lus_event_times = Table(
    "lus_event_times",
    metadata,
    Column("message_id", String(36), ForeignKey("messages.id"), primary_key=True),
    Column("at", UtcDateTime, nullable=True, comment="NULL: the message is no such event"),
)

receipt_events = Table(
    "receipt_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("delivery_id", String(36), ForeignKey("deliveries.id"), nullable=False),
    Column("state", String(20), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("actor_name", String(200), nullable=True),
    Column("actor_role", String(100), nullable=True),
    Column("actor_org", String(64), nullable=True),
    Column("detail", String(500), nullable=True),
    UniqueConstraint("delivery_id", "state"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(100), nullable=False),
    Column("key", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("published_at", UtcDateTime, nullable=True),
    Index(None, "published_at", "id"),
)

processed_events = Table(
    "processed_events",
    metadata,
    Column("consumer", String(40), primary_key=True),
    Column("event_id", String(160), primary_key=True),
    Column("processed_at", UtcDateTime, nullable=False),
)

source_notifications = Table(
    "source_notifications",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("message_id", String(36), ForeignKey("messages.id"), nullable=False),
    Column("delivery_id", String(36), ForeignKey("deliveries.id"), nullable=True),
    Column("state", String(20), nullable=False, comment="the state reported"),
    Column("dedup_key", String(120), nullable=False, comment="one notification per fact"),
    Column("channel", String(40), nullable=False, comment="which adapter sends it"),
    Column(
        "payload",
        EncryptedBytes("source_notifications.payload"),
        nullable=False,
        comment="the message to the source; encrypted",
    ),
    Column("status", String(20), nullable=False, comment="pending, acked"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("last_error", String(200), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("acked_at", UtcDateTime, nullable=True),
    UniqueConstraint("dedup_key", "channel"),
    Index(None, "status", "next_attempt_at"),
)

consents = Table(
    "consents",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("patient_key", String(64), nullable=False, comment="HMAC of the patient identity"),
    Column("episode_key", String(64), nullable=True, comment="set: that stay only"),
    Column("basis", String(20), nullable=False, comment="samtycke, menprovning, sparr"),
    Column("status", String(20), nullable=False, comment="FHIR Consent.status"),
    Column(
        "resource",
        EncryptedText("consents.resource"),
        nullable=False,
        comment="the FHIR Consent, JSON; encrypted",
    ),
    Column("version", Integer, nullable=False),
    Column("source", String(20), nullable=False, comment="api or message"),
    Column("source_id", String(200), nullable=False, comment="caller org, or message id"),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "patient_key"),
)

# The audit trail (gateway/audit): append-only, hash-chained; see docs/architecture.md.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False, comment="1, 2, 3, … no gaps"),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(200), nullable=False, comment="person (token name) or stage"),
    Column("actor_org", String(64), nullable=False, comment="HSA-id of the actor's organisation"),
    Column("role", String(100), nullable=False),
    Column("action", String(60), nullable=False, comment="e.g. message.read, gate.decision"),
    Column("patient_key", String(64), nullable=False, comment="HMAC pseudonym, or empty"),
    Column("subject", String(160), nullable=False, comment="message or delivery id"),
    Column("purpose", String(60), nullable=False, comment="why, e.g. lus-utskrivning"),
    Column("outcome", String(20), nullable=False),
    Column("detail", String(500), nullable=False, comment="short; never patient data"),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, comment="SHA-256 of prev_hash and this row"),
    Index(None, "patient_key", "seq"),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False, comment="last row covered"),
    Column("head_hash", String(64), nullable=False, comment="audit_log.hash at seq"),
    Column("at", UtcDateTime, nullable=False),
    Column("key_id", String(16), nullable=False, comment="which audit signing key"),
    Column("signature", String(128), nullable=False, comment="Ed25519, hex"),
)

data_keys = Table(
    "data_keys",
    metadata,
    Column("id", String(36), primary_key=True, comment="the DEK id every ciphertext names"),
    Column("wrapped_key", LargeBinary, nullable=False, comment="the DEK encrypted by the KEK"),
    Column("kek_id", String(200), nullable=False, comment="the key-encryption key that wraps it"),
    Column("state", String(10), nullable=False, comment="active (encrypts) or retired"),
    Column("created_at", UtcDateTime, nullable=False),
    Column("retired_at", UtcDateTime, nullable=True),
)

# The directory of recipients as FHIR resources (gateway/directory/store.py): the current
# version of each; a deletion is a tombstone version, so versions only grow.
directory_resources = Table(
    "directory_resources",
    metadata,
    Column("resource_type", String(40), primary_key=True, comment="Organization, Endpoint, …"),
    Column("id", String(64), primary_key=True, comment="the FHIR id"),
    Column("version", Integer, nullable=False, comment="meta.versionId"),
    Column("hsa_id", String(64), nullable=True, comment="an Organization's HSA-id"),
    Column(
        "organization_id",
        String(64),
        nullable=True,
        comment="HealthcareService.providedBy, Endpoint.managingOrganization",
    ),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("resource", Text, nullable=False, comment="the FHIR resource, JSON; no patient data"),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "hsa_id"),
    Index(None, "organization_id"),
)

# Which unit serves which patient, per kind of party (the routing role), as messages said.
care_relations = Table(
    "care_relations",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("patient_key", String(64), nullable=False, comment="HMAC pseudonym"),
    Column("kind", String(40), nullable=False, comment="routing role, e.g. hemtjanst-natt"),
    Column("hsa_id", String(64), nullable=False),
    Column("message_id", String(36), nullable=True, comment="the message that named it"),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True, comment="set: a later unit of the kind"),
    Index(None, "patient_key", "kind"),
)

# Unit codes that senders used and that are neither HSA-ids nor mapped in mappings/: the
# messages were accepted; operators map the codes (gateway/store/unmapped.py). No patient data.
unmapped_codes = Table(
    "unmapped_codes",
    metadata,
    Column("sender", String(200), primary_key=True, comment="sender HSA-id, or MSH-4 as sent"),
    Column("field", String(20), primary_key=True, comment="where the code came, e.g. PV1-3"),
    Column("code", String(200), primary_key=True, comment="the code as sent"),
    Column("first_seen", UtcDateTime, nullable=False),
    Column("last_seen", UtcDateTime, nullable=False),
    Column("times_seen", BigInteger, nullable=False, comment="accepted messages using it"),
)
