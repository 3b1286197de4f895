"""Callbacks (number encrypted and blind-indexed, one open callback per number) and the hotline's mode history.

See ``routing.callback_tables`` for what each holds.

Revision ID: 0012_callbacks_surge
Revises: 0010_vaccination
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012_callbacks_surge"
down_revision: str | None = "0011_triage"
branch_labels: str | None = None
depends_on: str | None = None

OPEN_CONDITION = "state IN ('pending', 'dialling')"


def upgrade() -> None:
    op.create_table(
        "callbacks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("call_id", sa.String(length=36), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("phone_enc", sa.Text(), nullable=False),
        sa.Column("phone_bidx", sa.String(length=128), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempt_call_id", sa.String(length=36), nullable=True),
        sa.Column("agent_id", sa.String(length=64), nullable=True),
        sa.Column("last_outcome", sa.String(length=32), nullable=True),
        sa.Column("task_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'dialling', 'connected', 'failed', 'cancelled')", name=op.f("ck_callbacks_state")
        ),
        sa.CheckConstraint("priority IN ('normal', 'emergency')", name=op.f("ck_callbacks_priority")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_callbacks_attempts")),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"], name=op.f("fk_callbacks_data_key_id_data_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callbacks")),
    )
    op.create_index(
        "uq_callbacks_open_phone",
        "callbacks",
        ["phone_bidx"],
        unique=True,
        sqlite_where=sa.text(OPEN_CONDITION),
        postgresql_where=sa.text(OPEN_CONDITION),
    )
    op.create_index("ix_callbacks_node_state", "callbacks", ["node", "state"])
    op.create_table(
        "hotline_modes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("profile_name", sa.String(length=64), nullable=True),
        sa.Column("profile_text", sa.Text(), nullable=True),
        sa.Column("entry_flow", sa.Text(), nullable=True),
        sa.Column("replaces", sa.Integer(), nullable=False),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("mode IN ('normal', 'surge')", name=op.f("ck_hotline_modes_mode")),
        sa.CheckConstraint(
            "(mode = 'normal' AND profile_text IS NULL AND entry_flow IS NULL) OR "
            "(mode = 'surge' AND profile_text IS NOT NULL AND entry_flow IS NOT NULL AND profile_name IS NOT NULL)",
            name=op.f("ck_hotline_modes_profile"),
        ),
        sa.ForeignKeyConstraint(
            ["previous_id"], ["hotline_modes.id"], name=op.f("fk_hotline_modes_previous_id_hotline_modes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hotline_modes")),
        sa.UniqueConstraint("replaces", name=op.f("uq_hotline_modes_replaces")),
    )


def downgrade() -> None:
    op.drop_table("hotline_modes")
    op.drop_index("ix_callbacks_node_state", table_name="callbacks")
    op.drop_index("uq_callbacks_open_phone", table_name="callbacks")
    op.drop_table("callbacks")
