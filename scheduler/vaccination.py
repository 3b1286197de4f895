"""Vaccination booking: vaccines, clinics, time slots with a capacity, and bookings that never overbook.

Every rule that must hold under concurrency is a conditional write, never a read followed by a write:

- **book**: ``UPDATE vaccination_slots SET booked = booked + 1 WHERE id = :id AND booked < capacity``; a row count
  of 0 means full (:class:`SlotFull`, naming the slot). The booking row is inserted in the same transaction, so a
  failed insert gives the seat back. On PostgreSQL (READ COMMITTED) an UPDATE that waited for another's row lock
  re-checks its WHERE against the committed row; on SQLite the database's write lock serialises writers. The
  schema's ``CHECK (booked <= capacity)`` is the last line.
- **cancel**: ``UPDATE vaccination_bookings SET state = 'cancelled' … WHERE id = :id AND state = 'booked'`` and,
  only when that changed a row, the slot's decrement, in one transaction: a double cancel frees one seat.
- **change**: the cancel and the book of the new slot in one transaction; a full new slot rolls everything back.
- **one upcoming booking per patient and vaccine**: a partial unique index (``state = 'booked'``); the check before
  the insert only makes the usual refusal name the existing booking, the index decides a race.

Lock order, to keep PostgreSQL free of deadlocks: a transaction locks booking rows first (the booking it cancels
or changes; the patient's upcoming booking of the vaccine it books, ``FOR UPDATE``), then slot rows in ascending id
order (:func:`_slot_lock_order`; the race tests show that locking the old slot before the new one deadlocks when
two changes go in opposite directions). A deadlock PostgreSQL still detected would abort one transaction cleanly
(DatabaseError), never half-apply it.

A booking whose slot has ended becomes ``past`` (lazily, when the patient books that vaccine again, or by
:meth:`VaccinationStore.close_past`): it no longer blocks the next dose or the next season's booking, and its seat
stays counted. Invariant, checked by the tests: a slot's ``booked`` equals its bookings in ``booked`` or ``past``.

Times are stored in UTC; days, mornings and afternoons are the hospital's local time (:data:`LOCAL_TZ`, the
scheduler's, ``Asia/Shanghai``: the configuration has no time zone setting). Morning is a slot *starting* before
12:00 local, afternoon one starting at or after 12:00.

Patients are named by the registry's opaque id only, checked on the way in; no error message or log line names one.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Final, Literal, TypeAlias, get_args

from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compliance.access import AccessError, check_department, check_patient_id
from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from ground.logs import get_logger
from scheduler.policy import LOCAL_TZ
from scheduler.vaccination_tables import Clinic, VaccinationBooking, VaccinationSlot, Vaccine

if TYPE_CHECKING:
    from compliance.audit import AuditLog
    from scheduler.tasks import TaskStore

__all__ = [
    "ADVERSE_REACTION_ROLE",
    "LOCAL_TZ",
    "AlreadyBooked",
    "AmbiguousVaccine",
    "BookingNotActive",
    "BookingRecord",
    "ClinicRecord",
    "DayPart",
    "DayPartFull",
    "NoSlot",
    "SlotFull",
    "SlotRecord",
    "TooLate",
    "VaccinationError",
    "VaccinationNotFound",
    "VaccinationStore",
    "VaccineRecord",
    "audit_booking_change",
    "day_part_bounds",
    "local_day_bounds",
    "reminder_text",
    "report_adverse_reaction",
    "send_day_before_reminders",
]

log = get_logger(__name__)

DayPart = Literal["morning", "afternoon"]
DAY_PARTS: Final[tuple[DayPart, ...]] = get_args(DayPart)
NOON: Final = time(12, 0)
# Who works a reported adverse reaction: it needs a clinical assessment, so a physician (any, by role).
ADVERSE_REACTION_ROLE: Final = "physician"
REMINDER_KIND: Final = "vaccination_reminder"
# The SMS signature every hospital message starts with (Chinese carriers require one in 【】).
SMS_SIGNATURE: Final = "【医院】"
CODE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Who cancelled or changed: an account id as the audit log takes it, or a channel ("patient", "ivr").
ACTOR: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}")
MAX_NAME: Final = 100
MAX_SLOTS_AT_ONCE: Final = 500
MAX_MINUTES: Final = 24 * 60


# --- errors -----------------------------------------------------------------------------------------------------


class VaccinationError(MedhotlineError):
    """A vaccination operation refused; the message names the slot, booking, vaccine or field and why."""


class VaccinationNotFound(VaccinationError):
    pass


class SlotFull(VaccinationError):
    """Every seat of the slot is taken (``slot_id``); a :class:`DayPartFull` has no single slot."""

    def __init__(self, message: str, slot_id: str | None = None) -> None:
        super().__init__(message)
        self.slot_id = slot_id


class DayPartFull(SlotFull):
    """Every slot of the vaccine in that morning or afternoon is full (there are slots, none free)."""


class NoSlot(VaccinationError):
    """No slot at all for the vaccine in that morning or afternoon."""


class AmbiguousVaccine(VaccinationError):
    """No vaccine given and several are offered that day: the caller must say which."""


class AlreadyBooked(VaccinationError):
    """The patient already holds an upcoming booking of the vaccine (``booking_id`` when known)."""

    def __init__(self, message: str, booking_id: str | None = None) -> None:
        super().__init__(message)
        self.booking_id = booking_id


class BookingNotActive(VaccinationError):
    """The booking is cancelled or past: nothing to change."""


class TooLate(VaccinationError):
    """The slot has started: it can no longer be booked, cancelled or changed."""


# --- records ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VaccineRecord:
    code: str
    name: str
    doses: int


@dataclass(frozen=True, slots=True)
class ClinicRecord:
    code: str
    name: str
    department: str


@dataclass(frozen=True, slots=True)
class SlotRecord:
    id: str
    clinic: str
    vaccine: str
    starts_at: datetime
    ends_at: datetime
    capacity: int
    booked: int

    @property
    def free(self) -> int:
        return self.capacity - self.booked


@dataclass(frozen=True, slots=True)
class BookingRecord:
    """One booking with its slot's time and place (times aware, UTC)."""

    id: str
    slot_id: str
    patient_id: str
    vaccine: str
    clinic: str
    starts_at: datetime
    ends_at: datetime
    state: str
    created_at: datetime
    cancelled_at: datetime | None
    cancelled_by: str | None
    reminded_at: datetime | None
    changed_from: str | None
    vaccine_name: str
    clinic_name: str


