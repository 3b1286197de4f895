"""Create the wrapped data keys and the patient registry with encrypted identifiers and blind indexes (his).

``data_keys`` holds data keys only in wrapped form (the key service alone can unwrap them). ``patients`` holds
every identifying value as an AES-256-GCM token (``*_enc``) whose associated data binds table, column and row id;
lookups go through keyed HMAC blind indexes (``*_bidx``), never through a value in clear. ``department`` is
operational (routing and access scope) and stays in clear.

Depends only on tables created here (not on 0005), so the routing and the registry migrations can evolve
independently.

Revision ID: 0006_patients
Revises: 0005_agents
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006_patients"
down_revision: str | None = "0005_agents"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Spelled out rather than imported from the models: the migration keeps creating the schema of this revision.
    op.create_table(
        "data_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("purpose", sa.String(48), nullable=False),
        # The version byte of the FieldCipher tokens written under this key (1-255 per purpose).
        sa.Column("version", sa.Integer(), nullable=False),
        # format | KEK version | nonce | AES-GCM(KEK, data key): useless without the key service.
        sa.Column("wrapped", sa.LargeBinary(128), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rewrapped_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("version >= 1 AND version <= 255", name=op.f("ck_data_keys_version")),
        sa.CheckConstraint("kek_version >= 1", name=op.f("ck_data_keys_kek_version")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_keys")),
    )
    op.create_index("uq_data_keys_purpose_version", "data_keys", ["purpose", "version"], unique=True)
    op.create_index("ix_data_keys_kek_version", "data_keys", ["kek_version"])

    op.create_table(
        "patients",
        sa.Column("id", sa.String(36), nullable=False),
        # Keyed HMAC of the patient id: how the audit trail names the patient.
        sa.Column("blind_id", sa.String(64), nullable=False),
        # Keyed HMAC of the normalised phone number; not unique, a family may share one phone.
        sa.Column("phone_bidx", sa.String(64), nullable=False),
        # Keyed HMAC of the HIS record number; unique when present (the HIS's own key for the patient).
        sa.Column("record_bidx", sa.String(64), nullable=True),
        sa.Column("name_enc", sa.Text(), nullable=False),
        sa.Column("phone_enc", sa.Text(), nullable=False),
        sa.Column("national_id_enc", sa.Text(), nullable=True),
        sa.Column("record_number_enc", sa.Text(), nullable=True),
        sa.Column("birth_year_enc", sa.Text(), nullable=True),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("department", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(record_bidx IS NULL) = (record_number_enc IS NULL)", name=op.f("ck_patients_record_number_indexed")
        ),
        sa.ForeignKeyConstraint(
            ["data_key_id"], ["data_keys.id"], name=op.f("fk_patients_data_key_id_data_keys"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
    )
    op.create_index("ix_patients_phone_bidx", "patients", ["phone_bidx"])
    op.create_index("uq_patients_record_bidx", "patients", ["record_bidx"], unique=True)
    op.create_index("uq_patients_blind_id", "patients", ["blind_id"], unique=True)
    op.create_index("ix_patients_data_key_id", "patients", ["data_key_id"])


def downgrade() -> None:
    op.drop_index("ix_patients_data_key_id", table_name="patients")
    op.drop_index("uq_patients_blind_id", table_name="patients")
    op.drop_index("uq_patients_record_bidx", table_name="patients")
    op.drop_index("ix_patients_phone_bidx", table_name="patients")
    op.drop_table("patients")
    op.drop_index("ix_data_keys_kek_version", table_name="data_keys")
    op.drop_index("uq_data_keys_purpose_version", table_name="data_keys")
    op.drop_table("data_keys")
