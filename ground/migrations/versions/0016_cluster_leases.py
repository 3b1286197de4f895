"""Cluster: node leases, the cluster-wide queue of waiting calls, and calls closed as lost with their node.

``node_leases``: one row per node name, renewed by the node; expired rows are taken over by a surviving node,
which frees the dead node's agents and closes its calls (``calls.outcome = 'node_lost'``). ``queued_calls``: the
waiting calls of every node, which every node's dispatcher chooses among (docs/cluster.md).

Revision ID: 0016_cluster_leases
Revises: 0015_his_outbox
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0016_cluster_leases"
down_revision: str | None = "0015_his_outbox"
branch_labels: str | None = None
depends_on: str | None = None

OLD_OUTCOMES = (
    "outcome IN ('in_progress', 'completed', 'routed', 'transferred', 'caller_hangup', 'connection_lost', 'error')"
)
NEW_OUTCOMES = (
    "outcome IN ('in_progress', 'completed', 'routed', 'transferred', 'caller_hangup', 'connection_lost', "
    "'error', 'node_lost')"
)


def upgrade() -> None:
    # batch mode: SQLite changes a CHECK constraint only by rebuilding the table, which batch does safely.
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint(op.f("ck_calls_outcome"), type_="check")
        batch.create_check_constraint("outcome", NEW_OUTCOMES)
    op.create_table(
        "node_leases",
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("taken_over_by", sa.String(64), nullable=True),
        sa.Column("taken_over_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('live', 'lost')", name=op.f("ck_node_leases_state")),
        sa.CheckConstraint("epoch >= 1", name=op.f("ck_node_leases_epoch")),
        sa.CheckConstraint("renewed_at < expires_at", name=op.f("ck_node_leases_expiry")),
        sa.CheckConstraint(
            "(state = 'live' AND taken_over_by IS NULL AND taken_over_at IS NULL) OR "
            "(state = 'lost' AND taken_over_by IS NOT NULL AND taken_over_at IS NOT NULL)",
            name=op.f("ck_node_leases_takeover"),
        ),
        sa.PrimaryKeyConstraint("node", name=op.f("pk_node_leases")),
    )
    op.create_table(
        "queued_calls",
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("callback", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("state", sa.String(16), server_default="waiting", nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("ring_id", sa.Integer(), nullable=True),
        sa.Column("offered_by", sa.String(64), nullable=True),
        sa.CheckConstraint("priority IN ('emergency', 'normal')", name=op.f("ck_queued_calls_priority")),
        sa.CheckConstraint("state IN ('waiting', 'offered')", name=op.f("ck_queued_calls_state")),
        sa.CheckConstraint(
            "(state = 'waiting' AND agent_id IS NULL AND ring_id IS NULL AND offered_by IS NULL) OR "
            "(state = 'offered' AND agent_id IS NOT NULL AND ring_id IS NOT NULL AND offered_by IS NOT NULL)",
            name=op.f("ck_queued_calls_offer"),
        ),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_queued_calls")),
    )
    op.create_index(op.f("ix_queued_calls_state"), "queued_calls", ["state"])
    op.create_index(op.f("ix_queued_calls_node"), "queued_calls", ["node"])


def downgrade() -> None:
    op.drop_index(op.f("ix_queued_calls_node"), table_name="queued_calls")
    op.drop_index(op.f("ix_queued_calls_state"), table_name="queued_calls")
    op.drop_table("queued_calls")
    op.drop_table("node_leases")
    # Calls closed as lost keep their story as a plain lost connection under the old constraint.
    op.execute("UPDATE calls SET outcome = 'connection_lost' WHERE outcome = 'node_lost'")
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint(op.f("ck_calls_outcome"), type_="check")
        batch.create_check_constraint("outcome", OLD_OUTCOMES)
