"""Vaccination bookings made by staff: the booking, then its audit entry, as one service call.

``medhotline vaccination book|cancel|change`` only parse, call a :class:`BookingDesk` method and print. The desk
checks that the patient is in the registry (through the :class:`PatientRefs` port: ``scheduler`` does not import
``his``), changes the booking in :class:`scheduler.vaccination.VaccinationStore`, and appends one ``change`` audit
entry with the booking and slot ids (no patient reference) for whoever made it. The patient's own bookings on the
phone go through ``scheduler.call_actions`` with the system actor instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Final, Literal, Protocol

from compliance.audit import AuditLog, SqlAuditStore
from ground.errors import CommandError
from scheduler.vaccination import BookingRecord, VaccinationStore, audit_booking_change

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

STAFF_ROLE: Final = "operator"


class PatientRefs(Protocol):
    """The patient registry as bookings need it: raise (a ``MedhotlineError``) for an id it does not hold."""

    def ref(self, patient_id: str) -> object: ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class BookingDesk:
    """Book, cancel and change a patient's vaccination bookings on behalf of staff, each audited."""

    store: VaccinationStore
    audit: AuditLog
    patients: PatientRefs
    role: str = STAFF_ROLE
    clock: Callable[[], datetime] = field(default=_utc_now)

    @classmethod
    def for_engine(cls, engine: Engine, patients: PatientRefs) -> BookingDesk:
        return cls(VaccinationStore.for_engine(engine), AuditLog(SqlAuditStore(engine)), patients)

    def book(
        self,
        patient_id: str,
        *,
        actor: str,
        slot_id: str | None = None,
        day: date | None = None,
        part: str | None = None,
        vaccine: str | None = None,
    ) -> BookingRecord:
        """A seat in ``slot_id``, or the earliest free one on ``day`` in ``part`` (morning/afternoon)."""
        self.patients.ref(patient_id)  # in the registry (by opaque id; nothing is decrypted)
        if slot_id is not None:
            booking = self.store.book(patient_id, slot_id, self.clock())
        elif day is not None and part is not None:
            booking = self.store.book_day_part(patient_id, vaccine, day, part, self.clock())
        else:
            raise CommandError("book needs --slot SLOT_ID, or --date YYYY-MM-DD with --part morning|afternoon")
        self._audit(actor, "book", booking)
        return booking

    def cancel(self, booking_id: str, *, actor: str) -> BookingRecord:
        """Cancel and free the seat; refused, naming the state, when the booking is not booked any more."""
        if not self.store.cancel(booking_id, self.clock(), actor):
            state = self.store.booking(booking_id).state
            raise CommandError(f"booking {booking_id} is {state}: nothing cancelled")
        booking = self.store.booking(booking_id)
        self._audit(actor, "cancel", booking)
        return booking

    def change(self, booking_id: str, slot_id: str, *, actor: str) -> BookingRecord:
        """Move the booking to ``slot_id``; the new booking, ``changed_from`` the old."""
        booking = self.store.change(booking_id, slot_id, self.clock(), actor)
        self._audit(actor, "change", booking, changed_from=booking_id)
        return booking

    def _audit(
        self,
        actor: str,
        operation: Literal["book", "cancel", "change"],
        booking: BookingRecord,
        changed_from: str | None = None,
    ) -> None:
        audit_booking_change(
            self.audit,
            actor=actor,
            role=self.role,
            operation=operation,
            booking_id=booking.id,
            slot_id=booking.slot_id,
            changed_from=changed_from,
        )
