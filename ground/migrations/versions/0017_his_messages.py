"""HIS messages: patient merges (ADT^A40) and the HIS's answer to an appointment.

``patients.merged_into``: set on a patient the HIS merged into another (ADT^A40). The row stays, so its history
(audit entries under its blind id, bookings and readings under its id) is kept, and its record number still
finds it; the registry resolves it to the survivor. A merged row is no longer found by phone.

``vaccination_bookings.his_state`` / ``his_control_id`` / ``his_reason``: an appointment sent to the HIS (SIU)
is ``requested`` until the HIS acknowledges it (``confirmed``) or refuses it (``refused``, with the location and
code of the refusal, never the HIS's free text). NULL: no HIS connected when it was booked.

Revision ID: 0017_his_messages
Revises: 0016_cluster_leases
Create Date: 2026-12-11
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0017_his_messages"
down_revision: str | None = "0016_cluster_leases"
branch_labels: str | None = None
depends_on: str | None = None

HIS_STATES = "his_state IS NULL OR his_state IN ('requested', 'confirmed', 'refused')"


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("merged_into", sa.String(36), nullable=True))
        batch.create_index("ix_patients_merged_into", ["merged_into"])
    with op.batch_alter_table("vaccination_bookings") as batch:
        batch.add_column(sa.Column("his_state", sa.String(12), nullable=True))
        batch.add_column(sa.Column("his_control_id", sa.String(20), nullable=True))
        batch.add_column(sa.Column("his_reason", sa.String(120), nullable=True))
        batch.create_check_constraint("his_state", HIS_STATES)
        batch.create_index("uq_vaccination_bookings_his_control_id", ["his_control_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("vaccination_bookings") as batch:
        batch.drop_index("uq_vaccination_bookings_his_control_id")
        batch.drop_constraint(op.f("ck_vaccination_bookings_his_state"), type_="check")
        batch.drop_column("his_reason")
        batch.drop_column("his_control_id")
        batch.drop_column("his_state")
    with op.batch_alter_table("patients") as batch:
        batch.drop_index("ix_patients_merged_into")
        batch.drop_column("merged_into")
