"""Create agents, credentials, skills, reservations and ring history (routing).

Revision ID: 0004_agents
Revises: 0003_audit
Create Date: 2026-11-26
"""

from __future__ import annotations

revision: str = "0004_agents"
down_revision: str | None = "0003_audit"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