def _slot(row: VaccinationSlot) -> SlotRecord:
    return SlotRecord(row.id, row.clinic, row.vaccine, row.starts_at, row.ends_at, row.capacity, row.booked)


_BookingSelect: TypeAlias = "Select[VaccinationBooking, VaccinationSlot, str, str]"


def _bookings() -> _BookingSelect:
    return (
        select(VaccinationBooking, VaccinationSlot, Vaccine.name, Clinic.name)
        .join(VaccinationSlot, VaccinationSlot.id == VaccinationBooking.slot_id)
        .join(Vaccine, Vaccine.code == VaccinationBooking.vaccine)
        .join(Clinic, Clinic.code == VaccinationSlot.clinic)
    )


def _booking(row: VaccinationBooking, slot: VaccinationSlot, vaccine_name: str, clinic_name: str) -> BookingRecord:
    return BookingRecord(
        id=row.id,
        slot_id=row.slot_id,
        patient_id=row.patient_id,
        vaccine=row.vaccine,
        clinic=slot.clinic,
        starts_at=slot.starts_at,
        ends_at=slot.ends_at,
        state=row.state,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
        cancelled_by=row.cancelled_by,
        reminded_at=row.reminded_at,
        changed_from=row.changed_from,
        vaccine_name=vaccine_name,
        clinic_name=clinic_name,
    )


# --- values -----------------------------------------------------------------------------------------------------


def _aware(at: datetime, what: str = "time") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise VaccinationError(f"{what} {at.isoformat()}: pass a timezone-aware datetime")
    return at


def _code(value: str, what: str) -> str:
    if not isinstance(value, str) or not CODE.fullmatch(value):
        raise VaccinationError(f"{what} code {value!r}: use 1-32 of a-z 0-9 _ - starting with a letter")
    return value


def _name(value: str, what: str) -> str:
    name = value.strip() if isinstance(value, str) else ""
    if not name or len(name) > MAX_NAME or any(ord(c) < 0x20 for c in name):
        raise VaccinationError(f"{what} name: 1-{MAX_NAME} printable characters")
    return name


def _patient(patient_id: str) -> str:
    try:
        return check_patient_id(patient_id)
    except AccessError as exc:
        raise VaccinationError(str(exc)) from None


def _actor(by: str) -> str:
    if not isinstance(by, str) or not ACTOR.fullmatch(by):
        raise VaccinationError("who cancels or changes must be an account id or a channel (A-Z a-z 0-9 _ . : @ / -)")
    return by


def _part(part: str) -> DayPart:
    if part not in DAY_PARTS:
        raise VaccinationError(f"part of day {part!r}: use {' or '.join(DAY_PARTS)}")
    return part


def _local(at: datetime) -> str:
    return f"{at.astimezone(LOCAL_TZ):%Y-%m-%d %H:%M}"


