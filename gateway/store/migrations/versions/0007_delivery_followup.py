"""delivery follow-up: attempts, resends, fallback, deadlines, escalation, deviations

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True,
                                   comment="when the event happened (routing)"))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("municipality", sa.String(length=20), nullable=True,
                                   comment="the recipient's, for statistics"))
        batch.add_column(sa.Column("district", sa.String(length=60), nullable=True,
                                   comment="the recipient's city district"))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0",
                                   comment="sends on this channel"))
        batch.add_column(sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=True,
                                   comment="when follow-up looks next"))
        batch.add_column(sa.Column("due_rule", sa.String(length=40), nullable=True,
                                   comment="the LUS clock for its receipt"))
        batch.add_column(sa.Column("due_at", sa.DateTime(timezone=True), nullable=True,
                                   comment="when the receipt is due"))
        batch.add_column(sa.Column("escalation_level", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("escalated_from", sa.String(length=36), nullable=True,
                                   comment="the delivery it escalates"))
        batch.add_column(sa.Column("withheld", sa.String(length=200), nullable=True,
                                   comment="contents not for this recipient"))
        batch.create_index("ix_deliveries_next_check_at", ["next_check_at"])
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False,
                  comment="1, then 2 and 3 for resends"),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False,
                  comment="delivered, received, unavailable, rejected, fallback, escalated"),
        sa.Column("detail", sa.String(length=500), nullable=True,
                  comment="for people; never patient data"),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"],
                                name=op.f("fk_delivery_attempts_delivery_id_deliveries")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index("ix_delivery_attempts_delivery_id_id", "delivery_attempts",
                    ["delivery_id", "id"])
    op.create_table(
        "deviations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=True),
        sa.Column("patient_key", sa.String(length=64), nullable=False, comment="HMAC pseudonym"),
        sa.Column("kind", sa.String(length=40), nullable=False,
                  comment="missed-receipt, held-past-deadline, …"),
        sa.Column("responsible_hsa_id", sa.String(length=64), nullable=False,
                  comment="whose inbox it is in"),
        sa.Column("municipality", sa.String(length=20), nullable=True),
        sa.Column("district", sa.String(length=60), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False, comment="open or answered"),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_by", sa.String(length=200), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True, comment="encrypted"),
        sa.Column("summary", sa.String(length=500), nullable=False,
                  comment="what went wrong; no patient data"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name=op.f("fk_deviations_message_id_messages")),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"],
                                name=op.f("fk_deviations_delivery_id_deliveries")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deviations")),
        sa.UniqueConstraint("delivery_id", "kind", name=op.f("uq_deviations_delivery_id_kind")),
    )
    op.create_index("ix_deviations_responsible_hsa_id_status", "deviations",
                    ["responsible_hsa_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_deviations_responsible_hsa_id_status", table_name="deviations")
    op.drop_table("deviations")
    op.drop_index("ix_delivery_attempts_delivery_id_id", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_next_check_at")
        for name in ("withheld", "escalated_from", "escalation_level", "due_at", "due_rule",
                     "next_check_at", "attempts", "district", "municipality"):
            batch.drop_column(name)
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("occurred_at")
