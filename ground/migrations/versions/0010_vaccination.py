"""Create the vaccination tables: vaccines, clinics, time slots with a capacity, and bookings.

See ``scheduler.vaccination_tables`` for what each holds. The schema refuses an overbooked slot
(``booked <= capacity``, ``booked >= 0``) and a second upcoming booking of one patient for one vaccine (a unique
index limited to ``state = 'booked'``), so a bug or a hand-written statement can't break either rule.

Revision ID: 0010_vaccination
Revises: 0009_outreach
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010_vaccination"
down_revision: str | None = "0009_outreach"
branch_labels: str | None = None
depends_on: str | None = None

# The condition of the partial unique index (one upcoming booking per patient and vaccine).
ACTIVE_BOOKING = "state = 'booked'"


def upgrade() -> None:
    op.create_table(
        "vaccines",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("doses", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("doses BETWEEN 1 AND 10", name=op.f("ck_vaccines_doses")),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_vaccines")),
    )
    op.create_table(
        "clinics",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_clinics")),
    )
    op.create_table(
        "vaccination_slots",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("clinic", sa.String(length=32), nullable=False),
        sa.Column("vaccine", sa.String(length=32), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("booked", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("capacity BETWEEN 1 AND 10000", name=op.f("ck_vaccination_slots_capacity")),
        sa.CheckConstraint("booked >= 0 AND booked <= capacity", name=op.f("ck_vaccination_slots_booked")),
        sa.CheckConstraint("ends_at > starts_at", name=op.f("ck_vaccination_slots_period")),
        sa.ForeignKeyConstraint(["clinic"], ["clinics.code"], name=op.f("fk_vaccination_slots_clinic_clinics")),
        sa.ForeignKeyConstraint(["vaccine"], ["vaccines.code"], name=op.f("fk_vaccination_slots_vaccine_vaccines")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vaccination_slots")),
        sa.UniqueConstraint(
            "clinic", "vaccine", "starts_at", name=op.f("uq_vaccination_slots_clinic_vaccine_starts_at")
        ),
    )
    op.create_index("ix_vaccination_slots_starts_at", "vaccination_slots", ["starts_at"], unique=False)
    op.create_table(
        "vaccination_bookings",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("slot_id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=128), nullable=False),
        sa.Column("vaccine", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_by", sa.String(length=128), nullable=True),
        sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changed_from", sa.String(length=36), nullable=True),
        sa.CheckConstraint("state IN ('booked', 'cancelled', 'past')", name=op.f("ck_vaccination_bookings_state")),
        sa.CheckConstraint(
            "(state = 'cancelled') = (cancelled_at IS NOT NULL)", name=op.f("ck_vaccination_bookings_cancelled")
        ),
        sa.ForeignKeyConstraint(
            ["changed_from"],
            ["vaccination_bookings.id"],
            name=op.f("fk_vaccination_bookings_changed_from_vaccination_bookings"),
        ),
        sa.ForeignKeyConstraint(
            ["slot_id"], ["vaccination_slots.id"], name=op.f("fk_vaccination_bookings_slot_id_vaccination_slots")
        ),
        sa.ForeignKeyConstraint(["vaccine"], ["vaccines.code"], name=op.f("fk_vaccination_bookings_vaccine_vaccines")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vaccination_bookings")),
    )
    op.create_index(
        "ix_vaccination_bookings_patient_id_vaccine",
        "vaccination_bookings",
        ["patient_id", "vaccine"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_BOOKING),
        postgresql_where=sa.text(ACTIVE_BOOKING),
    )
    op.create_index("ix_vaccination_bookings_patient_id", "vaccination_bookings", ["patient_id"], unique=False)
    op.create_index("ix_vaccination_bookings_slot_id", "vaccination_bookings", ["slot_id"], unique=False)


def downgrade() -> None:
    op.drop_table("vaccination_bookings")
    op.drop_table("vaccination_slots")
    op.drop_table("clinics")
    op.drop_table("vaccines")
