"""Create accounts, permissions and break-glass grants (access control).

Revision ID: 0007_access
Revises: 0006_patients
Create Date: 2026-11-26
"""

from __future__ import annotations

revision: str = "0007_access"
down_revision: str | None = "0006_patients"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
