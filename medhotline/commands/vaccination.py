"""``medhotline vaccination …``: vaccines, clinics, time slots and bookings from the command line.

``vaccines add|list`` and ``clinics add|list`` set up the catalogue; ``slots add`` opens time slots with a capacity
(``--count`` consecutive ones at once), ``slots list`` shows them with free and total seats; ``book``, ``cancel``,
``change`` and ``bookings`` work a patient's bookings, by the registry's opaque patient id (never a name or a
number). Every booking made, cancelled or changed appends a ``change`` entry to the audit trail with the booking and
slot ids (no patient reference); the actor is ``--as`` or the operating-system user.

Times on the command line and in the output are the hospital's local time (``Asia/Shanghai``): ``--start
"2026-12-01 09:00"``, ``--date 2026-12-01``. Morning is a slot starting before 12:00, afternoon one from 12:00.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Final, Literal

from compliance.access import AccessError, check_patient_id
from ground import db
from ground.errors import CommandError
from ground.operator import actor_id
from his.tables import PatientStore
from medhotline.his_booking import send_appointment
from scheduler.bookings import BookingDesk
from scheduler.policy import LOCAL_TZ
from scheduler.vaccination import VaccinationStore

if TYPE_CHECKING:
    from typing import TypeAlias

    from sqlalchemy import Engine

    from ground.config import Config
    from scheduler.vaccination import BookingRecord, SlotRecord, VaccinationStore

    Actions: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK: Final = 0
EXIT_HIS_REFUSED: Final = 1  # the HIS answered AE/AR: the hotline's booking is not confirmed
_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_START: Final = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{1,2}):(\d{2})$")


def _now() -> datetime:
    return datetime.now(UTC)


def _error(message: str) -> Exception:

    return CommandError(message)


def parse_day(text: str, option: str = "--date") -> date:
    """``YYYY-MM-DD``, a local calendar day."""
    if not _DATE.match(text):
        raise _error(f"{option} {text!r}: expected a date YYYY-MM-DD (hospital local time)")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise _error(f"{option} {text!r}: {exc}") from None


def parse_start(text: str, option: str = "--start") -> datetime:
    """``YYYY-MM-DD HH:MM`` in the hospital's local time, as an aware datetime."""
    match = _START.match(text.strip())
    if match is None:
        raise _error(f'{option} {text!r}: expected "YYYY-MM-DD HH:MM" (hospital local time)')
    day = parse_day(match.group(1), option)
    hour, minute = int(match.group(2)), int(match.group(3))
    if hour > 23 or minute > 59:
        raise _error(f"{option} {text!r}: no such time of day")
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=LOCAL_TZ)


def _local(at: datetime, form: str = "%Y-%m-%d %H:%M") -> str:
    return at.astimezone(LOCAL_TZ).strftime(form)


@contextmanager
def _store(config: Config) -> Iterator[tuple[VaccinationStore, Engine]]:
    """The store over the configured database, refused with what to do when the schema is not current; its
    connections closed when the command is done."""

    with db.current_engine(config.database_url) as engine:
        yield VaccinationStore.for_engine(engine), engine


@contextmanager
def _desk(config: Config) -> Iterator[BookingDesk]:
    """Bookings made by staff (checked against the patient registry, audited), over the configured database."""
    with db.current_engine(config.database_url) as engine:
        yield BookingDesk.for_engine(engine, PatientStore.for_engine(engine))


def _slot_line(slot: SlotRecord) -> str:
    return (
        f"{slot.id}  {_local(slot.starts_at)}-{_local(slot.ends_at, '%H:%M')}  {slot.clinic:<12} {slot.vaccine:<12} "
        f"{slot.free}/{slot.capacity} free"
    )


def _booking_line(booking: BookingRecord) -> str:
    extra = ""
    if booking.cancelled_at is not None:
        extra = f"  cancelled {_local(booking.cancelled_at)} by {booking.cancelled_by}"
    if booking.changed_from is not None:
        extra += f"  (changed from {booking.changed_from})"
    return (
        f"{booking.id}  {booking.state:<9} {_local(booking.starts_at)}-{_local(booking.ends_at, '%H:%M')}  "
        f"{booking.vaccine} at {booking.clinic} (slot {booking.slot_id}){extra}"
    )


# --- catalogue --------------------------------------------------------------------------------------------------


