"""data keys: envelope encryption of patient data (decision 0007)

Adds ``data_keys``, the wrapped data-encryption keys. The encrypted columns keep their
types (``messages.raw`` and ``source_notifications.payload`` BYTEA/BLOB, ``messages.canonical``
TEXT holding base64), so no table is rewritten: rows written before this revision stay
plaintext, are still readable, and are sealed by ``brygga keys reencrypt``.

Runs under the migration advisory lock of env.py, like every revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Column comments say what is encrypted (PostgreSQL keeps comments; SQLite has none).
_COMMENTS = [
    ("messages", "raw", sa.LargeBinary(), False, None, "encrypted"),
    ("messages", "canonical", sa.Text(), False, "FHIR message Bundle, JSON",
     "FHIR message Bundle, JSON; encrypted, base64"),
    ("source_notifications", "payload", sa.LargeBinary(), False, "the message to the source",
     "the message to the source; encrypted"),
]


def upgrade() -> None:
    op.create_table(
        "data_keys",
        sa.Column("id", sa.String(length=36), nullable=False,
                  comment="the DEK id every ciphertext names"),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False,
                  comment="the DEK encrypted by the KEK"),
        sa.Column("kek_id", sa.String(length=200), nullable=False,
                  comment="the key-encryption key that wraps it"),
        sa.Column("state", sa.String(length=10), nullable=False,
                  comment="active (encrypts) or retired"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_keys")),
    )
    if op.get_bind().dialect.name == "postgresql":
        for table, column, type_, nullable, old, new in _COMMENTS:
            op.alter_column(table, column, existing_type=type_, existing_nullable=nullable,
                            existing_comment=old, comment=new)


def downgrade() -> None:
    # Encrypted rows stay encrypted: decrypt them (a keyring and a script) before going back.
    if op.get_bind().dialect.name == "postgresql":
        for table, column, type_, nullable, old, new in _COMMENTS:
            op.alter_column(table, column, existing_type=type_, existing_nullable=nullable,
                            existing_comment=new, comment=old)
    op.drop_table("data_keys")
