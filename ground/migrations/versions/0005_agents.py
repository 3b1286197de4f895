"""Create agents, credentials, skills, reservations and ring history (routing).

An agent is an account (``accounts``) with a PJSIP endpoint; the reservation columns on ``agents`` are the
cross-node lock that a conditional UPDATE takes. Credentials are never deleted, only revoked. The tables are
spelled out here (not imported from ``routing.tables``) so this revision keeps creating the schema as it was.

Revision ID: 0005_agents
Revises: 0004_accounts
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005_agents"
down_revision: str | None = "0004_accounts"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("contact", sa.String(256), nullable=True),
        sa.Column("languages", sa.String(128), nullable=False, server_default="zh"),
        sa.Column("paused_reason", sa.String(256), nullable=True),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reserved_call_id", sa.String(36), nullable=True),
        sa.Column("reserved_by", sa.String(64), nullable=True),
        sa.Column("reserved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("endpoint <> ''", name=op.f("ck_agents_endpoint")),
        sa.CheckConstraint("languages <> ''", name=op.f("ck_agents_languages")),
        sa.CheckConstraint(
            "(reserved_call_id IS NULL AND reserved_by IS NULL AND reserved_at IS NULL) OR "
            "(reserved_call_id IS NOT NULL AND reserved_by IS NOT NULL AND reserved_at IS NOT NULL)",
            name=op.f("ck_agents_reservation"),
        ),
        sa.CheckConstraint(
            "(paused_reason IS NULL AND paused_at IS NULL) OR (paused_reason IS NOT NULL AND paused_at IS NOT NULL)",
            name=op.f("ck_agents_pause"),
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_agents_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_agents")),
        sa.UniqueConstraint("endpoint", name=op.f("uq_agents_endpoint")),
    )
    op.create_index("ix_agents_reserved_call_id", "agents", ["reserved_call_id"])

    op.create_table(
        "agent_skills",
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("skill", sa.String(64), nullable=False),
        sa.Column("proficiency", sa.Integer(), nullable=False),
        sa.CheckConstraint("proficiency BETWEEN 1 AND 5", name=op.f("ck_agent_skills_proficiency")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["agents.account_id"], name=op.f("fk_agent_skills_account_id_agents"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("account_id", "skill", name=op.f("pk_agent_skills")),
    )

    op.create_table(
        "credentials",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("number", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(128), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_by", sa.String(64), nullable=True),
        sa.Column("certificate_sha256", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_reason", sa.String(256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("valid_from < valid_until", name=op.f("ck_credentials_validity_order")),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_credentials_status")),
        sa.CheckConstraint(
            "(status = 'active' AND revoked_at IS NULL) OR (status = 'revoked' AND revoked_at IS NOT NULL)",
            name=op.f("ck_credentials_revocation"),
        ),
        sa.CheckConstraint(
            "(verified_at IS NULL AND verified_by IS NULL) OR (verified_at IS NOT NULL AND verified_by IS NOT NULL)",
            name=op.f("ck_credentials_verification"),
        ),
        sa.CheckConstraint(
            "certificate_sha256 IS NULL OR length(certificate_sha256) = 64",
            name=op.f("ck_credentials_certificate_sha256"),
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_credentials_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credentials")),
    )
    op.create_index("ix_credentials_account_id", "credentials", ["account_id"])

    op.create_table(
        "agent_rings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("rung_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('answered', 'no_answer', 'caller_gone', 'released', 'failed')",
            name=op.f("ck_agent_rings_outcome"),
        ),
        sa.CheckConstraint(
            "(ended_at IS NULL AND outcome IS NULL) OR (ended_at IS NOT NULL AND outcome IS NOT NULL)",
            name=op.f("ck_agent_rings_ended"),
        ),
        sa.ForeignKeyConstraint(["account_id"], ["agents.account_id"], name=op.f("fk_agent_rings_account_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_rings")),
    )
    op.create_index("ix_agent_rings_call_id", "agent_rings", ["call_id"])
    op.create_index("ix_agent_rings_account_id", "agent_rings", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_agent_rings_account_id", table_name="agent_rings")
    op.drop_index("ix_agent_rings_call_id", table_name="agent_rings")
    op.drop_table("agent_rings")
    op.drop_index("ix_credentials_account_id", table_name="credentials")
    op.drop_table("credentials")
    op.drop_table("agent_skills")
    op.drop_index("ix_agents_reserved_call_id", table_name="agents")
    op.drop_table("agents")