def _cmd_vaccines(config: Config, args: argparse.Namespace) -> int:
    with _store(config) as (store, _):
        if args.catalogue_action == "add":
            vaccine = store.add_vaccine(args.code, args.name, doses=args.doses, at=_now())
            print(f"vaccine {vaccine.code} added: {vaccine.name}, {vaccine.doses} dose(s)")
            return EXIT_OK
        vaccines = store.vaccines()
    for item in vaccines:
        print(f"{item.code:<16} {item.doses} dose(s)  {item.name}")
    if not vaccines:
        print("no vaccines", file=sys.stderr)
    return EXIT_OK


def _cmd_clinics(config: Config, args: argparse.Namespace) -> int:
    with _store(config) as (store, _):
        if args.catalogue_action == "add":
            clinic = store.add_clinic(args.code, args.name, args.department, at=_now())
            print(f"clinic {clinic.code} added: {clinic.name} (department {clinic.department})")
            return EXIT_OK
        clinics = store.clinics()
    for item in clinics:
        print(f"{item.code:<16} {item.department:<16} {item.name}")
    if not clinics:
        print("no clinics", file=sys.stderr)
    return EXIT_OK


# --- slots ------------------------------------------------------------------------------------------------------


def _cmd_slots_add(config: Config, args: argparse.Namespace) -> int:
    start = parse_start(args.start)
    with _store(config) as (store, _):
        slots = store.add_slots(
            args.clinic, args.vaccine, start, minutes=args.minutes, capacity=args.capacity, at=_now(), count=args.count
        )
    for slot in slots:
        print(_slot_line(slot))
    print(f"{len(slots)} slot(s) added")
    return EXIT_OK


def _cmd_slots_list(config: Config, args: argparse.Namespace) -> int:
    day = parse_day(args.date) if args.date is not None else None
    with _store(config) as (store, _):
        # Without a date: the slots still to come (or under way).
        slots = store.slots(day=day, clinic=args.clinic, vaccine=args.vaccine, after=None if day else _now())
    for slot in slots:
        print(_slot_line(slot))
    if not slots:
        print("no slots", file=sys.stderr)
    return EXIT_OK


# --- bookings ---------------------------------------------------------------------------------------------------


def _patient_id(text: str) -> str:
    """An opaque registry id, checked as an argument; the desk checks that the registry holds it."""
    try:
        return check_patient_id(text)
    except AccessError as exc:
        raise _error(f"--patient: {exc}") from None


def _to_his(config: Config, event: Literal["book", "change", "cancel"], booking: BookingRecord) -> int:
    """With a HIS, the SIU goes out now and its answer is printed: the operator sees the HIS's word, not ours."""
    if not config.his.enabled:
        return EXIT_OK
    answer = asyncio.run(send_appointment(config, event, booking))
    print(answer.describe())
    return EXIT_HIS_REFUSED if answer.outcome == "refused" else EXIT_OK


def _cmd_book(config: Config, args: argparse.Namespace) -> int:

    actor = actor_id(args.as_)
    if (args.slot is None) == (args.date is None):
        raise _error("book needs --slot SLOT_ID, or --date YYYY-MM-DD with --part morning|afternoon")
    if args.date is not None and args.part is None:
        raise _error("--date needs --part morning or --part afternoon")
    if args.slot is not None and (args.part is not None or args.vaccine is not None):
        raise _error("--part and --vaccine go with --date, not with --slot")
    patient = _patient_id(args.patient)
    day = parse_day(args.date) if args.date is not None else None
    with _desk(config) as desk:
        booking = desk.book(patient, actor=actor, slot_id=args.slot, day=day, part=args.part, vaccine=args.vaccine)
    made = "booking sent to the HIS" if config.his.enabled else "booked"
    print(f"{made} {booking.id}: {booking.vaccine_name} at {booking.clinic_name}, {_local(booking.starts_at)}")
    print(_booking_line(booking))
    return _to_his(config, "book", booking)


def _cmd_cancel(config: Config, args: argparse.Namespace) -> int:

    actor = actor_id(args.as_)
    with _desk(config) as desk:
        booking = desk.cancel(args.booking, actor=actor)
    print(f"cancelled {booking.id}; its seat in slot {booking.slot_id} is free again")
    return _to_his(config, "cancel", booking)


def _cmd_change(config: Config, args: argparse.Namespace) -> int:

    actor = actor_id(args.as_)
    with _desk(config) as desk:
        booking = desk.change(args.booking, args.slot, actor=actor)
    print(f"booking {args.booking} changed: new booking {booking.id}, {_local(booking.starts_at)}")
    print(_booking_line(booking))
    return _to_his(config, "change", booking)


