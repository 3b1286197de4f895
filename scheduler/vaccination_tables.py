"""Vaccination tables (migration ``0010_vaccination``): vaccines, clinics, time slots with a capacity, bookings.

The database itself guards what must never happen, whichever node, tool or hand-written statement writes:

- a slot is never overbooked: ``CHECK (booked >= 0 AND booked <= capacity)``. The service books with one
  conditional UPDATE (``booked < capacity``) and cancels with a decrement in the same transaction as the booking's
  state change; the CHECK is the last line should anything else ever touch the counter;
- a patient holds at most one upcoming booking per vaccine: a unique index over ``(patient_id, vaccine)`` limited
  to ``state = 'booked'`` (a partial index, on SQLite and PostgreSQL alike), so two concurrent bookings of the same
  patient can't both commit;
- a cancelled booking says when (``cancelled_at``), and only a cancelled one does.

Patients are named by the registry's opaque id only. ``vaccine`` is copied from the slot onto the booking so the
partial unique index can cover it (a slot's vaccine never changes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from ground.models import Base, UTCDateTime

BookingState = Literal["booked", "cancelled", "past"]
# ``past``: the appointment's time has gone by while the booking was active. The hotline does not know whether the
# patient came (the clinic's records do); it only stops counting the booking as the patient's upcoming one, so the
# next dose or next season's vaccination can be booked. The seat stays counted in the slot's ``booked``.
BOOKING_STATES: Final[tuple[BookingState, ...]] = ("booked", "cancelled", "past")
HisState = Literal["requested", "confirmed", "refused"]
HIS_STATE_CHECK: Final = "his_state IS NULL OR his_state IN ('requested', 'confirmed', 'refused')"
# The one-upcoming-booking-per-vaccine rule, as the partial unique index's condition.
ACTIVE_BOOKING: Final = "state = 'booked'"


class Vaccine(Base):
    __tablename__ = "vaccines"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # Doses in the full course (informational: each dose is booked on its own, one upcoming booking at a time).
    doses: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (CheckConstraint("doses BETWEEN 1 AND 10", name="doses"),)


class Clinic(Base):
    __tablename__ = "clinics"

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    # The department code (compliance.access) whose staff work the clinic's bookings.
    department: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VaccinationSlot(Base):
    __tablename__ = "vaccination_slots"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    clinic: Mapped[str] = mapped_column(String(32), ForeignKey("clinics.code"))
    vaccine: Mapped[str] = mapped_column(String(32), ForeignKey("vaccines.code"))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime())
    capacity: Mapped[int] = mapped_column(Integer)
    booked: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("capacity BETWEEN 1 AND 10000", name="capacity"),
        CheckConstraint("booked >= 0 AND booked <= capacity", name="booked"),
        CheckConstraint("ends_at > starts_at", name="period"),
        # The same clinic can't offer the same vaccine twice at the same start (a slot added twice by mistake).
        UniqueConstraint("clinic", "vaccine", "starts_at"),
        Index("ix_vaccination_slots_starts_at", "starts_at"),
    )


class VaccinationBooking(Base):
    __tablename__ = "vaccination_bookings"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    slot_id: Mapped[str] = mapped_column(String(36), ForeignKey("vaccination_slots.id"))
    patient_id: Mapped[str] = mapped_column(String(128))
    vaccine: Mapped[str] = mapped_column(String(32), ForeignKey("vaccines.code"))
    state: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The account (CLI, staff) or channel ("ivr") that cancelled or changed the booking.
    cancelled_by: Mapped[str | None] = mapped_column(String(128))
    # When the day-before reminder was handed to the outbox; set once, so a reminder is sent once.
    reminded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The booking this one replaced (a change is the old one cancelled and this one made, in one transaction).
    changed_from: Mapped[str | None] = mapped_column(String(36), ForeignKey("vaccination_bookings.id"))
    # The HIS's view of the booking (migration 0017): ``requested`` once its SIU is queued in the HIS outbox,
    # ``confirmed`` on the HIS's AA, ``refused`` on AR (or AE after the last retry) with where and why
    # (``his_reason``: location and code, never the HIS's free text). NULL: booked without a HIS.
    his_state: Mapped[str | None] = mapped_column(String(12))
    # MSH-10 of the last message about this booking (S12, S13 or S15): the HIS's answer is matched by it.
    his_control_id: Mapped[str | None] = mapped_column(String(20))
    his_reason: Mapped[str | None] = mapped_column(String(120))

    __table_args__ = (
        CheckConstraint("state IN ('booked', 'cancelled', 'past')", name="state"),
        CheckConstraint(HIS_STATE_CHECK, name="his_state"),
        Index("uq_vaccination_bookings_his_control_id", "his_control_id", unique=True),
        CheckConstraint("(state = 'cancelled') = (cancelled_at IS NOT NULL)", name="cancelled"),
        Index(
            "ix_vaccination_bookings_patient_id_vaccine",
            "patient_id",
            "vaccine",
            unique=True,
            sqlite_where=text(ACTIVE_BOOKING),
            postgresql_where=text(ACTIVE_BOOKING),
        ),
        Index("ix_vaccination_bookings_patient_id", "patient_id"),
        Index("ix_vaccination_bookings_slot_id", "slot_id"),
    )