def local_day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of the local day ``day``, in UTC (a day is not always 24 hours where DST exists)."""
    start = datetime.combine(day, time(0), LOCAL_TZ)
    end = datetime.combine(day + timedelta(days=1), time(0), LOCAL_TZ)
    return start.astimezone(UTC), end.astimezone(UTC)


def day_part_bounds(day: date, part: str) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the morning (before 12:00 local) or the afternoon (12:00 on) of ``day``."""
    start, end = local_day_bounds(day)
    noon = datetime.combine(day, NOON, LOCAL_TZ).astimezone(UTC)
    return (start, noon) if _part(part) == "morning" else (noon, end)


def _unique_violation(exc: IntegrityError) -> bool:
    """True for a unique-key violation (PostgreSQL's SQLSTATE 23505, SQLite's "UNIQUE constraint failed")."""
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == "23505")
    return "UNIQUE constraint failed" in str(orig)


# --- the conditional writes ----------------------------------------------------------------------------------


def _slot_lock_order(*slot_ids: str) -> list[str]:
    """The order a transaction updates (hence locks) several slot rows in: ascending id, the same in every
    transaction, so two changes in opposite directions between the same slots never wait for each other."""
    return sorted(slot_ids)


def _take_seat(session: Session, slot_id: str) -> bool:
    """The one conditional UPDATE that books a seat: True if this transaction got one."""
    statement = (
        update(VaccinationSlot)
        .where(VaccinationSlot.id == slot_id, VaccinationSlot.booked < VaccinationSlot.capacity)
        .values(booked=VaccinationSlot.booked + 1)
    )
    return rowcount(session.connection().execute(statement)) == 1


def _free_seat(session: Session, slot_id: str) -> None:
    """Give a seat back (only ever after this transaction cancelled a booking of the slot)."""
    statement = (
        update(VaccinationSlot)
        .where(VaccinationSlot.id == slot_id, VaccinationSlot.booked > 0)
        .values(booked=VaccinationSlot.booked - 1)
    )
    if rowcount(session.connection().execute(statement)) != 1:
        # A booking was active but its slot counts nobody: the counter was changed behind the service's back.
        raise VaccinationError(f"slot {slot_id} counts no booking to give back: its counter and bookings disagree")


def _cancel_row(session: Session, booking_id: str, at: datetime, by: str) -> bool:
    """Mark the booking cancelled if (and only if) it is still booked: the guard against a double cancel."""
    statement = (
        update(VaccinationBooking)
        .where(VaccinationBooking.id == booking_id, VaccinationBooking.state == "booked")
        .values(state="cancelled", cancelled_at=at, cancelled_by=by)
    )
    return rowcount(session.connection().execute(statement)) == 1


# --- the store --------------------------------------------------------------------------------------------------


