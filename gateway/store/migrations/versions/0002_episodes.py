"""episodes: link versions and cancellations of one care episode

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.add_column(
            sa.Column("episode_key", sa.String(length=64), nullable=True,
                      comment="HMAC of sender and visit number")
        )
        batch_op.create_index("ix_messages_episode_key_event", ["episode_key", "event"])
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.add_column(
            sa.Column("superseded_by", sa.String(length=36), nullable=True,
                      comment="message id of a newer version")
        )
        batch_op.add_column(
            sa.Column("retracted_by", sa.String(length=36), nullable=True,
                      comment="message id of the cancellation")
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("retracted_by")
        batch_op.drop_column("superseded_by")
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_index("ix_messages_episode_key_event")
        batch_op.drop_column("episode_key")
