"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('messages',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('source', sa.String(length=200), nullable=False, comment='sending application|facility'),
    sa.Column('control_id', sa.String(length=200), nullable=False, comment='MSH-10 or Bundle id'),
    sa.Column('event', sa.String(length=40), nullable=False),
    sa.Column('patient_key', sa.String(length=64), nullable=False, comment='HMAC of the patient identity'),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('canonical', sa.Text(), nullable=False, comment='FHIR message Bundle, JSON'),
    sa.Column('ack', sa.LargeBinary(), nullable=True, comment='the answer given; replayed for duplicates'),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('consent_decision', sa.String(length=10), nullable=True),
    sa.Column('consent_reason', sa.String(length=200), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('source', 'control_id', name=op.f('uq_messages_source_control_id'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_patient_key'), ['patient_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_messages_status_updated_at'), ['status', 'updated_at'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('topic', sa.String(length=100), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_published_at_id'), ['published_at', 'id'], unique=False)

    op.create_table('processed_events',
    sa.Column('consumer', sa.String(length=40), nullable=False),
    sa.Column('event_id', sa.String(length=160), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('consumer', 'event_id', name=op.f('pk_processed_events'))
    )
    op.create_table('deliveries',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('message_id', sa.String(length=36), nullable=False),
    sa.Column('recipient_hsa_id', sa.String(length=64), nullable=False),
    sa.Column('recipient_name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=40), nullable=False, comment='why this party receives it'),
    sa.Column('for_information', sa.Boolean(), nullable=False),
    sa.Column('channel', sa.String(length=20), nullable=True),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_deliveries_message_id_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries')),
    sa.UniqueConstraint('message_id', 'recipient_hsa_id', name=op.f('uq_deliveries_message_id_recipient_hsa_id'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_recipient_hsa_id_channel_state'), ['recipient_hsa_id', 'channel', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_state_updated_at'), ['state', 'updated_at'], unique=False)

    op.create_table('receipt_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.String(length=36), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor_name', sa.String(length=200), nullable=True),
    sa.Column('actor_role', sa.String(length=100), nullable=True),
    sa.Column('actor_org', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['delivery_id'], ['deliveries.id'], name=op.f('fk_receipt_events_delivery_id_deliveries')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_receipt_events')),
    sa.UniqueConstraint('delivery_id', 'state', name=op.f('uq_receipt_events_delivery_id_state'))
    )


def downgrade() -> None:
    op.drop_table('receipt_events')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_state_updated_at'))
        batch_op.drop_index(batch_op.f('ix_deliveries_recipient_hsa_id_channel_state'))

    op.drop_table('deliveries')
    op.drop_table('processed_events')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_published_at_id'))

    op.drop_table('outbox')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_status_updated_at'))
        batch_op.drop_index(batch_op.f('ix_messages_patient_key'))

    op.drop_table('messages')