class VaccinationStore(Repository):
    """Vaccines, clinics, slots and bookings; each public method is one short transaction."""

    # -- catalogue ----------------------------------------------------------------------------------------------
    def add_vaccine(self, code: str, name: str, *, at: datetime, doses: int = 1) -> VaccineRecord:
        _code(code, "vaccine")
        name = _name(name, f"vaccine {code}")
        if not 1 <= doses <= 10:
            raise VaccinationError(f"vaccine {code}: doses must be 1-10, got {doses}")
        with self._transaction(f"adding vaccine {code}") as session:
            if session.get(Vaccine, code) is not None:
                raise VaccinationError(f"vaccine {code} exists already")
            session.add(Vaccine(code=code, name=name, doses=doses, created_at=_aware(at)))
        return VaccineRecord(code, name, doses)

    def add_clinic(self, code: str, name: str, department: str, *, at: datetime) -> ClinicRecord:
        _code(code, "clinic")
        name = _name(name, f"clinic {code}")
        try:
            check_department(department)
        except AccessError as exc:
            raise VaccinationError(f"clinic {code}: {exc}") from None
        with self._transaction(f"adding clinic {code}") as session:
            if session.get(Clinic, code) is not None:
                raise VaccinationError(f"clinic {code} exists already")
            session.add(Clinic(code=code, name=name, department=department, created_at=_aware(at)))
        return ClinicRecord(code, name, department)

    def vaccines(self) -> list[VaccineRecord]:
        with self._transaction("listing vaccines") as session:
            rows = session.scalars(select(Vaccine).order_by(Vaccine.code))
            return [VaccineRecord(r.code, r.name, r.doses) for r in rows]

    def clinics(self) -> list[ClinicRecord]:
        with self._transaction("listing clinics") as session:
            rows = session.scalars(select(Clinic).order_by(Clinic.code))
            return [ClinicRecord(r.code, r.name, r.department) for r in rows]

    # -- slots --------------------------------------------------------------------------------------------------
    def add_slots(
        self,
        clinic: str,
        vaccine: str,
        start: datetime,
        *,
        minutes: int,
        capacity: int,
        at: datetime,
        count: int = 1,
    ) -> list[SlotRecord]:
        """``count`` consecutive slots of ``minutes`` each from ``start``, all or none."""
        _code(clinic, "clinic")
        _code(vaccine, "vaccine")
        _aware(start, "slot start")
        _aware(at)
        if not 1 <= minutes <= MAX_MINUTES:
            raise VaccinationError(f"slot length must be 1-{MAX_MINUTES} minutes, got {minutes}")
        if not 1 <= capacity <= 10000:
            raise VaccinationError(f"slot capacity must be 1-10000, got {capacity}")
        if not 1 <= count <= MAX_SLOTS_AT_ONCE:
            raise VaccinationError(f"slot count must be 1-{MAX_SLOTS_AT_ONCE}, got {count}")
        length = timedelta(minutes=minutes)
        starts = [start + index * length for index in range(count)]
        with self._transaction(f"adding slots of {vaccine} at clinic {clinic}") as session:
            if session.get(Clinic, clinic) is None:
                raise VaccinationNotFound(f"no clinic {clinic}: add it first (`vaccination clinics add`)")
            if session.get(Vaccine, vaccine) is None:
                raise VaccinationNotFound(f"no vaccine {vaccine}: add it first (`vaccination vaccines add`)")
            taken = set(
                session.scalars(
                    select(VaccinationSlot.starts_at).where(
                        VaccinationSlot.clinic == clinic,
                        VaccinationSlot.vaccine == vaccine,
                        VaccinationSlot.starts_at.in_(starts),
                    )
                )
            )
            if taken:
                first = min(taken)
                raise VaccinationError(f"clinic {clinic} already has a {vaccine} slot starting {_local(first)}")
            rows = [
                VaccinationSlot(
                    id=str(uuid.uuid4()),
                    clinic=clinic,
                    vaccine=vaccine,
                    starts_at=slot_start,
                    ends_at=slot_start + length,
                    capacity=capacity,
                    booked=0,
                    created_at=at,
                )
                for slot_start in starts
            ]
            session.add_all(rows)
            return [_slot(row) for row in rows]

    def slot(self, slot_id: str) -> SlotRecord:
        with self._transaction(f"reading slot {slot_id}") as session:
            row = session.get(VaccinationSlot, slot_id)
            if row is None:
                raise VaccinationNotFound(f"no vaccination slot {slot_id}")
            return _slot(row)

    def slots(
        self,
        *,
        day: date | None = None,
        clinic: str | None = None,
        vaccine: str | None = None,
        after: datetime | None = None,
        limit: int = 1000,
    ) -> list[SlotRecord]:
        """Slots in start order: of the local ``day``, ending after ``after``, at ``clinic``, of ``vaccine``."""
        query = select(VaccinationSlot).order_by(VaccinationSlot.starts_at, VaccinationSlot.clinic).limit(limit)
        if day is not None:
            start, end = local_day_bounds(day)
            query = query.where(VaccinationSlot.starts_at >= start, VaccinationSlot.starts_at < end)
        if after is not None:
            query = query.where(VaccinationSlot.ends_at > _aware(after))
        if clinic is not None:
            query = query.where(VaccinationSlot.clinic == clinic)
        if vaccine is not None:
            query = query.where(VaccinationSlot.vaccine == vaccine)
        with self._transaction("listing vaccination slots") as session:
            return [_slot(row) for row in session.scalars(query)]

    # -- booking ------------------------------------------------------------------------------------------------
    def book(self, patient_id: str, slot_id: str, at: datetime) -> BookingRecord:
        """Book one seat of the slot for the patient; raises :class:`SlotFull` (naming the slot), :class:`TooLate`,
        :class:`AlreadyBooked` or :class:`VaccinationNotFound`, and then nothing has changed."""
        _patient(patient_id)
        _aware(at)
        with self._transaction(f"booking slot {slot_id}") as session:
            slot = session.get(VaccinationSlot, slot_id)
            if slot is None:
                raise VaccinationNotFound(f"no vaccination slot {slot_id}")
            if slot.starts_at <= at:
                raise TooLate(f"slot {slot_id} started {_local(slot.starts_at)}: book a later one")
            self._close_past_of(session, patient_id, slot.vaccine, at)
            self._refuse_second(session, patient_id, slot.vaccine)
            if not _take_seat(session, slot_id):
                raise SlotFull(
                    f"slot {slot_id} ({slot.vaccine} at clinic {slot.clinic}, {_local(slot.starts_at)}) is full: "
                    f"all {slot.capacity} seats are booked",
                    slot_id,
                )
            record = self._insert(session, patient_id, slot, at, changed_from=None)
        log.info("vaccination.booked", booking_id=record.id, slot_id=slot_id)
        return record

    def book_day_part(self, patient_id: str, vaccine: str | None, day: date, part: str, at: datetime) -> BookingRecord:
        """Book the earliest slot with a free seat in the morning or afternoon of the local ``day``.

        ``vaccine`` None means the only vaccine offered that day (the IVR does not ask which): with several,
        :class:`AmbiguousVaccine`. No slot at all in that part of the day: :class:`NoSlot`; slots but every one
        full (also when they fill while this runs): :class:`DayPartFull`, a :class:`SlotFull`.
        """
        _patient(patient_id)
        _aware(at)
        start, end = day_part_bounds(day, part)
        with self._transaction(f"finding a {part} slot on {day.isoformat()}") as session:
            if vaccine is None:
                vaccine = self._only_vaccine(session, day, at)
            else:
                _code(vaccine, "vaccine")
                if session.get(Vaccine, vaccine) is None:
                    raise VaccinationNotFound(f"no vaccine {vaccine}")
            candidates = [
                _slot(row)
                for row in session.scalars(
                    select(VaccinationSlot)
                    .where(
                        VaccinationSlot.vaccine == vaccine,
                        VaccinationSlot.starts_at >= start,
                        VaccinationSlot.starts_at < end,
                        VaccinationSlot.starts_at > at,
                    )
                    .order_by(VaccinationSlot.starts_at, VaccinationSlot.id)
                )
            ]
        if not candidates:
            raise NoSlot(f"no {vaccine} slot in the {part} of {day.isoformat()}")
        for candidate in candidates:
            if candidate.free <= 0:
                continue
            try:
                return self.book(patient_id, candidate.id, at)
            except SlotFull:
                continue  # taken since the read: the next one
        raise DayPartFull(f"every {vaccine} slot in the {part} of {day.isoformat()} is full ({len(candidates)} slots)")

    def cancel(self, booking_id: str, at: datetime, by: str) -> bool:
        """Cancel the booking and give its seat back; False (nothing changed) if it was not booked any more.

        Raises :class:`TooLate` once its slot has started, :class:`VaccinationNotFound` for an unknown id.
        """
        _aware(at)
        _actor(by)
        with self._transaction(f"cancelling booking {booking_id}") as session:
            row = session.get(VaccinationBooking, booking_id)
            if row is None:
                raise VaccinationNotFound(f"no vaccination booking {booking_id}")
            if row.state != "booked":
                return False
            slot_id = row.slot_id
            slot = session.get(VaccinationSlot, slot_id)
            if slot is not None and slot.starts_at <= at:
                raise TooLate(f"booking {booking_id}: its slot started {_local(slot.starts_at)}; it can't be cancelled")
            if not _cancel_row(session, booking_id, at, by):
                return False  # cancelled (or changed) meanwhile: that transaction gave the seat back
            _free_seat(session, slot_id)
        log.info("vaccination.cancelled", booking_id=booking_id, slot_id=slot_id)
        return True

    def change(self, booking_id: str, slot_id: str, at: datetime, by: str) -> BookingRecord:
        """Move the booking to another slot of the same vaccine: the old one cancelled (``cancelled_by`` ``by``)
        and a new one (``changed_from`` the old) made, in one transaction. If the new slot is full
        (:class:`SlotFull`) or anything else is refused, nothing changes."""
        _aware(at)
        _actor(by)
        with self._transaction(f"changing booking {booking_id} to slot {slot_id}") as session:
            old = session.get(VaccinationBooking, booking_id)
            if old is None:
                raise VaccinationNotFound(f"no vaccination booking {booking_id}")
            if old.state != "booked":
                raise BookingNotActive(f"booking {booking_id} is {old.state}: nothing to change")
            old_slot = session.get(VaccinationSlot, old.slot_id)
            new_slot = session.get(VaccinationSlot, slot_id)
            if old_slot is None or new_slot is None:
                raise VaccinationNotFound(f"no vaccination slot {slot_id if new_slot is None else old.slot_id}")
            self._check_change(old, old_slot, new_slot, at)
            patient_id = old.patient_id
            if not _cancel_row(session, booking_id, at, by):
                raise BookingNotActive(f"booking {booking_id} was cancelled or changed meanwhile: nothing changed")
            for locked in _slot_lock_order(old_slot.id, new_slot.id):
                if locked == old_slot.id:
                    _free_seat(session, locked)
                elif not _take_seat(session, locked):
                    raise SlotFull(
                        f"slot {slot_id} ({new_slot.vaccine} at clinic {new_slot.clinic}, "
                        f"{_local(new_slot.starts_at)}) is full: booking {booking_id} is unchanged",
                        slot_id,
                    )
            record = self._insert(session, patient_id, new_slot, at, changed_from=booking_id)
        log.info("vaccination.changed", booking_id=record.id, changed_from=booking_id, slot_id=slot_id)
        return record

    @staticmethod
    def _check_change(
        old: VaccinationBooking, old_slot: VaccinationSlot, new_slot: VaccinationSlot, at: datetime
    ) -> None:
        if new_slot.id == old_slot.id:
            raise VaccinationError(f"booking {old.id} is already in slot {new_slot.id}")
        if new_slot.vaccine != old.vaccine:
            raise VaccinationError(
                f"slot {new_slot.id} is for {new_slot.vaccine}, booking {old.id} for {old.vaccine}: "
                "a change keeps the vaccine (cancel and book for another)"
            )
        if old_slot.starts_at <= at:
            raise TooLate(f"booking {old.id}: its slot started {_local(old_slot.starts_at)}; it can't be changed")
        if new_slot.starts_at <= at:
            raise TooLate(f"slot {new_slot.id} started {_local(new_slot.starts_at)}: choose a later one")

    @staticmethod
    def _close_past_of(session: Session, patient_id: str, vaccine: str, at: datetime) -> None:
        """The patient's bookings of the vaccine whose slot has ended stop counting as upcoming."""
        ended = select(VaccinationSlot.id).where(VaccinationSlot.ends_at <= at)
        session.connection().execute(
            update(VaccinationBooking)
            .where(
                VaccinationBooking.patient_id == patient_id,
                VaccinationBooking.vaccine == vaccine,
                VaccinationBooking.state == "booked",
                VaccinationBooking.slot_id.in_(ended),
            )
            .values(state="past")
        )

    @staticmethod
    def _refuse_second(session: Session, patient_id: str, vaccine: str) -> None:
        # FOR UPDATE: a booking being changed or cancelled right now is waited for (the lock order's first step).
        existing = session.scalars(
            select(VaccinationBooking.id)
            .where(
                VaccinationBooking.patient_id == patient_id,
                VaccinationBooking.vaccine == vaccine,
                VaccinationBooking.state == "booked",
            )
            .with_for_update()
        ).first()
        if existing is not None:
            raise AlreadyBooked(
                f"the patient already holds booking {existing} for {vaccine}: change or cancel it instead", existing
            )

    @staticmethod
    def _only_vaccine(session: Session, day: date, at: datetime) -> str:
        start, end = local_day_bounds(day)
        codes = sorted(
            session.scalars(
                select(VaccinationSlot.vaccine)
                .distinct()
                .where(
                    VaccinationSlot.starts_at >= start, VaccinationSlot.starts_at < end, VaccinationSlot.starts_at > at
                )
            )
        )
        if not codes:
            raise NoSlot(f"no vaccination slot on {day.isoformat()}")
        if len(codes) > 1:
            raise AmbiguousVaccine(f"{day.isoformat()} offers {', '.join(codes)}: say which vaccine to book")
        return codes[0]

    @staticmethod
    def _insert(
        session: Session, patient_id: str, slot: VaccinationSlot, at: datetime, *, changed_from: str | None
    ) -> BookingRecord:
        # Read before the flush: a failed flush rolls the transaction back and expires ``slot``.
        vaccine = slot.vaccine
        row = VaccinationBooking(
            id=str(uuid.uuid4()),
            slot_id=slot.id,
            patient_id=patient_id,
            vaccine=vaccine,
            state="booked",
            created_at=at,
            changed_from=changed_from,
        )
        session.add(row)
        try:
            session.flush()
        except IntegrityError as exc:
            if _unique_violation(exc):
                # The partial unique index: a booking of the same patient and vaccine committed meanwhile.
                raise AlreadyBooked(
                    f"the patient booked {vaccine} at the same time in another transaction: nothing changed"
                ) from None
            raise
        vaccine_name = session.scalar(select(Vaccine.name).where(Vaccine.code == slot.vaccine)) or slot.vaccine
        clinic_name = session.scalar(select(Clinic.name).where(Clinic.code == slot.clinic)) or slot.clinic
        return _booking(row, slot, vaccine_name, clinic_name)

    # -- reading bookings ---------------------------------------------------------------------------------------
    def booking(self, booking_id: str) -> BookingRecord:
        with self._transaction(f"reading booking {booking_id}") as session:
            found = session.execute(_bookings().where(VaccinationBooking.id == booking_id)).first()
            if found is None:
                raise VaccinationNotFound(f"no vaccination booking {booking_id}")
            return _booking(*found)

    def bookings(self, patient_id: str) -> list[BookingRecord]:
        """All of the patient's bookings, by slot time."""
        _patient(patient_id)
        query = (
            _bookings()
            .where(VaccinationBooking.patient_id == patient_id)
            .order_by(VaccinationSlot.starts_at, VaccinationBooking.created_at)
        )
        return self._read(query, "listing a patient's bookings")

    def next_booking(self, patient_id: str, now: datetime) -> BookingRecord | None:
        """The patient's earliest booking whose slot has not started yet."""
        _patient(patient_id)
        query = (
            _bookings()
            .where(
                VaccinationBooking.patient_id == patient_id,
                VaccinationBooking.state == "booked",
                VaccinationSlot.starts_at > _aware(now),
            )
            .order_by(VaccinationSlot.starts_at)
            .limit(1)
        )
        found = self._read(query, "finding a patient's next booking")
        return found[0] if found else None

    def last_booking(self, patient_id: str, now: datetime) -> BookingRecord | None:
        """The patient's latest booking whose slot has started (the vaccination an adverse reaction follows)."""
        _patient(patient_id)
        query = (
            _bookings()
            .where(
                VaccinationBooking.patient_id == patient_id,
                VaccinationBooking.state.in_(("booked", "past")),
                VaccinationSlot.starts_at <= _aware(now),
            )
            .order_by(VaccinationSlot.starts_at.desc())
            .limit(1)
        )
        found = self._read(query, "finding a patient's last booking")
        return found[0] if found else None

    def _read(self, query: _BookingSelect, doing: str) -> list[BookingRecord]:
        with self._transaction(doing) as session:
            return [_booking(*row) for row in session.execute(query).all()]

    def close_past(self, now: datetime) -> int:
        """Every booking whose slot has ended becomes ``past``; returns how many (for a nightly job or the CLI)."""
        ended = select(VaccinationSlot.id).where(VaccinationSlot.ends_at <= _aware(now))
        with self._transaction("closing past bookings") as session:
            result = session.connection().execute(
                update(VaccinationBooking)
                .where(VaccinationBooking.state == "booked", VaccinationBooking.slot_id.in_(ended))
                .values(state="past")
            )
            return rowcount(result)

    # -- reminders ----------------------------------------------------------------------------------------------
    def due_reminders(self, day: date) -> list[BookingRecord]:
        """Active bookings whose slot is on the local ``day`` and whose reminder has not been sent."""
        start, end = local_day_bounds(day)
        query = (
            _bookings()
            .where(
                VaccinationBooking.state == "booked",
                VaccinationBooking.reminded_at.is_(None),
                VaccinationSlot.starts_at >= start,
                VaccinationSlot.starts_at < end,
            )
            .order_by(VaccinationSlot.starts_at, VaccinationBooking.id)
        )
        return self._read(query, f"finding the reminders due for {day.isoformat()}")

    def mark_reminded(self, booking_id: str, at: datetime) -> bool:
        """Claim the booking's reminder: True for the one caller that sets ``reminded_at``, False if it was set
        already (or the booking is no longer active). Claim first, then send: a reminder goes out once."""
        _aware(at)
        statement = (
            update(VaccinationBooking)
            .where(
                VaccinationBooking.id == booking_id,
                VaccinationBooking.state == "booked",
                VaccinationBooking.reminded_at.is_(None),
            )
            .values(reminded_at=at)
        )
        with self._transaction(f"marking the reminder of booking {booking_id}") as session:
            return rowcount(session.connection().execute(statement)) == 1

    def release_reminder(self, booking_id: str, at: datetime) -> bool:
        """Undo :meth:`mark_reminded` (made at ``at``) when handing the reminder over failed: the next run retries."""
        statement = (
            update(VaccinationBooking)
            .where(VaccinationBooking.id == booking_id, VaccinationBooking.reminded_at == _aware(at))
            .values(reminded_at=None)
        )
        with self._transaction(f"releasing the reminder of booking {booking_id}") as session:
            return rowcount(session.connection().execute(statement)) == 1

    # --- the HIS's view (migration 0017) ---------------------------------------------------------------------

    def mark_his_requested(self, booking_id: str, control_id: str) -> bool:
        """The booking's SIU (``control_id``) is queued for the HIS: ``requested`` until the HIS answers."""
        statement = (
            update(VaccinationBooking)
            .where(VaccinationBooking.id == booking_id)
            .values(his_state="requested", his_control_id=control_id, his_reason=None)
        )
        with self._transaction(f"marking booking {booking_id} as requested from the HIS") as session:
            return rowcount(session.connection().execute(statement)) == 1

    def record_his_answer(self, control_id: str, accepted: bool, reason: str = "") -> str | None:
        """The HIS's answer to the booking's last message: ``confirmed`` on AA, ``refused`` with ``reason`` (the
        refusal's location and code) otherwise. The booking's id, or None when no booking waits for this id (an
        answer to an older message of a booking changed since is not taken for the newer one's)."""
        with self._transaction(f"recording the HIS's answer to {control_id}") as session:
            row = session.scalars(
                select(VaccinationBooking).where(VaccinationBooking.his_control_id == control_id).with_for_update()
            ).first()
            if row is None:
                return None
            row.his_state = "confirmed" if accepted else "refused"
            row.his_reason = None if accepted else (reason or "refused by the HIS")[:120]
            return row.id

    def his_state(self, booking_id: str) -> tuple[str | None, str | None]:
        """``(his_state, his_reason)`` of a booking (``(None, None)``: booked without a HIS)."""
        with self._transaction(f"reading the HIS state of booking {booking_id}") as session:
            row = session.get(VaccinationBooking, booking_id)
            if row is None:
                raise VaccinationNotFound(f"no booking {booking_id}")
            return row.his_state, row.his_reason


