"""lus clocks: the routine's clocks on the messages themselves (decision 0019)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lus_clocks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("episode_key", sa.String(length=64), nullable=False,
                  comment="HMAC of sender and visit number"),
        sa.Column("patient_key", sa.String(length=64), nullable=False, comment="HMAC pseudonym"),
        sa.Column("rule", sa.String(length=40), nullable=False,
                  comment="mappings/deadlines rule name"),
        sa.Column("started_by", sa.String(length=36), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_by", sa.String(length=36), nullable=True,
                  comment="message id that stopped it"),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False,
                  comment="running, met, late, cancelled"),
        sa.Column("responsible_hsa_id", sa.String(length=64), nullable=False,
                  comment="who owes the step"),
        sa.Column("municipality", sa.String(length=20), nullable=True,
                  comment="municipality code"),
        sa.Column("district", sa.String(length=60), nullable=True),
        sa.Column("deviation_id", sa.String(length=36), nullable=True,
                  comment="raised when it ran out"),
        sa.ForeignKeyConstraint(["started_by"], ["messages.id"],
                                name=op.f("fk_lus_clocks_started_by_messages")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lus_clocks")),
        sa.UniqueConstraint("episode_key", "rule", name=op.f("uq_lus_clocks_episode_key_rule")),
    )
    op.create_index(op.f("ix_lus_clocks_status_due_at"), "lus_clocks", ["status", "due_at"])
    op.create_index(op.f("ix_lus_clocks_patient_key_rule"), "lus_clocks", ["patient_key", "rule"])
    op.create_table(
        "lus_event_times",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True,
                  comment="NULL: the message is no such event"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name=op.f("fk_lus_event_times_message_id_messages")),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_lus_event_times")),
    )


def downgrade() -> None:
    op.drop_table("lus_event_times")
    op.drop_index(op.f("ix_lus_clocks_patient_key_rule"), table_name="lus_clocks")
    op.drop_index(op.f("ix_lus_clocks_status_due_at"), table_name="lus_clocks")
    op.drop_table("lus_clocks")
