"""directory: recipients as FHIR resources, and which unit serves which patient

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "directory_resources",
        sa.Column("resource_type", sa.String(length=40), nullable=False,
                  comment="Organization, Endpoint, …"),
        sa.Column("id", sa.String(length=64), nullable=False, comment="the FHIR id"),
        sa.Column("version", sa.Integer(), nullable=False, comment="meta.versionId"),
        sa.Column("hsa_id", sa.String(length=64), nullable=True,
                  comment="an Organization's HSA-id"),
        sa.Column("organization_id", sa.String(length=64), nullable=True,
                  comment="HealthcareService.providedBy, Endpoint.managingOrganization"),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("resource", sa.Text(), nullable=False,
                  comment="the FHIR resource, JSON; no patient data"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", name=op.f("pk_directory_resources")),
    )
    op.create_index("ix_directory_resources_hsa_id", "directory_resources", ["hsa_id"])
    op.create_index("ix_directory_resources_organization_id", "directory_resources",
                    ["organization_id"])
    op.create_table(
        "care_relations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("patient_key", sa.String(length=64), nullable=False, comment="HMAC pseudonym"),
        sa.Column("kind", sa.String(length=40), nullable=False,
                  comment="routing role, e.g. hemtjanst-natt"),
        sa.Column("hsa_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True,
                  comment="the message that named it"),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True,
                  comment="set: a later unit of the kind"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_care_relations")),
    )
    op.create_index("ix_care_relations_patient_key_kind", "care_relations",
                    ["patient_key", "kind"])


def downgrade() -> None:
    op.drop_index("ix_care_relations_patient_key_kind", table_name="care_relations")
    op.drop_table("care_relations")
    op.drop_index("ix_directory_resources_organization_id", table_name="directory_resources")
    op.drop_index("ix_directory_resources_hsa_id", table_name="directory_resources")
    op.drop_table("directory_resources")
