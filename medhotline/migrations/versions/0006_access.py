"""Create accounts, permissions and break-glass grants (access control).

Revision ID: 0006_access
Revises: 0005_patients
Create Date: 2026-11-26
"""

from __future__ import annotations

revision: str = "0006_access"
down_revision: str | None = "0005_patients"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
