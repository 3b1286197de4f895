"""Create the calls table: one row per call handled by a node, without any patient identifier.

Revision ID: 0001_calls
Revises:
Create Date: 2024-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001_calls"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Spelled out rather than imported from ground.models: a migration must keep creating the schema as it
    # was at this revision even after the models move on.
    op.create_table(
        "calls",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("channel_name", sa.String(128), nullable=False),
        sa.Column("flow", sa.String(64), nullable=False),
        sa.Column("flow_version", sa.String(64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False, server_default="in_progress"),
        sa.Column("last_step", sa.String(128), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "outcome IN ('in_progress', 'completed', 'caller_hangup', 'connection_lost', 'error')",
            name=op.f("ck_calls_outcome"),
        ),
        sa.CheckConstraint("transport IN ('ari', 'fastagi')", name=op.f("ck_calls_transport")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calls")),
    )
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_index("ix_calls_channel_id", "calls", ["channel_id"])


def downgrade() -> None:
    op.drop_index("ix_calls_channel_id", table_name="calls")
    op.drop_index("ix_calls_started_at", table_name="calls")
    op.drop_table("calls")
