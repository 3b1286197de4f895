"""Create the access-control tables: patient assignments, break-glass grants and sessions.

Scopes that are not in the accounts row itself (``0004_accounts``: roles, departments, frozen, epoch) live here:
which account is responsible for, or on a call with, which patient (by the registry's opaque id, never a name
or number), the break-glass grants with their reason, expiry, closing and supervisor review, and the signed-in
sessions bound to an account epoch. Role and department history is in the audit log, not here.

Revision ID: 0007_access
Revises: 0006_patients
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007_access"
down_revision: str | None = "0006_patients"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "patient_assignments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        # The registry's opaque patient id (hex); deliberately no foreign key, the registry may live elsewhere.
        sa.Column("patient_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("call_id", sa.String(64), nullable=True),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("assigned_by", sa.String(128), nullable=True),
        sa.CheckConstraint("kind IN ('responsible', 'call')", name=op.f("ck_patient_assignments_kind")),
        sa.CheckConstraint("kind <> 'call' OR call_id IS NOT NULL", name=op.f("ck_patient_assignments_call_has_id")),
        sa.CheckConstraint("ends_at IS NULL OR ends_at >= starts_at", name=op.f("ck_patient_assignments_period")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_patient_assignments_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient_assignments")),
    )
    op.create_index("ix_patient_assignments_account_patient", "patient_assignments", ["account_id", "patient_id"])
    op.create_index("ix_patient_assignments_call_id", "patient_assignments", ["call_id"])

    op.create_table(
        "break_glass_grants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("account_epoch", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        # The patient's blind id as the audit log names them (so the grant's end is audited alike).
        sa.Column("patient_ref", sa.String(128), nullable=True),
        sa.Column("department", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(500), nullable=True),
        sa.Column("closed_by", sa.String(128), nullable=True),
        sa.Column("reviewed_by", sa.String(64), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("review_verdict", sa.String(16), nullable=True),
        sa.CheckConstraint(
            "(patient_id IS NOT NULL AND department IS NULL) OR (patient_id IS NULL AND department IS NOT NULL)",
            name=op.f("ck_break_glass_grants_one_scope"),
        ),
        sa.CheckConstraint("expires_at > opened_at", name=op.f("ck_break_glass_grants_period")),
        sa.CheckConstraint(
            "(closed_at IS NULL AND close_reason IS NULL) OR (closed_at IS NOT NULL AND close_reason IS NOT NULL)",
            name=op.f("ck_break_glass_grants_closed"),
        ),
        sa.CheckConstraint(
            "(reviewed_by IS NULL AND reviewed_at IS NULL AND review_verdict IS NULL) OR "
            "(reviewed_by IS NOT NULL AND reviewed_at IS NOT NULL AND review_verdict IN ('justified', 'unjustified'))",
            name=op.f("ck_break_glass_grants_review"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_break_glass_grants_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["reviewed_by"], ["accounts.id"], name=op.f("fk_break_glass_grants_reviewed_by_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_break_glass_grants")),
    )
    op.create_index("ix_break_glass_grants_account_id", "break_glass_grants", ["account_id"])
    op.create_index("ix_break_glass_grants_reviewed_at", "break_glass_grants", ["reviewed_at"])

    op.create_table(
        "access_sessions",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("account_epoch", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_access_sessions_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_sessions")),
    )
    op.create_index("ix_access_sessions_account_id", "access_sessions", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_access_sessions_account_id", table_name="access_sessions")
    op.drop_table("access_sessions")
    op.drop_index("ix_break_glass_grants_reviewed_at", table_name="break_glass_grants")
    op.drop_index("ix_break_glass_grants_account_id", table_name="break_glass_grants")
    op.drop_table("break_glass_grants")
    op.drop_index("ix_patient_assignments_call_id", table_name="patient_assignments")
    op.drop_index("ix_patient_assignments_account_patient", table_name="patient_assignments")
    op.drop_table("patient_assignments")
