"""TOTP second-factor secrets sealed at rest: the AES-GCM token and the data key (purpose ``totp``) it is under.

``totp_secret`` stays for the rows enrolled before this revision, until ``medhotline keys seal-totp`` seals and
blanks them (it needs the key service, which a migration does not talk to). Nothing writes it any more.

Revision ID: 0022_totp_sealed
Revises: 0021_agent_presence
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0022_totp_sealed"
down_revision: str | None = "0021_agent_presence"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # batch mode: SQLite adds a foreign key and a CHECK constraint only by rebuilding the table.
    with op.batch_alter_table("account_credentials") as batch:
        batch.add_column(sa.Column("totp_sealed", sa.String(128), nullable=True))
        batch.add_column(sa.Column("totp_data_key_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_account_credentials_totp_data_key_id_data_keys", "data_keys", ["totp_data_key_id"], ["id"],
            ondelete="RESTRICT",
        )  # fmt: skip
        batch.create_check_constraint("totp_sealed", "(totp_sealed IS NULL) = (totp_data_key_id IS NULL)")


def downgrade() -> None:
    # A downgrade can't unseal (no key service here): sealed second factors are dropped and must be enrolled again.
    with op.batch_alter_table("account_credentials") as batch:
        batch.drop_constraint(op.f("ck_account_credentials_totp_sealed"), type_="check")
        batch.drop_constraint("fk_account_credentials_totp_data_key_id_data_keys", type_="foreignkey")
        batch.drop_column("totp_data_key_id")
        batch.drop_column("totp_sealed")