# --- reminders, adverse reactions, audit ------------------------------------------------------------------------


def _clock_text(at: datetime) -> str:
    """上午9:00, 中午12:30, 下午2:30 (the way a Chinese SMS says a time of day)."""
    if at.hour < 12:
        return f"上午{at.hour}:{at.minute:02d}"
    if at.hour == 12:
        return f"中午12:{at.minute:02d}"
    return f"下午{at.hour - 12}:{at.minute:02d}"


def reminder_text(booking: BookingRecord, now: datetime) -> str:
    """The reminder SMS: when, where and what, no name and no number. The day is 今天/明天/后天 relative to
    ``now`` (local), else the date, so a reminder sent late never says "tomorrow" for the wrong day."""
    starts = booking.starts_at.astimezone(LOCAL_TZ)
    days = (starts.date() - _aware(now).astimezone(LOCAL_TZ).date()).days
    day = {0: "今天", 1: "明天", 2: "后天"}.get(days, f"{starts.month}月{starts.day}日")
    return (
        f"{SMS_SIGNATURE}您已预约{day}{_clock_text(starts)}在{booking.clinic_name}接种{booking.vaccine_name}，"
        "请携带身份证。"
    )


async def send_day_before_reminders(
    store: VaccinationStore, outbox_enqueue: Callable[..., Awaitable[str]], day: date, now: datetime
) -> int:
    """Hand one reminder SMS per active booking on the local ``day`` (run the day before) to the outbox.

    Each booking's reminder is claimed (:meth:`VaccinationStore.mark_reminded`) before it is enqueued, so two
    nodes or two runs never send it twice; if the enqueue fails the claim is released and the error raised (the
    next run retries). A crash between the claim and the enqueue loses that one reminder rather than doubling it.
    Bookings whose slot has already started are skipped. Returns how many reminders were enqueued.
    """
    _aware(now)
    sent = 0
    for booking in await asyncio.to_thread(store.due_reminders, day):
        if booking.starts_at <= now:
            continue
        if not await asyncio.to_thread(store.mark_reminded, booking.id, now):
            continue  # claimed by another run
        try:
            await outbox_enqueue(
                patient_id=booking.patient_id,
                kind=REMINDER_KIND,
                text=reminder_text(booking, now),
                subject_id=booking.id,
            )
        except BaseException:
            await asyncio.to_thread(store.release_reminder, booking.id, now)
            raise
        sent += 1
    return sent


def report_adverse_reaction(patient_id: str, booking_id: str | None, at: datetime, tasks: TaskStore) -> str:
    """An ``adverse_reaction`` task for medical staff (:data:`ADVERSE_REACTION_ROLE`) about the booking (the
    vaccination the reaction followed, if known); returns the task's id. Idempotent while the task is open."""
    _patient(patient_id)
    _aware(at)
    task = tasks.create("adverse_reaction", patient_id, role=ADVERSE_REACTION_ROLE, at=at, subject_id=booking_id)
    log.warning("vaccination.adverse_reaction", task_id=task.id, booking_id=booking_id)
    return task.id


def audit_booking_change(
    audit: AuditLog,
    *,
    actor: str,
    role: str,
    operation: Literal["book", "cancel", "change"],
    booking_id: str,
    slot_id: str,
    changed_from: str | None = None,
    reason: str = "",
) -> None:
    """One ``change`` audit entry for a booking made, cancelled or changed (ids only; no patient reference)."""
    details: dict[str, str] = {"booking": booking_id, "slot": slot_id, "operation": operation}
    if changed_from is not None:
        details["changed_from"] = changed_from
    audit.append(actor=actor, role=role, action="change", outcome="success", reason=reason, details=details)
