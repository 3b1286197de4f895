"""Create agents, credentials, skills, reservations and ring history (routing).

Revision ID: 0005_agents
Revises: 0004_accounts
Create Date: 2026-11-26
"""

from __future__ import annotations

revision: str = "0005_agents"
down_revision: str | None = "0004_accounts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
