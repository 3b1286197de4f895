"""Create the patient registry with encrypted identifiers and blind index (his).

Revision ID: 0006_patients
Revises: 0005_agents
Create Date: 2026-11-26
"""

from __future__ import annotations

revision: str = "0006_patients"
down_revision: str | None = "0005_agents"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
