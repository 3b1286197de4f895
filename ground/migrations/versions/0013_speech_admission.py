"""Keep whether each call's IVR listened to the caller or, with no recognizer free, gave the key menu at once.

``calls.speech_admission``: "admitted", "refused" (the node's budget of concurrent recognitions, speech.max_streams,
was spent, or the speech engine was full), or NULL (no listen node with speech reached). Counting the refused per
node and day is how an operator sees that the budget, or the node's cores, no longer match the calls.

Revision ID: 0013_speech_admission
Revises: 0012_callbacks_surge
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013_speech_admission"
down_revision: str | None = "0012_callbacks_surge"
branch_labels: str | None = None
depends_on: str | None = None

CONDITION = "speech_admission IS NULL OR speech_admission IN ('admitted', 'refused')"


def upgrade() -> None:
    # batch mode: SQLite adds CHECK constraints only by rebuilding the table, which batch does safely.
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("speech_admission", sa.String(16), nullable=True))
        batch.create_check_constraint("speech_admission", CONDITION)


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_constraint(op.f("ck_calls_speech_admission"), type_="check")
        batch.drop_column("speech_admission")
