"""Create the outreach tables: follow-up plans, outbound call attempts, readings, clinical tasks, the
do-not-call list, medication reminders and their confirmations, and the notification outbox.

See ``scheduler.tables`` for what each holds. No phone number is stored (the dialer reads it from the encrypted
registry at dial time; the do-not-call list holds its blind index); readings, medication names and message
bodies are encrypted with the ``outreach`` data key.

Revision ID: 0009_outreach
Revises: 0008_recordings
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009_outreach"
down_revision: str | None = "0008_recordings"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # APScheduler's SQLAlchemy job store (scheduler.runner), as APScheduler 3.x defines it: created here so the
    # schema (and the service role's grants) are the migrations' alone, not a side effect of the first start.
    op.create_table(
        "apscheduler_jobs",
        sa.Column("id", sa.Unicode(191), nullable=False),
        sa.Column("next_run_time", sa.Float(25), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_apscheduler_jobs")),
    )
    op.create_index("ix_apscheduler_jobs_next_run_time", "apscheduler_jobs", ["next_run_time"])
    op.create_table(
        "clinical_tasks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("assignee", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("subject_id", sa.String(length=36), nullable=True),
        sa.Column("call_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "kind IN ('recall', 'unreachable', 'medication_not_confirmed', 'adverse_reaction')",
            name=op.f("ck_clinical_tasks_kind"),
        ),
        sa.CheckConstraint("status IN ('open', 'done')", name=op.f("ck_clinical_tasks_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clinical_tasks")),
    )
    op.create_index("ix_clinical_tasks_patient_id", "clinical_tasks", ["patient_id"], unique=False)
    op.create_index("ix_clinical_tasks_status", "clinical_tasks", ["status"], unique=False)
    op.create_table(
        "do_not_call",
        sa.Column("phone_index", sa.String(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("phone_index", name=op.f("pk_do_not_call")),
    )
    op.create_table(
        "followup_plans",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("condition", sa.String(length=32), nullable=False),
        sa.Column("interval_days", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.String(length=5), nullable=False),
        sa.Column("window_end", sa.String(length=5), nullable=False),
        sa.Column("flow", sa.String(length=64), nullable=False),
        sa.Column("thresholds", sa.Text(), nullable=False),
        sa.Column("responsible", sa.String(length=64), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("next_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.CheckConstraint("interval_days BETWEEN 1 AND 366", name=op.f("ck_followup_plans_interval")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_followup_plans")),
    )
    op.create_index("ix_followup_plans_patient_id", "followup_plans", ["patient_id"], unique=False)
    op.create_table(
        "outreach_attempts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("subject_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("round_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=True),
        sa.Column("trunk", sa.String(length=64), nullable=True),
        sa.Column("channel_id", sa.String(length=64), nullable=True),
        sa.Column("call_id", sa.String(length=36), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.CheckConstraint(
            "kind IN ('followup', 'medication', 'vaccination_reminder', 'adverse_followup')",
            name=op.f("ck_outreach_attempts_kind"),
        ),
        sa.CheckConstraint(
            "state IN ('scheduled', 'dialing', 'answered', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_outreach_attempts_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outreach_attempts")),
        sa.UniqueConstraint("round_id", "attempt", name="round_attempt"),
    )
    op.create_index("ix_outreach_attempts_state_not_before", "outreach_attempts", ["state", "not_before"], unique=False)
    op.create_index("ix_outreach_attempts_subject_id", "outreach_attempts", ["subject_id"], unique=False)
    op.create_table(
        "medication_reminders",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("medication_token", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("at_time", sa.String(length=5), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("responsible", sa.String(length=64), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("next_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("channel IN ('call', 'sms')", name=op.f("ck_medication_reminders_channel")),
        sa.ForeignKeyConstraint(
            ["data_key_id"], ["data_keys.id"], name=op.f("fk_medication_reminders_data_key_id_data_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_medication_reminders")),
    )
    op.create_table(
        "notification_outbox",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=8), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject_id", sa.String(length=36), nullable=True),
        sa.Column("body_token", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gateway_ref", sa.String(length=128), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.CheckConstraint("channel IN ('sms')", name=op.f("ck_notification_outbox_channel")),
        sa.CheckConstraint(
            "state IN ('pending', 'sending', 'sent', 'failed')", name=op.f("ck_notification_outbox_state")
        ),
        sa.ForeignKeyConstraint(
            ["data_key_id"], ["data_keys.id"], name=op.f("fk_notification_outbox_data_key_id_data_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_outbox")),
    )
    op.create_index(
        "ix_notification_outbox_state_not_before", "notification_outbox", ["state", "not_before"], unique=False
    )
    op.create_table(
        "readings",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("plan_id", sa.String(length=36), nullable=True),
        sa.Column("attempt_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value_token", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["outreach_attempts.id"], name=op.f("fk_readings_attempt_id_outreach_attempts")
        ),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"], name=op.f("fk_readings_data_key_id_data_keys")),
        sa.ForeignKeyConstraint(["plan_id"], ["followup_plans.id"], name=op.f("fk_readings_plan_id_followup_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_readings")),
    )
    op.create_index("ix_readings_patient_id", "readings", ["patient_id"], unique=False)
    op.create_table(
        "medication_confirmations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("reminder_id", sa.String(length=36), nullable=False),
        sa.Column("attempt_id", sa.String(length=36), nullable=True),
        sa.Column("confirmed", sa.Boolean(), nullable=False),
        sa.Column("keys", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["outreach_attempts.id"],
            name=op.f("fk_medication_confirmations_attempt_id_outreach_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["reminder_id"],
            ["medication_reminders.id"],
            name=op.f("fk_medication_confirmations_reminder_id_medication_reminders"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_medication_confirmations")),
    )


def downgrade() -> None:
    op.drop_index("ix_apscheduler_jobs_next_run_time", table_name="apscheduler_jobs")
    op.drop_table("apscheduler_jobs")
    op.drop_table("medication_confirmations")
    op.drop_table("readings")
    op.drop_table("notification_outbox")
    op.drop_table("medication_reminders")
    op.drop_table("outreach_attempts")
    op.drop_table("followup_plans")
    op.drop_table("do_not_call")
    op.drop_table("clinical_tasks")
