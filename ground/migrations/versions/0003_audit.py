"""Create the append-only audit store: entries (Merkle leaves) and signed tree heads.

The tables belong to ``compliance.audit.AUDIT_METADATA``, not to the business models; they are spelled out
here so the migration keeps creating the schema as it was at this revision. Triggers refuse UPDATE and DELETE
(and TRUNCATE on PostgreSQL), so even a buggy or compromised service can only append.

Revision ID: 0003_audit
Revises: 0002_call_paths
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_audit"
down_revision: str | None = "0002_call_paths"
branch_labels: str | None = None
depends_on: str | None = None

AUDIT_TABLES = ("audit_entries", "audit_heads")

PG_FUNCTION = """
CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'medhotline audit: % on % refused: the audit log is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "audit_entries",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        # Stored exactly as hashed into the leaf (fixed-width UTC ISO-8601 text, so it also sorts).
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        # The patient's blind id (hex), never a name or phone number.
        sa.Column("patient", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_entries")),
    )
    op.create_index("ix_audit_entries_patient", "audit_entries", ["patient"])
    op.create_index("ix_audit_entries_actor", "audit_entries", ["actor"])
    op.create_index("ix_audit_entries_at", "audit_entries", ["at"])
    op.create_table(
        "audit_heads",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("timestamp", sa.String(32), nullable=False),
        sa.Column("signature", sa.LargeBinary(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_audit_heads")),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_FUNCTION)
        for table in AUDIT_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
            )
            # Row triggers do not fire on TRUNCATE.
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()"
            )
            op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM PUBLIC")
    elif dialect == "sqlite":
        for table in AUDIT_TABLES:
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'medhotline audit: {operation} on {table} refused: "
                    "the audit log is append-only'); END"
                )


def downgrade() -> None:
    # Dropping the audit trail destroys evidence: only an empty one may go.
    bind = op.get_bind()
    count = bind.execute(sa.text("SELECT COUNT(*) FROM audit_entries")).scalar_one()
    if count:
        raise RuntimeError(f"refusing to drop the audit log: it holds {count} entries; archive it first")
    dialect = bind.dialect.name
    for table in AUDIT_TABLES:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        elif dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_refuse_change()")
    op.drop_table("audit_heads")
    op.drop_index("ix_audit_entries_at", table_name="audit_entries")
    op.drop_index("ix_audit_entries_actor", table_name="audit_entries")
    op.drop_index("ix_audit_entries_patient", table_name="audit_entries")
    op.drop_table("audit_entries")
