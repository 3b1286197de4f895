"""Indexes for statistics over a time window (``medhotline stats``, docs/statistics.md).

The statistics select the calls that joined the queue in a window (the ``queued`` step of the queue's path) and
the agents' rings in a window. Without these indexes both are full scans of tables that grow by every call for 15
years (the retention floor); with them a day's figures read a day's rows.

Revision ID: 0014_stats
Revises: 0013_speech_admission
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision: str = "0014_stats"
down_revision: str | None = "0013_speech_admission"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_call_steps_node_at", "call_steps", ["node", "at"])
    op.create_index("ix_agent_rings_rung_at", "agent_rings", ["rung_at"])


def downgrade() -> None:
    op.drop_index("ix_agent_rings_rung_at", table_name="agent_rings")
    op.drop_index("ix_call_steps_node_at", table_name="call_steps")
