"""Agents' phone presence for the wallboard: why an agent's phone cannot be rung, and since when.

Revision ID: 0021_agent_presence
Revises: 0020_complaints
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0021_agent_presence"
down_revision: str | None = "0020_complaints"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # batch mode: SQLite adds a CHECK constraint only by rebuilding the table, which batch does safely.
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("offline_reason", sa.String(64), nullable=True))
        batch.add_column(sa.Column("offline_since", sa.DateTime(timezone=True), nullable=True))
        batch.create_check_constraint("offline", "(offline_reason IS NULL) = (offline_since IS NULL)")


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_constraint(op.f("ck_agents_offline"), type_="check")
        batch.drop_column("offline_since")
        batch.drop_column("offline_reason")
