"""Keep each call's triage: the level, confidence and discriminator the classifier gave the caller's words, whether
the IVR asked "是否需要急救" and what the caller answered, and an agent's upgrade to emergency (who and when).

Never the transcript: the words themselves are clinical data and stay out of the call record. The schema refuses
levels and answers the code does not know, a confidence outside 0..1, an answer without the question having been
asked, and half an upgrade (a time without an agent or the reverse).

Revision ID: 0011_triage
Revises: 0010_vaccination
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011_triage"
down_revision: str | None = "0010_vaccination"
branch_labels: str | None = None
depends_on: str | None = None

CHECKS = {
    "triage_level": "triage_level IS NULL OR triage_level IN ('emergency', 'urgent', 'routine')",
    "triage_confidence": "triage_confidence IS NULL OR (triage_confidence >= 0 AND triage_confidence <= 1)",
    "triage_confirm_answer": (
        "triage_confirm_answer IS NULL OR "
        "(triage_confirm_asked AND triage_confirm_answer IN ('key', 'speech', 'declined', 'no_input'))"
    ),
    "upgraded": "(upgraded_at IS NULL) = (upgraded_by IS NULL)",
}


def upgrade() -> None:
    # batch mode: SQLite adds CHECK constraints only by rebuilding the table, which batch does safely.
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("triage_level", sa.String(16), nullable=True))
        batch.add_column(sa.Column("triage_confidence", sa.Float(), nullable=True))
        batch.add_column(sa.Column("triage_discriminator", sa.String(64), nullable=True))
        batch.add_column(sa.Column("triage_confirm_asked", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("triage_confirm_answer", sa.String(16), nullable=True))
        batch.add_column(sa.Column("upgraded_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("upgraded_by", sa.String(64), nullable=True))
        for name, condition in CHECKS.items():
            batch.create_check_constraint(name, condition)


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        for name in CHECKS:
            batch.drop_constraint(op.f(f"ck_calls_{name}"), type_="check")
        for column in (
            "upgraded_by",
            "upgraded_at",
            "triage_confirm_answer",
            "triage_confirm_asked",
            "triage_discriminator",
            "triage_confidence",
            "triage_level",
        ):
            batch.drop_column(column)
