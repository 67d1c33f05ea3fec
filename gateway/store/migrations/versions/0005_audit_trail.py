"""audit trail: append-only, hash-chained access log and its signed checkpoints

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

Triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) on both tables, so that no
code path of the gateway can rewrite the trail by mistake. They do not stop a database
administrator; ``brygga audit verify`` is what detects that. Note for later migrations: a
SQLite batch operation on these tables recreates them without the triggers; add them again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("audit_log", "audit_checkpoints")


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False,
                  comment="1, 2, 3, … no gaps"),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False,
                  comment="person (token name) or stage"),
        sa.Column("actor_org", sa.String(length=64), nullable=False,
                  comment="HSA-id of the actor's organisation"),
        sa.Column("role", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=60), nullable=False,
                  comment="e.g. message.read, gate.decision"),
        sa.Column("patient_key", sa.String(length=64), nullable=False,
                  comment="HMAC pseudonym, or empty"),
        sa.Column("subject", sa.String(length=160), nullable=False,
                  comment="message or delivery id"),
        sa.Column("purpose", sa.String(length=60), nullable=False,
                  comment="why, e.g. lus-utskrivning"),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False,
                  comment="short; never patient data"),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False,
                  comment="SHA-256 of prev_hash and this row"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_patient_key_seq", "audit_log", ["patient_key", "seq"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False,
                  comment="last row covered"),
        sa.Column("head_hash", sa.String(length=64), nullable=False,
                  comment="audit_log.hash at seq"),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False,
                  comment="which audit signing key"),
        sa.Column("signature", sa.String(length=128), nullable=False,
                  comment="Ed25519, hex"),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_checkpoints")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION brygga_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$"
        )
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION brygga_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION brygga_append_only()"
            )
    else:
        for table in TABLES:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS brygga_append_only()")
    else:
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_audit_log_patient_key_seq", table_name="audit_log")
    op.drop_table("audit_log")
