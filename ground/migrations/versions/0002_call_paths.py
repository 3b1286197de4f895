"""Record the path through the flow and how the IVR part ended (route decision or transfer).

Revision ID: 0002_call_paths
Revises: 0001_calls
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_call_paths"
down_revision: str | None = "0001_calls"
branch_labels: str | None = None
depends_on: str | None = None

OLD_OUTCOMES = "outcome IN ('in_progress', 'completed', 'caller_hangup', 'connection_lost', 'error')"
NEW_OUTCOMES = (
    "outcome IN ('in_progress', 'completed', 'routed', 'transferred', 'caller_hangup', 'connection_lost', 'error')"
)


def upgrade() -> None:
    # batch mode: SQLite can only change a CHECK constraint by rebuilding the table, which batch does safely.
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint(op.f("ck_calls_outcome"), type_="check")
        batch.create_check_constraint("outcome", NEW_OUTCOMES)
        batch.add_column(sa.Column("route_category", sa.String(32), nullable=True))
        batch.add_column(sa.Column("route_priority", sa.String(16), nullable=True))
        batch.add_column(sa.Column("transfer_to", sa.String(32), nullable=True))
    op.create_table(
        "call_steps",
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("flow", sa.String(64), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("node_type", sa.String(32), nullable=False),
        # The edge taken and the input that chose it; sensitive inputs are stored only as valid/invalid.
        sa.Column("edge", sa.String(64), nullable=True),
        sa.Column("input", sa.String(64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_id"], ["calls.id"], name=op.f("fk_call_steps_call_id_calls"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("call_id", "seq", name=op.f("pk_call_steps")),
    )


def downgrade() -> None:
    op.drop_table("call_steps")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("transfer_to")
        batch.drop_column("route_priority")
        batch.drop_column("route_category")
        batch.drop_constraint(op.f("ck_calls_outcome"), type_="check")
        batch.create_check_constraint("outcome", OLD_OUTCOMES)
