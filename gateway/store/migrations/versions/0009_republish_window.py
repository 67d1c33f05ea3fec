"""republish window: the reconciler republishes a stalled row's event once per window

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLES = ("messages", "deliveries")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("republished_at", sa.DateTime(timezone=True),
                                       nullable=True, comment="reconciler: last time"))
            batch.add_column(sa.Column("republish_after", sa.DateTime(timezone=True),
                                       nullable=True, comment="reconciler: in flight"))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("republish_after")
            batch.drop_column("republished_at")
