"""The audit trail: who read or did what with which patient's data, why and when.

Append with ``await audit.record(conn, AuditEntry(...))`` inside the transaction whose effect
the entry describes. Check with ``brygga audit verify``. See ``chain`` for the hash, and
``checkpoints`` for the signatures.
"""

from gateway.audit.chain import (
    PURPOSE_AUDIT,
    PURPOSE_LUS,
    PURPOSE_OPERATIONS,
    SYSTEM_ROLE,
    AuditEntry,
    record,
    record_many,
)

__all__ = [
    "PURPOSE_AUDIT",
    "PURPOSE_LUS",
    "PURPOSE_OPERATIONS",
    "SYSTEM_ROLE",
    "AuditEntry",
    "record",
    "record_many",
]
