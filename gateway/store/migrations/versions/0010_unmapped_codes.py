"""unmapped codes: unit codes senders use that are neither HSA-ids nor mapped

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unmapped_codes",
        sa.Column("sender", sa.String(length=200), nullable=False,
                  comment="sender HSA-id, or MSH-4 as sent"),
        sa.Column("field", sa.String(length=20), nullable=False,
                  comment="where the code came, e.g. PV1-3"),
        sa.Column("code", sa.String(length=200), nullable=False, comment="the code as sent"),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times_seen", sa.BigInteger(), nullable=False,
                  comment="accepted messages using it"),
        sa.PrimaryKeyConstraint("sender", "field", "code", name=op.f("pk_unmapped_codes")),
    )


def downgrade() -> None:
    op.drop_table("unmapped_codes")
