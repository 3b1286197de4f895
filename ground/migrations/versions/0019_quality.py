"""Quality control: one automatic check per finished call, and reviewers' scores (docs/quality.md).

Revision ID: 0019_quality
Revises: 0018_api_credentials
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0019_quality"
down_revision: str | None = "0018_api_credentials"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "quality_checks",
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False),
        sa.Column("worst", sa.String(16), nullable=True),
        sa.Column("sampled", sa.Boolean(), nullable=False),
        sa.Column("for_review", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], name=op.f("fk_quality_checks_call_id_calls")),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_quality_checks")),
    )
    op.create_index("ix_quality_checks_for_review", "quality_checks", ["for_review", "ended_at"])
    op.create_table(
        "quality_reviews",
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("record_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_id"], ["quality_checks.call_id"], name=op.f("fk_quality_reviews_call_id_quality_checks")
        ),
        sa.ForeignKeyConstraint(
            ["record_id"], ["call_records.id"], name=op.f("fk_quality_reviews_record_id_call_records")
        ),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_quality_reviews")),
    )


def downgrade() -> None:
    op.drop_table("quality_reviews")
    op.drop_index("ix_quality_checks_for_review", table_name="quality_checks")
    op.drop_table("quality_checks")
