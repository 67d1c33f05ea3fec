"""consents: the legal basis for telling recipients about a patient (FHIR Consent)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_key", sa.String(length=64), nullable=False,
                  comment="HMAC of the patient identity"),
        sa.Column("episode_key", sa.String(length=64), nullable=True,
                  comment="set: that stay only"),
        sa.Column("basis", sa.String(length=20), nullable=False,
                  comment="samtycke, menprovning, sparr"),
        sa.Column("status", sa.String(length=20), nullable=False, comment="FHIR Consent.status"),
        sa.Column("resource", sa.Text(), nullable=False, comment="the FHIR Consent, JSON; encrypted"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False, comment="api or message"),
        sa.Column("source_id", sa.String(length=200), nullable=False,
                  comment="caller org, or message id"),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consents")),
    )
    op.create_index("ix_consents_patient_key", "consents", ["patient_key"])


def downgrade() -> None:
    op.drop_index("ix_consents_patient_key", table_name="consents")
    op.drop_table("consents")