def _cmd_bookings(config: Config, args: argparse.Namespace) -> int:
    with _store(config) as (store, _):
        bookings = store.bookings(args.patient)
    for booking in bookings:
        print(_booking_line(booking))
    if not bookings:
        print("no bookings", file=sys.stderr)
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline vaccination`` to the ``medhotline`` parser."""
    vaccination = sub.add_parser(
        "vaccination",
        help="vaccines, clinics, time slots and bookings",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = vaccination.add_subparsers(dest="vaccination_action", required=True)
    _register_catalogue(actions)
    _register_slots(actions)
    _register_bookings(actions)


def _register_catalogue(actions: Actions) -> None:
    vaccines = actions.add_parser("vaccines", help="the vaccines offered")
    vactions = vaccines.add_subparsers(dest="catalogue_action", required=True)
    vadd = vactions.add_parser("add", help="add a vaccine")
    vadd.add_argument("code", help="e.g. influenza (a-z 0-9 _ -)")
    vadd.add_argument("--name", required=True, help="as patients know it, e.g. 流感疫苗 (used in the reminder SMS)")
    vadd.add_argument("--doses", type=int, default=1, help="doses in the full course (default 1)")
    vadd.set_defaults(func=_cmd_vaccines)
    vactions.add_parser("list", help="list the vaccines").set_defaults(func=_cmd_vaccines)

    clinics = actions.add_parser("clinics", help="where vaccinations take place")
    cactions = clinics.add_subparsers(dest="catalogue_action", required=True)
    cadd = cactions.add_parser("add", help="add a clinic")
    cadd.add_argument("code", help="e.g. community1 (a-z 0-9 _ -)")
    cadd.add_argument("--name", required=True, help="as patients know it (used in the reminder SMS)")
    cadd.add_argument("--department", required=True, help="the department code whose staff work it")
    cadd.set_defaults(func=_cmd_clinics)
    cactions.add_parser("list", help="list the clinics").set_defaults(func=_cmd_clinics)


def _register_slots(actions: Actions) -> None:

    slots = actions.add_parser("slots", help="time slots with a capacity")
    sactions = slots.add_subparsers(dest="slots_action", required=True)
    sadd = sactions.add_parser("add", help="open one or more consecutive slots")
    sadd.add_argument("--clinic", required=True)
    sadd.add_argument("--vaccine", required=True)
    sadd.add_argument("--start", required=True, help='"YYYY-MM-DD HH:MM", hospital local time')
    sadd.add_argument("--minutes", type=int, required=True, help="length of each slot")
    sadd.add_argument("--capacity", type=int, required=True, help="seats in each slot")
    sadd.add_argument("--count", type=int, default=1, help="how many consecutive slots (default 1)")
    sadd.set_defaults(func=_cmd_slots_add)
    slist = sactions.add_parser("list", help="slots with free/total seats (default: those still to come)")
    slist.add_argument("--date", help="YYYY-MM-DD, hospital local time")
    slist.add_argument("--clinic")
    slist.add_argument("--vaccine")
    slist.set_defaults(func=_cmd_slots_list)


def _register_bookings(actions: Actions) -> None:

    book = actions.add_parser("book", help="book a seat for a patient (by slot, or by date and part of day)")
    book.add_argument("--patient", required=True, help="the registry's patient id")
    book.add_argument("--slot", help="the slot id")
    book.add_argument("--date", help="YYYY-MM-DD: the earliest free slot that day ...")
    book.add_argument("--part", choices=("morning", "afternoon"), help="... in the morning or afternoon")
    book.add_argument("--vaccine", help="with --date: which vaccine (default: the only one offered that day)")
    book.add_argument("--as", dest="as_", metavar="ACCOUNT", help="who books (default: os:<your user>)")
    book.set_defaults(func=_cmd_book)

    cancel = actions.add_parser("cancel", help="cancel a booking (its seat is freed)")
    cancel.add_argument("booking")
    cancel.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your account id")
    cancel.set_defaults(func=_cmd_cancel)

    change = actions.add_parser("change", help="move a booking to another slot of the same vaccine")
    change.add_argument("booking")
    change.add_argument("--slot", required=True, help="the new slot id")
    change.add_argument("--as", dest="as_", metavar="ACCOUNT", help="who changes it (default: os:<your user>)")
    change.set_defaults(func=_cmd_change)

    bookings = actions.add_parser("bookings", help="a patient's bookings")
    bookings.add_argument("--patient", required=True, help="the registry's patient id")
    bookings.set_defaults(func=_cmd_bookings)
