"""12320 complaint tasks (docs/complaints.md), and the outbound survey call as an outreach kind.

Revision ID: 0020_complaints
Revises: 0019_quality
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0020_complaints"
down_revision: str | None = "0019_quality"
branch_labels: str | None = None
depends_on: str | None = None

OLD_KINDS = "kind IN ('followup', 'medication', 'vaccination_reminder', 'adverse_followup')"
NEW_KINDS = "kind IN ('followup', 'medication', 'vaccination_reminder', 'adverse_followup', 'complaint_survey')"


def upgrade() -> None:
    op.create_table(
        "complaint_tasks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("department", sa.String(64), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("referred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("survey_score", sa.Integer(), nullable=True),
        sa.Column("survey_attempt_id", sa.String(36), nullable=True),
        sa.Column("opened_by", sa.String(64), nullable=False),
        sa.CheckConstraint(
            "state IN ('received', 'referred', 'resolved', 'answered')", name=op.f("ck_complaint_tasks_state")
        ),
        sa.CheckConstraint(
            "category IN ('attitude', 'quality', 'fees', 'access', 'ethics', 'other')",
            name=op.f("ck_complaint_tasks_category"),
        ),
        sa.CheckConstraint(
            "survey_score IS NULL OR survey_score BETWEEN 1 AND 5", name=op.f("ck_complaint_tasks_survey_score")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_complaint_tasks")),
    )
    op.create_index("ix_complaint_tasks_state", "complaint_tasks", ["state"])
    # batch mode: SQLite changes a CHECK constraint only by rebuilding the table, which batch does safely.
    with op.batch_alter_table("outreach_attempts") as batch:
        batch.drop_constraint(op.f("ck_outreach_attempts_kind"), type_="check")
        batch.create_check_constraint("kind", NEW_KINDS)


def downgrade() -> None:
    op.execute("DELETE FROM outreach_attempts WHERE kind = 'complaint_survey'")
    with op.batch_alter_table("outreach_attempts") as batch:
        batch.drop_constraint(op.f("ck_outreach_attempts_kind"), type_="check")
        batch.create_check_constraint("kind", OLD_KINDS)
    op.drop_index("ix_complaint_tasks_state", table_name="complaint_tasks")
    op.drop_table("complaint_tasks")
