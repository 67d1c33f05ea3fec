"""source notifications: receipts sent back to the system a message came from

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "source_notifications",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False, comment="the state reported"),
        sa.Column("dedup_key", sa.String(length=120), nullable=False,
                  comment="one notification per fact"),
        sa.Column("channel", sa.String(length=40), nullable=False,
                  comment="which adapter sends it"),
        sa.Column("payload", sa.LargeBinary(), nullable=False,
                  comment="the message to the source"),
        sa.Column("status", sa.String(length=20), nullable=False, comment="pending, acked"),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name=op.f("fk_source_notifications_message_id_messages")),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"],
                                name=op.f("fk_source_notifications_delivery_id_deliveries")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_notifications")),
        sa.UniqueConstraint("dedup_key", "channel",
                            name=op.f("uq_source_notifications_dedup_key_channel")),
    )
    op.create_index("ix_source_notifications_status_next_attempt_at", "source_notifications",
                    ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_source_notifications_status_next_attempt_at",
                  table_name="source_notifications")
    op.drop_table("source_notifications")
