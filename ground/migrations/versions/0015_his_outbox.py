"""The HIS outbox: every HL7 message to the HIS, encrypted, stored before it is sent (his.outbox).

``his_outbox`` keeps each outgoing message from the moment it is queued until the HIS acknowledges it with AA,
so nothing is lost while the HIS or the link is down. ``id`` is the sending order; ``control_id`` (MSH-10) is
unique, and a re-send after a crash uses the same one, so the HIS can recognise a duplicate. ``body_enc`` is the
whole message as an AES-256-GCM token under a ``his_outbox`` data key, bound to table, column and control id;
``patient`` is the patient's blind id (how the audit names it), never an identifier. ``claimed_by`` and
``claimed_until`` are the lease of the one node sending the head of the queue.

Revision ID: 0015_his_outbox
Revises: 0014_stats
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0015_his_outbox"
down_revision: str | None = "0014_stats"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Spelled out rather than imported from the models: the migration keeps creating the schema of this revision.
    op.create_table(
        "his_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("control_id", sa.String(20), nullable=False),
        sa.Column("message_type", sa.String(16), nullable=False),
        sa.Column("patient", sa.String(128), nullable=True),
        sa.Column("body_enc", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ack_code", sa.String(2), nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name=op.f("ck_his_outbox_status")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_his_outbox_attempts")),
        sa.ForeignKeyConstraint(
            ["data_key_id"], ["data_keys.id"], name=op.f("fk_his_outbox_data_key_id_data_keys"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_his_outbox")),
    )
    op.create_index("uq_his_outbox_control_id", "his_outbox", ["control_id"], unique=True)
    op.create_index("ix_his_outbox_status_id", "his_outbox", ["status", "id"])
    op.create_index("ix_his_outbox_data_key_id", "his_outbox", ["data_key_id"])


def downgrade() -> None:
    op.drop_table("his_outbox")
