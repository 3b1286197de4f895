"""Create the recordings, signed call records and pending call notes tables.

The database itself guards what the law guards (a bug or a hand-written SQL statement in the service can't
undo it):

- ``call_records`` is append-only: UPDATE and DELETE (and TRUNCATE on PostgreSQL) are refused. An archived
  record is amended by a new record that references it, never changed.
- ``recordings`` rows are never deleted (a purged recording leaves a tombstone with its digests); once a
  recording is stored its digests and path can't be rewritten; and no row may become ``purged`` before
  its retention date or while on legal hold.

Revision ID: 0008_recordings
Revises: 0007_access
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008_recordings"
down_revision: str | None = "0007_access"
branch_labels: str | None = None
depends_on: str | None = None

# Columns fixed once a recording is stored: rewriting any of them would detach the row from its file. The wrapped
# key is not among them: a KEK rotation rewraps it (the data key inside, hence the file, stays the same, and a
# wrapped key altered any other way fails to unwrap).
FIXED_WHEN_STORED = ("plain_sha256", "cipher_sha256", "plain_size", "cipher_size", "path", "call_id")

PG_RECORDS_FUNCTION = """
CREATE FUNCTION call_records_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'medhotline records: % on % refused: signed call records are append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""

PG_RECORDINGS_FUNCTION = """
CREATE FUNCTION recordings_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'medhotline recordings: DELETE refused: a purged recording keeps its row'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.state IN ('stored', 'purged') AND ({changed}) THEN
        RAISE EXCEPTION 'medhotline recordings: % of a stored recording''s digests or path refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (OLD.state = 'stored' AND NEW.state NOT IN ('stored', 'purged'))
       OR (OLD.state = 'purged' AND NEW.state <> 'purged') THEN
        RAISE EXCEPTION 'medhotline recordings: % of a stored recording''s state to % refused', TG_OP, NEW.state
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.state IN ('stored', 'purged')
       AND (NEW.retain_until IS NULL OR NEW.retain_until < OLD.retain_until) THEN
        RAISE EXCEPTION 'medhotline recordings: shortening the retention of a stored recording refused'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.state = 'purged' AND OLD.state <> 'purged'
       AND (NEW.legal_hold OR OLD.legal_hold OR OLD.retain_until IS NULL OR OLD.retain_until > now()) THEN
        RAISE EXCEPTION 'medhotline recordings: purge before the retention date or under legal hold refused'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$
"""


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("department", sa.String(64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("kek_version", sa.Integer(), nullable=True),
        sa.Column("plain_sha256", sa.String(64), nullable=True),
        sa.Column("cipher_sha256", sa.String(64), nullable=True),
        sa.Column("plain_size", sa.BigInteger(), nullable=True),
        sa.Column("cipher_size", sa.BigInteger(), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("path", sa.String(255), nullable=True),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("spool_removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retention_class", sa.String(16), nullable=True),
        sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("legal_hold", sa.Boolean(), nullable=False),
        sa.Column("hold_reason", sa.String(500), nullable=True),
        sa.Column("hold_by", sa.String(64), nullable=True),
        sa.Column("held_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_by", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('capturing', 'finished', 'stored', 'purged', 'missing')", name=op.f("ck_recordings_state")
        ),
        sa.CheckConstraint("kind IN ('conversation', 'ivr', 'consent')", name=op.f("ck_recordings_kind")),
        sa.CheckConstraint(
            "state <> 'stored' OR (cipher_sha256 IS NOT NULL AND plain_sha256 IS NOT NULL AND path IS NOT NULL "
            "AND retain_until IS NOT NULL AND wrapped_key IS NOT NULL)",
            name=op.f("ck_recordings_stored_complete"),
        ),
        sa.CheckConstraint("NOT legal_hold OR hold_reason IS NOT NULL", name=op.f("ck_recordings_hold_has_reason")),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], name=op.f("fk_recordings_call_id_calls")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recordings")),
        sa.UniqueConstraint("name", name=op.f("uq_recordings_name")),
    )
    op.create_index("ix_recordings_call_id", "recordings", ["call_id"])
    op.create_index("ix_recordings_state", "recordings", ["state"])
    op.create_index("ix_recordings_retain_until", "recordings", ["retain_until"])

    op.create_table(
        "call_records",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amends", sa.String(36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("header", sa.Text(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("signing_key_id", sa.String(64), nullable=False),
        sa.Column("timestamp_token", sa.LargeBinary(), nullable=False),
        sa.Column("timestamped_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body_token", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.CheckConstraint("kind IN ('call_summary', 'consent', 'amendment')", name=op.f("ck_call_records_kind")),
        sa.CheckConstraint(
            "kind <> 'amendment' OR amends IS NOT NULL", name=op.f("ck_call_records_amendment_names_original")
        ),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], name=op.f("fk_call_records_call_id_calls")),
        sa.ForeignKeyConstraint(["amends"], ["call_records.id"], name=op.f("fk_call_records_amends_call_records")),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"], name=op.f("fk_call_records_data_key_id_data_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_records")),
    )
    op.create_index("ix_call_records_call_id", "call_records", ["call_id"])
    op.create_index("ix_call_records_amends", "call_records", ["amends"])
    # One summary per call, whoever seals it (the wrap-up timer, a resumed seal on another node).
    op.create_index(
        "uq_call_records_one_summary",
        "call_records",
        ["call_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'call_summary'"),
        postgresql_where=sa.text("kind = 'call_summary'"),
    )

    op.create_table(
        "call_notes",
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note_token", sa.Text(), nullable=False),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("sealed_in", sa.String(36), nullable=True),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], name=op.f("fk_call_notes_call_id_calls")),
        sa.ForeignKeyConstraint(["data_key_id"], ["data_keys.id"], name=op.f("fk_call_notes_data_key_id_data_keys")),
        sa.ForeignKeyConstraint(["sealed_in"], ["call_records.id"], name=op.f("fk_call_notes_sealed_in_call_records")),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_call_notes")),
    )

    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_RECORDS_FUNCTION)
        op.execute(
            "CREATE TRIGGER call_records_append_only BEFORE UPDATE OR DELETE ON call_records "
            "FOR EACH ROW EXECUTE FUNCTION call_records_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER call_records_no_truncate BEFORE TRUNCATE ON call_records "
            "FOR EACH STATEMENT EXECUTE FUNCTION call_records_refuse_change()"
        )
        op.execute("REVOKE UPDATE, DELETE, TRUNCATE ON call_records FROM PUBLIC")
        changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in FIXED_WHEN_STORED)
        op.execute(PG_RECORDINGS_FUNCTION.replace("{changed}", changed))
        op.execute(
            "CREATE TRIGGER recordings_guard BEFORE UPDATE OR DELETE ON recordings "
            "FOR EACH ROW EXECUTE FUNCTION recordings_guard()"
        )
        op.execute(
            "CREATE TRIGGER recordings_no_truncate BEFORE TRUNCATE ON recordings "
            "FOR EACH STATEMENT EXECUTE FUNCTION call_records_refuse_change()"
        )
    elif dialect == "sqlite":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER call_records_no_{operation.lower()} BEFORE {operation} ON call_records "
                f"BEGIN SELECT RAISE(ABORT, 'medhotline records: {operation} on call_records refused: "
                "signed call records are append-only'); END"
            )
        op.execute(
            "CREATE TRIGGER recordings_no_delete BEFORE DELETE ON recordings "
            "BEGIN SELECT RAISE(ABORT, 'medhotline recordings: DELETE refused: a purged recording keeps its row'); END"
        )
        changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in FIXED_WHEN_STORED)
        op.execute(
            "CREATE TRIGGER recordings_fixed_when_stored BEFORE UPDATE ON recordings "
            f"WHEN OLD.state IN ('stored', 'purged') AND ({changed}) "
            "BEGIN SELECT RAISE(ABORT, 'medhotline recordings: UPDATE of a stored recording''s digests or path "
            "refused'); END"
        )
        op.execute(
            "CREATE TRIGGER recordings_state_forward BEFORE UPDATE OF state ON recordings "
            "WHEN (OLD.state = 'stored' AND NEW.state NOT IN ('stored', 'purged')) "
            "OR (OLD.state = 'purged' AND NEW.state <> 'purged') "
            "BEGIN SELECT RAISE(ABORT, 'medhotline recordings: UPDATE of a stored recording''s state refused'); END"
        )
        op.execute(
            "CREATE TRIGGER recordings_retention_not_shortened BEFORE UPDATE OF retain_until ON recordings "
            "WHEN OLD.state IN ('stored', 'purged') "
            "AND (NEW.retain_until IS NULL OR NEW.retain_until < OLD.retain_until) "
            "BEGIN SELECT RAISE(ABORT, 'medhotline recordings: shortening the retention of a stored recording "
            "refused'); END"
        )
        # SQLite stores UTC as 'YYYY-MM-DD HH:MM:SS[.ffffff]' text (see ground.models.UTCDateTime).
        op.execute(
            "CREATE TRIGGER recordings_retention BEFORE UPDATE OF state ON recordings "
            "WHEN NEW.state = 'purged' AND OLD.state <> 'purged' AND (NEW.legal_hold OR OLD.legal_hold "
            "OR OLD.retain_until IS NULL OR OLD.retain_until > strftime('%Y-%m-%d %H:%M:%f', 'now')) "
            "BEGIN SELECT RAISE(ABORT, 'medhotline recordings: purge before the retention date or under legal hold "
            "refused'); END"
        )


def downgrade() -> None:
    bind = op.get_bind()
    for table in ("call_records", "recordings"):
        count = bind.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()  # noqa: S608 - fixed names
        if count:
            raise RuntimeError(f"refusing to drop {table}: it holds {count} rows of the medical record")
    dialect = bind.dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS recordings_no_truncate ON recordings")
        op.execute("DROP TRIGGER IF EXISTS recordings_guard ON recordings")
        op.execute("DROP TRIGGER IF EXISTS call_records_no_truncate ON call_records")
        op.execute("DROP TRIGGER IF EXISTS call_records_append_only ON call_records")
        op.execute("DROP FUNCTION IF EXISTS recordings_guard()")
        op.execute("DROP FUNCTION IF EXISTS call_records_refuse_change()")
    op.drop_table("call_notes")
    op.drop_table("call_records")
    op.drop_index("ix_recordings_retain_until", table_name="recordings")
    op.drop_index("ix_recordings_state", table_name="recordings")
    op.drop_index("ix_recordings_call_id", table_name="recordings")
    op.drop_table("recordings")
