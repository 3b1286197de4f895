"""Vaccination booking on a real database (SQLite and PostgreSQL): the schema's own guards, the catalogue and slots,
booking that never overbooks, double cancels, atomic changes, one upcoming booking per vaccine, booking by morning
or afternoon in local time, day-before reminders sent once, adverse reaction tasks, the audit entries and the CLI.

The concurrent races are in ``test_vaccination_race_pg.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError
from structlog.testing import capture_logs

from compliance.audit import AuditLog, MemoryAuditStore, SqlAuditStore
from compliance.data_keys import DataKey
from ground import db
from ground.config import load_config
from ground.errors import MedhotlineError
from ground.models import Base
from his.tables import Patient
from medhotline.commands.vaccination import parse_start, register
from scheduler.tasks import TaskStore
from scheduler.vaccination import (
    ADVERSE_REACTION_ROLE,
    LOCAL_TZ,
    AlreadyBooked,
    AmbiguousVaccine,
    BookingNotActive,
    BookingRecord,
    DayPartFull,
    NoSlot,
    SlotFull,
    SlotRecord,
    TooLate,
    VaccinationError,
    VaccinationNotFound,
    VaccinationStore,
    audit_booking_change,
    day_part_bounds,
    reminder_text,
    report_adverse_reaction,
    send_day_before_reminders,
)
from scheduler.vaccination_tables import VaccinationBooking, VaccinationSlot

T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)  # 10:00 on 30 November, local
DAY = date(2026, 12, 1)
VACCINATION_TABLES = ("vaccines", "clinics", "vaccination_slots", "vaccination_bookings")


def local(day: date, hhmm: str) -> datetime:
    hours, minutes = hhmm.split(":")
    return datetime.combine(day, time(int(hours), int(minutes)), LOCAL_TZ)


def patient() -> str:
    return str(uuid.uuid4())


def seed(store: VaccinationStore) -> None:
    store.add_vaccine("influenza", "流感疫苗", at=T0)
    store.add_vaccine("hpv9", "九价HPV疫苗", doses=3, at=T0)
    store.add_clinic("community1", "社区卫生服务中心", "vaccination", at=T0)
    store.add_clinic("east", "东区门诊", "vaccination", at=T0)


@pytest.fixture
def store(engine: Engine) -> VaccinationStore:
    store = VaccinationStore.for_engine(engine)
    seed(store)
    return store


def one_slot(
    store: VaccinationStore, start: datetime, capacity: int = 3, vaccine: str = "influenza", clinic: str = "community1"
) -> SlotRecord:
    return store.add_slots(clinic, vaccine, start, minutes=30, capacity=capacity, at=T0)[0]


def consistency_problems(engine: Engine) -> list[str]:
    """Every way the slots' counters and the bookings can disagree; empty when all is well.

    A slot's ``booked`` must equal its bookings that hold a seat (``booked`` or ``past``) and never exceed its
    capacity; a patient holds at most one ``booked`` booking per vaccine.
    """
    problems = []
    with engine.connect() as connection:
        held = dict(
            connection.execute(
                select(VaccinationBooking.slot_id, func.count())
                .where(VaccinationBooking.state.in_(("booked", "past")))
                .group_by(VaccinationBooking.slot_id)
            ).all()
        )
        for slot_id, booked, capacity in connection.execute(
            select(VaccinationSlot.id, VaccinationSlot.booked, VaccinationSlot.capacity)
        ):
            seats = held.get(slot_id, 0)
            if seats > capacity:
                problems.append(f"slot {slot_id}: {seats} bookings for {capacity} seats")
            if booked != seats:
                problems.append(f"slot {slot_id}: counter {booked}, {seats} bookings hold a seat")
        doubles = connection.execute(
            select(VaccinationBooking.patient_id, VaccinationBooking.vaccine, func.count())
            .where(VaccinationBooking.state == "booked")
            .group_by(VaccinationBooking.patient_id, VaccinationBooking.vaccine)
            .having(func.count() > 1)
        ).all()
        problems += [f"a patient holds {count} upcoming {vaccine} bookings" for _, vaccine, count in doubles]
    return problems


def states(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(select(VaccinationBooking.id, VaccinationBooking.state)).all())


# --- schema -----------------------------------------------------------------------------------------------------


def test_migration_matches_the_models_and_downgrades(database_url: str, engine: Engine) -> None:
    import scheduler.vaccination_tables  # noqa: F401 - the tables on Base.metadata

    def ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table in VACCINATION_TABLES

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
    indexes = {index["name"]: index for index in inspect(engine).get_indexes("vaccination_bookings")}
    assert indexes["ix_vaccination_bookings_patient_id_vaccine"]["unique"]

    engine.dispose()
    config = db._alembic_config()
    downgrade_engine = db.make_engine(database_url)
    try:
        with downgrade_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0009_outreach")
        assert not set(VACCINATION_TABLES) & set(inspect(downgrade_engine).get_table_names())
    finally:
        downgrade_engine.dispose()
    db.upgrade(database_url)
    assert db.current_revision(database_url) == db.head_revision()


def test_the_schema_refuses_an_overbooked_slot_and_a_second_upcoming_booking(
    engine: Engine, store: VaccinationStore
) -> None:
    slot = one_slot(store, local(DAY, "09:00"), capacity=2)
    for value in (3, -1):
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(update(VaccinationSlot).where(VaccinationSlot.id == slot.id).values(booked=value))
    person = patient()

    def row(state: str, cancelled: datetime | None = None) -> dict[str, object]:
        return {
            "id": str(uuid.uuid4()),
            "slot_id": slot.id,
            "patient_id": person,
            "vaccine": "influenza",
            "state": state,
            "created_at": T0,
            "cancelled_at": cancelled,
        }

    with engine.begin() as connection:
        connection.execute(insert(VaccinationBooking).values(row("booked")))
        connection.execute(insert(VaccinationBooking).values(row("cancelled", T0)))
        connection.execute(insert(VaccinationBooking).values(row("past")))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(VaccinationBooking).values(row("booked")))
    with pytest.raises(IntegrityError), engine.begin() as connection:  # cancelled needs its time, and only it
        connection.execute(insert(VaccinationBooking).values(row("cancelled")))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(VaccinationBooking).values(row("past", T0)))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(VaccinationBooking).values({**row("booked"), "state": "maybe"}))


# --- catalogue and slots ----------------------------------------------------------------------------------------


def test_catalogue_refuses_duplicates_and_bad_values(store: VaccinationStore) -> None:
    assert [v.code for v in store.vaccines()] == ["hpv9", "influenza"]
    assert [(c.code, c.department) for c in store.clinics()] == [("community1", "vaccination"), ("east", "vaccination")]
    with pytest.raises(VaccinationError, match="vaccine influenza exists already"):
        store.add_vaccine("influenza", "流感", at=T0)
    with pytest.raises(VaccinationError, match="clinic east exists already"):
        store.add_clinic("east", "东区", "vaccination", at=T0)
    with pytest.raises(VaccinationError, match="vaccine code 'Flu!'"):
        store.add_vaccine("Flu!", "流感", at=T0)
    with pytest.raises(VaccinationError, match="vaccine rabies name"):
        store.add_vaccine("rabies", "  ", at=T0)
    with pytest.raises(VaccinationError, match="doses must be 1-10, got 0"):
        store.add_vaccine("rabies", "狂犬疫苗", doses=0, at=T0)
    with pytest.raises(VaccinationError, match="clinic west: department 'West Wing'"):
        store.add_clinic("west", "西区", "West Wing", at=T0)
    with pytest.raises(VaccinationError, match="timezone-aware"):
        store.add_vaccine("rabies", "狂犬疫苗", at=datetime(2026, 11, 30, 10, 0))
    assert [v.code for v in store.vaccines()] == ["hpv9", "influenza"]


def test_slots_are_added_consecutively_all_or_none(store: VaccinationStore) -> None:
    slots = store.add_slots("community1", "influenza", local(DAY, "09:00"), minutes=30, capacity=20, count=4, at=T0)
    assert [s.starts_at.astimezone(LOCAL_TZ).strftime("%H:%M") for s in slots] == ["09:00", "09:30", "10:00", "10:30"]
    assert all(s.ends_at - s.starts_at == timedelta(minutes=30) and (s.free, s.capacity) == (20, 20) for s in slots)
    store.add_slots("community1", "influenza", local(DAY, "11:00"), minutes=30, capacity=5, at=T0)
    # 10:00 is taken: none of the three is added.
    with pytest.raises(VaccinationError, match="community1 already has a influenza slot starting 2026-12-01 10:00"):
        store.add_slots("community1", "influenza", local(DAY, "10:00"), minutes=30, capacity=5, count=3, at=T0)
    with pytest.raises(VaccinationError, match="already has"):
        store.add_slots("community1", "influenza", local(DAY, "09:30"), minutes=30, capacity=5, count=3, at=T0)
    assert len(store.slots(day=DAY)) == 5  # the four and the 11:00 one
    # The same time at another clinic, or for another vaccine, is another slot.
    store.add_slots("east", "influenza", local(DAY, "09:00"), minutes=30, capacity=5, at=T0)
    store.add_slots("community1", "hpv9", local(DAY, "09:00"), minutes=30, capacity=5, at=T0)
    assert len(store.slots(day=DAY, clinic="community1", vaccine="influenza")) == 5
    assert len(store.slots(day=DAY, vaccine="hpv9")) == 1
    assert store.slots(day=DAY + timedelta(days=1)) == []
    with pytest.raises(VaccinationNotFound, match="no clinic nowhere"):
        store.add_slots("nowhere", "influenza", local(DAY, "15:00"), minutes=30, capacity=5, at=T0)
    with pytest.raises(VaccinationNotFound, match="no vaccine rabies"):
        store.add_slots("east", "rabies", local(DAY, "15:00"), minutes=30, capacity=5, at=T0)
    for bad, message in (
        ({"minutes": 0}, "slot length must be"),
        ({"capacity": 0}, "slot capacity must be"),
        ({"count": 0}, "slot count must be"),
        ({"count": 501}, "slot count must be"),
    ):
        arguments: dict[str, int] = {"minutes": 30, "capacity": 5, "count": 1, **bad}
        with pytest.raises(VaccinationError, match=message):
            store.add_slots("east", "influenza", local(DAY, "16:00"), at=T0, **arguments)
    with pytest.raises(VaccinationError, match=r"slot start .* timezone-aware"):
        store.add_slots("east", "influenza", datetime(2026, 12, 1, 16), minutes=30, capacity=5, at=T0)
    with pytest.raises(VaccinationNotFound, match="no vaccination slot nope"):
        store.slot("nope")


# --- booking ----------------------------------------------------------------------------------------------------


def test_capacity_is_never_exceeded_and_full_names_the_slot(engine: Engine, store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"), capacity=3)
    people = [patient() for _ in range(5)]
    booked: list[BookingRecord] = []
    refusals: list[SlotFull] = []
    for person in people:
        try:
            booked.append(store.book(person, slot.id, T0))
        except SlotFull as exc:
            refusals.append(exc)
    assert len(booked) == 3
    assert len(refusals) == 2
    assert store.slot(slot.id).booked == 3
    for refusal in refusals:
        assert refusal.slot_id == slot.id
        assert f"slot {slot.id} (influenza at clinic community1, 2026-12-01 09:00) is full" in str(refusal)
        assert not any(person in str(refusal) for person in people)
    first = booked[0]
    assert (first.patient_id, first.slot_id, first.state, first.clinic) == (people[0], slot.id, "booked", "community1")
    assert (first.vaccine_name, first.clinic_name, first.starts_at) == ("流感疫苗", "社区卫生服务中心", slot.starts_at)
    assert store.booking(first.id) == first
    assert consistency_problems(engine) == []


def test_booking_refuses_bad_input_without_repeating_it(store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"))
    with pytest.raises(VaccinationError, match="not an opaque registry id") as refused:
        store.book("13800138000", slot.id, T0)
    assert "13800138000" not in str(refused.value)
    with pytest.raises(VaccinationNotFound, match="no vaccination slot missing"):
        store.book(patient(), "missing", T0)
    with pytest.raises(TooLate, match=f"slot {slot.id} started 2026-12-01 09:00"):
        store.book(patient(), slot.id, slot.starts_at)
    with pytest.raises(VaccinationError, match="timezone-aware"):
        store.book(patient(), slot.id, datetime(2026, 11, 30, 10))
    assert store.slot(slot.id).booked == 0


def test_one_upcoming_booking_per_vaccine(engine: Engine, store: VaccinationStore) -> None:
    morning = one_slot(store, local(DAY, "09:00"))
    later = one_slot(store, local(DAY, "14:00"))
    hpv = one_slot(store, local(DAY, "09:00"), vaccine="hpv9")
    person = patient()
    first = store.book(person, morning.id, T0)
    with pytest.raises(AlreadyBooked, match=f"already holds booking {first.id} for influenza") as refused:
        store.book(person, later.id, T0)
    assert refused.value.booking_id == first.id
    assert store.slot(later.id).booked == 0
    store.book(person, hpv.id, T0)  # another vaccine
    assert store.cancel(first.id, T0, "agent1")
    again = store.book(person, later.id, T0)  # after a cancellation
    # Once its slot is over, a booking no longer blocks the next one (the next dose, the next season).
    next_week = one_slot(store, local(DAY + timedelta(days=7), "09:00"))
    after = later.ends_at + timedelta(minutes=1)
    store.book(person, next_week.id, after)
    assert states(engine)[again.id] == "past"
    assert store.slot(later.id).booked == 1  # a past booking keeps its seat
    assert consistency_problems(engine) == []


def test_the_unique_index_decides_when_the_check_is_bypassed(
    engine: Engine, store: VaccinationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before the insert only words the refusal; without it the index still refuses, and the seat the
    refused transaction took is given back (what a race between two bookings of one patient comes down to)."""
    first, second = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "10:00"))
    person = patient()
    store.book(person, first.id, T0)
    monkeypatch.setattr(VaccinationStore, "_refuse_second", staticmethod(lambda *args: None))
    with pytest.raises(AlreadyBooked, match="booked influenza at the same time in another transaction") as refused:
        store.book(person, second.id, T0)
    assert refused.value.booking_id is None
    assert person not in str(refused.value)
    assert (store.slot(first.id).booked, store.slot(second.id).booked) == (1, 0)
    assert consistency_problems(engine) == []


def test_double_cancel_frees_one_seat(engine: Engine, store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"), capacity=3)
    first, second = store.book(patient(), slot.id, T0), store.book(patient(), slot.id, T0)
    assert store.slot(slot.id).booked == 2
    assert store.cancel(first.id, T0, "agent1") is True
    assert store.cancel(first.id, T0, "agent1") is False
    assert store.cancel(first.id, T0 + timedelta(hours=1), "agent2") is False
    assert store.slot(slot.id).booked == 1
    cancelled = store.booking(first.id)
    assert (cancelled.state, cancelled.cancelled_at, cancelled.cancelled_by) == ("cancelled", T0, "agent1")
    assert store.booking(second.id).state == "booked"
    with pytest.raises(TooLate, match=f"booking {second.id}: its slot started"):
        store.cancel(second.id, slot.starts_at + timedelta(minutes=5), "agent1")
    with pytest.raises(VaccinationNotFound, match="no vaccination booking missing"):
        store.cancel("missing", T0, "agent1")
    with pytest.raises(VaccinationError, match="account id or a channel"):
        store.cancel(second.id, T0, "agent one; DROP")
    assert store.slot(slot.id).booked == 1
    assert consistency_problems(engine) == []


def test_a_counter_changed_behind_the_services_back_stops_the_cancel(engine: Engine, store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"))
    booking = store.book(patient(), slot.id, T0)
    with engine.begin() as connection:
        connection.execute(update(VaccinationSlot).where(VaccinationSlot.id == slot.id).values(booked=0))
    with pytest.raises(VaccinationError, match=f"slot {slot.id} counts no booking to give back"):
        store.cancel(booking.id, T0, "agent1")
    assert store.booking(booking.id).state == "booked"  # rolled back with the failed decrement
    assert consistency_problems(engine) == [f"slot {slot.id}: counter 0, 1 bookings hold a seat"]


def test_a_change_moves_the_booking_in_one_step(engine: Engine, store: VaccinationStore) -> None:
    old_slot, new_slot = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "14:00"))
    person = patient()
    old = store.book(person, old_slot.id, T0)
    new = store.change(old.id, new_slot.id, T0, "agent1")
    assert (new.slot_id, new.changed_from, new.state, new.patient_id) == (new_slot.id, old.id, "booked", person)
    before = store.booking(old.id)
    assert (before.state, before.cancelled_by) == ("cancelled", "agent1")
    assert (store.slot(old_slot.id).booked, store.slot(new_slot.id).booked) == (0, 1)
    assert [b.id for b in store.bookings(person)] == [old.id, new.id]
    assert consistency_problems(engine) == []


def test_a_change_to_a_full_slot_changes_nothing(engine: Engine, store: VaccinationStore) -> None:
    old_slot, full = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "14:00"), capacity=1)
    booking = store.book(patient(), old_slot.id, T0)
    store.book(patient(), full.id, T0)
    before = states(engine)
    with pytest.raises(SlotFull, match=f"slot {full.id} .* is full: booking {booking.id} is unchanged") as refused:
        store.change(booking.id, full.id, T0, "agent1")
    assert refused.value.slot_id == full.id
    assert states(engine) == before
    assert store.booking(booking.id).state == "booked"
    assert (store.slot(old_slot.id).booked, store.slot(full.id).booked) == (1, 1)
    assert consistency_problems(engine) == []


def test_a_change_refuses_what_it_cannot_do(engine: Engine, store: VaccinationStore) -> None:
    first, second = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "10:00"))
    hpv = one_slot(store, local(DAY, "11:00"), vaccine="hpv9")
    booking = store.book(patient(), first.id, T0)
    with pytest.raises(VaccinationError, match="already in slot"):
        store.change(booking.id, first.id, T0, "agent1")
    with pytest.raises(VaccinationError, match=f"slot {hpv.id} is for hpv9, booking {booking.id} for influenza"):
        store.change(booking.id, hpv.id, T0, "agent1")
    with pytest.raises(TooLate, match=f"slot {first.id} started|booking {booking.id}: its slot started"):
        store.change(booking.id, second.id, first.starts_at, "agent1")
    with pytest.raises(VaccinationNotFound, match="no vaccination slot elsewhere"):
        store.change(booking.id, "elsewhere", T0, "agent1")
    with pytest.raises(VaccinationNotFound, match="no vaccination booking gone"):
        store.change("gone", second.id, T0, "agent1")
    store.cancel(booking.id, T0, "agent1")
    with pytest.raises(BookingNotActive, match=f"booking {booking.id} is cancelled"):
        store.change(booking.id, second.id, T0, "agent1")
    assert consistency_problems(engine) == []
    assert sum(s.booked for s in store.slots()) == 0


def test_a_started_slot_cannot_be_changed_into(store: VaccinationStore) -> None:
    early, late = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "15:00"))
    booking = store.book(patient(), late.id, T0)
    with pytest.raises(TooLate, match=f"slot {early.id} started 2026-12-01 09:00: choose a later one"):
        store.change(booking.id, early.id, early.starts_at + timedelta(minutes=1), "agent1")


# --- by morning or afternoon ------------------------------------------------------------------------------------


def test_day_parts_are_local_time() -> None:
    morning, afternoon = day_part_bounds(DAY, "morning"), day_part_bounds(DAY, "afternoon")
    # 00:00, 12:00 and 24:00 Beijing time are 16:00, 04:00 and 16:00 UTC.
    assert morning == (datetime(2026, 11, 30, 16, tzinfo=UTC), datetime(2026, 12, 1, 4, tzinfo=UTC))
    assert afternoon == (datetime(2026, 12, 1, 4, tzinfo=UTC), datetime(2026, 12, 1, 16, tzinfo=UTC))
    with pytest.raises(VaccinationError, match="part of day 'evening': use morning or afternoon"):
        day_part_bounds(DAY, "evening")


def test_book_day_part_takes_the_earliest_free_slot(engine: Engine, store: VaccinationStore) -> None:
    # 07:30 local is 23:30 UTC the day before: it is still that day's morning.
    dawn = one_slot(store, local(DAY, "07:30"), capacity=1)
    nine = one_slot(store, local(DAY, "09:00"), capacity=2)
    half_eleven = one_slot(store, local(DAY, "11:30"), capacity=2)
    noon = one_slot(store, local(DAY, "12:00"), capacity=1)
    one_slot(store, local(DAY + timedelta(days=1), "08:00"))
    store.book(patient(), dawn.id, T0)  # full
    picks = [store.book_day_part(patient(), None, DAY, "morning", T0).slot_id for _ in range(4)]
    assert picks == [nine.id, nine.id, half_eleven.id, half_eleven.id]
    with pytest.raises(DayPartFull, match="every influenza slot in the morning of 2026-12-01 is full"):
        store.book_day_part(patient(), "influenza", DAY, "morning", T0)
    assert isinstance(DayPartFull("x"), SlotFull)  # the IVR's "full" answer covers both
    assert store.book_day_part(patient(), "influenza", DAY, "afternoon", T0).slot_id == noon.id
    assert consistency_problems(engine) == []


def test_book_day_part_needs_one_vaccine_and_a_slot(store: VaccinationStore) -> None:
    one_slot(store, local(DAY, "09:00"))
    with pytest.raises(NoSlot, match="no influenza slot in the afternoon of 2026-12-01"):
        store.book_day_part(patient(), None, DAY, "afternoon", T0)
    with pytest.raises(NoSlot, match="no vaccination slot on 2026-12-02"):
        store.book_day_part(patient(), None, DAY + timedelta(days=1), "morning", T0)
    with pytest.raises(VaccinationNotFound, match="no vaccine rabies"):
        store.book_day_part(patient(), "rabies", DAY, "morning", T0)
    one_slot(store, local(DAY, "14:00"), vaccine="hpv9")
    with pytest.raises(AmbiguousVaccine, match="2026-12-01 offers hpv9, influenza: say which vaccine"):
        store.book_day_part(patient(), None, DAY, "morning", T0)
    assert store.book_day_part(patient(), "hpv9", DAY, "afternoon", T0).vaccine == "hpv9"
    # A slot that has started is not offered.
    with pytest.raises(NoSlot):
        store.book_day_part(patient(), "influenza", DAY, "morning", local(DAY, "09:00"))
    with pytest.raises(VaccinationError, match="part of day 'night'"):
        store.book_day_part(patient(), "influenza", DAY, "night", T0)


def test_next_and_last_booking(store: VaccinationStore) -> None:
    person = patient()
    assert store.next_booking(person, T0) is None
    assert store.last_booking(person, T0) is None
    flu, hpv = one_slot(store, local(DAY, "14:00")), one_slot(store, local(DAY, "09:00"), vaccine="hpv9")
    hpv_booking, flu_booking = store.book(person, hpv.id, T0), store.book(person, flu.id, T0)
    assert store.next_booking(person, T0) == hpv_booking
    assert store.next_booking(person, local(DAY, "09:00")) == flu_booking
    assert store.last_booking(person, local(DAY, "10:00")) == hpv_booking
    assert store.last_booking(person, local(DAY, "15:00")) == flu_booking
    assert store.next_booking(patient(), T0) is None
    store.cancel(flu_booking.id, T0, "patient")
    assert store.next_booking(person, local(DAY, "09:00")) is None


# --- reminders --------------------------------------------------------------------------------------------------


@dataclass
class FakeOutbox:
    """Records what would be enqueued; fails the first ``fail`` calls."""

    fail: int = 0
    messages: list[dict[str, str | None]] = field(default_factory=list)

    async def enqueue(self, *, patient_id: str, kind: str, text: str, subject_id: str | None) -> str:
        await asyncio.sleep(0)
        if self.fail > 0:
            self.fail -= 1
            raise MedhotlineError("SMS outbox unavailable")
        self.messages.append({"patient_id": patient_id, "kind": kind, "text": text, "subject_id": subject_id})
        return str(uuid.uuid4())


def test_reminder_text_says_when_where_and_what() -> None:
    def text_at(hhmm: str, now: datetime) -> str:
        starts = local(DAY, hhmm)
        record = BookingRecord(
            "b", "s", patient(), "influenza", "community1", starts, starts + timedelta(minutes=30), "booked", T0,
            None, None, None, None, "流感疫苗", "社区卫生服务中心",
        )  # fmt: skip
        return reminder_text(record, now)

    assert text_at("09:00", T0) == "【医院】您已预约明天上午9:00在社区卫生服务中心接种流感疫苗，请携带身份证。"
    assert "明天下午2:30" in text_at("14:30", T0)
    assert "明天中午12:00" in text_at("12:00", T0)
    assert "今天上午9:00" in text_at("09:00", local(DAY, "07:00"))
    assert "12月1日上午9:00" in text_at("09:00", T0 - timedelta(days=5))


async def test_day_before_reminders_are_sent_once(engine: Engine, store: VaccinationStore) -> None:
    nine, two = one_slot(store, local(DAY, "09:00")), one_slot(store, local(DAY, "14:00"))
    other_day = one_slot(store, local(DAY + timedelta(days=1), "09:00"), vaccine="hpv9")
    people = [patient() for _ in range(3)]
    first = store.book(people[0], nine.id, T0)
    second = store.book(people[1], two.id, T0)
    cancelled = store.book(people[2], nine.id, T0)
    store.book(people[2], other_day.id, T0)
    store.cancel(cancelled.id, T0, "patient")
    assert [b.id for b in store.due_reminders(DAY)] == [first.id, second.id]

    outbox = FakeOutbox()
    evening = local(DAY - timedelta(days=1), "18:00")
    with capture_logs() as logs:
        assert await send_day_before_reminders(store, outbox.enqueue, DAY, evening) == 2
    assert [m["subject_id"] for m in outbox.messages] == [first.id, second.id]
    assert [m["patient_id"] for m in outbox.messages] == people[:2]
    assert {m["kind"] for m in outbox.messages} == {"vaccination_reminder"}
    assert outbox.messages[0]["text"] == "【医院】您已预约明天上午9:00在社区卫生服务中心接种流感疫苗，请携带身份证。"
    assert not any(person in str(logs) for person in people)
    assert store.booking(first.id).reminded_at == evening
    # Again, and two runs at once (two nodes): nothing more.
    assert await send_day_before_reminders(store, outbox.enqueue, DAY, evening + timedelta(hours=1)) == 0
    assert store.due_reminders(DAY) == []
    assert store.mark_reminded(first.id, evening) is False
    assert len(outbox.messages) == 2


async def test_two_reminder_runs_at_once_send_each_reminder_once(store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"), capacity=20)
    bookings = [store.book(patient(), slot.id, T0) for _ in range(8)]
    outbox = FakeOutbox()
    evening = local(DAY - timedelta(days=1), "18:00")
    counts = await asyncio.gather(
        send_day_before_reminders(store, outbox.enqueue, DAY, evening),
        send_day_before_reminders(store, outbox.enqueue, DAY, evening + timedelta(seconds=1)),
    )
    assert sum(counts) == 8
    assert sorted(str(m["subject_id"]) for m in outbox.messages) == sorted(b.id for b in bookings)


async def test_a_failed_enqueue_leaves_the_reminder_due(store: VaccinationStore) -> None:
    slot = one_slot(store, local(DAY, "09:00"))
    booking = store.book(patient(), slot.id, T0)
    outbox = FakeOutbox(fail=1)
    evening = local(DAY - timedelta(days=1), "18:00")
    with pytest.raises(MedhotlineError, match="SMS outbox unavailable"):
        await send_day_before_reminders(store, outbox.enqueue, DAY, evening)
    assert [b.id for b in store.due_reminders(DAY)] == [booking.id]
    assert await send_day_before_reminders(store, outbox.enqueue, DAY, evening + timedelta(hours=1)) == 1
    assert len(outbox.messages) == 1
    # A slot that has already started gets no reminder.
    late = one_slot(store, local(DAY, "15:00"))
    store.book(patient(), late.id, T0)
    assert await send_day_before_reminders(store, outbox.enqueue, DAY, local(DAY, "15:05")) == 0


def test_mark_reminded_only_for_an_active_booking(store: VaccinationStore) -> None:
    booking = store.book(patient(), one_slot(store, local(DAY, "09:00")).id, T0)
    store.cancel(booking.id, T0, "patient")
    assert store.mark_reminded(booking.id, T0) is False
    assert store.release_reminder(booking.id, T0) is False


# --- adverse reactions and audit --------------------------------------------------------------------------------


def test_an_adverse_reaction_becomes_a_task_for_medical_staff(engine: Engine, store: VaccinationStore) -> None:
    person = patient()
    booking = store.book(person, one_slot(store, local(DAY, "09:00")).id, T0)
    tasks = TaskStore.for_engine(engine)
    later = local(DAY, "20:00")
    task_id = report_adverse_reaction(person, booking.id, later, tasks)
    [task] = tasks.open_tasks(kind="adverse_reaction")
    assert (task.id, task.patient_id, task.role, task.subject_id) == (
        task_id,
        person,
        ADVERSE_REACTION_ROLE,
        booking.id,
    )
    assert ADVERSE_REACTION_ROLE in ("nurse", "physician")
    assert report_adverse_reaction(person, booking.id, later, tasks) == task_id  # reported twice: one task
    unknown_booking = report_adverse_reaction(person, None, later, tasks)
    assert unknown_booking != task_id
    with pytest.raises(VaccinationError, match="not an opaque registry id"):
        report_adverse_reaction("王秀英", None, later, tasks)
    assert len(tasks.open_tasks(kind="adverse_reaction")) == 2


def test_booking_changes_are_audited_by_ids_only() -> None:
    memory = MemoryAuditStore()
    audit = AuditLog(memory)
    booking, slot, old = (str(uuid.uuid4()) for _ in range(3))
    audit_booking_change(audit, actor="agent1", role="operator", operation="change", booking_id=booking, slot_id=slot,
                         changed_from=old)  # fmt: skip
    [stored] = memory.entries()
    entry = stored.to_entry()
    assert (entry.actor, entry.action, entry.patient) == ("agent1", "change", None)
    assert entry.details == {"booking": booking, "slot": slot, "operation": "change", "changed_from": old}


# --- CLI --------------------------------------------------------------------------------------------------------


class Cli:
    """``medhotline vaccination …`` through this module's ``register`` on a fresh parser, handled like
    ``medhotline.cli.main`` does (an expected failure: one line on stderr, exit 1)."""

    def __init__(self, tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.url = url
        self.logs: list[MutableMapping[str, Any]] = []
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(
            f'[service]\nstate_dir = "{tmp_path / "state"}"\n[database]\nurl = "{url}"\n'
            f'[keyservice]\ndirectory = "{tmp_path / "keys"}"\n',
            encoding="utf-8",
        )

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="medhotline")
        register(parser.add_subparsers(dest="group", required=True))
        args = parser.parse_args(argv)
        with capture_logs() as logs:
            try:
                code = int(args.func(load_config(self.config), args))
            except MedhotlineError as exc:
                print(f"medhotline: {exc}", file=sys.stderr)
                code = 1
        self.logs.extend(logs)
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 1, out
        assert err.startswith("medhotline: "), err
        return err


def register_patients(engine: Engine, count: int) -> list[str]:
    """Registry rows with opaque ids (the tokens are placeholders: the CLI only checks the patient exists)."""
    ids = [patient() for _ in range(count)]
    now = datetime.now(UTC)
    with engine.begin() as connection:
        key_id = connection.execute(
            insert(DataKey)
            .values(purpose="patients", version=1, wrapped=b"\0" * 60, kek_version=1, created_at=now)
            .returning(DataKey.id)
        ).scalar_one()
        for index, patient_id in enumerate(ids):
            connection.execute(
                insert(Patient).values(
                    id=patient_id, blind_id=f"{index:064x}", phone_bidx=f"{index + 100:064x}", name_enc="x",
                    phone_enc="x", data_key_id=key_id, created_at=now, updated_at=now,
                )
            )  # fmt: skip
    return ids


def test_cli_sets_up_books_changes_and_cancels(
    database_url: str, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(tmp_path, database_url, capsys)
    first, second = register_patients(engine, 2)
    day = (datetime.now(LOCAL_TZ) + timedelta(days=7)).date()
    out = cli.ok("vaccination", "vaccines", "add", "influenza", "--name", "流感疫苗")
    assert "vaccine influenza added: 流感疫苗, 1 dose(s)" in out
    cli.ok("vaccination", "clinics", "add", "community1", "--name", "社区卫生服务中心", "--department", "vaccination")
    assert "community1" in cli.ok("vaccination", "clinics", "list")
    assert "influenza" in cli.ok("vaccination", "vaccines", "list")
    out = cli.ok(
        "vaccination", "slots", "add", "--clinic", "community1", "--vaccine", "influenza",
        "--start", f"{day} 09:00", "--minutes", "30", "--capacity", "1", "--count", "3",
    )  # fmt: skip
    assert "3 slot(s) added" in out
    listed = cli.ok("vaccination", "slots", "list", "--date", str(day)).splitlines()
    assert len(listed) == 3
    assert all(line.endswith("1/1 free") for line in listed)
    assert [line.split()[2][:5] for line in listed] == ["09:00", "09:30", "10:00"]
    slot_ids = [line.split()[0] for line in listed]

    out = cli.ok("vaccination", "book", "--patient", first, "--slot", slot_ids[0], "--as", "agent1")
    assert f"流感疫苗 at 社区卫生服务中心, {day} 09:00" in out
    booking = out.split()[1].rstrip(":")
    err = cli.fails("vaccination", "book", "--patient", second, "--slot", slot_ids[0])
    assert f"slot {slot_ids[0]}" in err
    assert "is full" in err
    assert second not in err
    out = cli.ok("vaccination", "book", "--patient", second, "--date", str(day), "--part", "morning")
    assert f"{day} 09:30" in out
    assert "0/1 free" in cli.ok("vaccination", "slots", "list", "--vaccine", "influenza").splitlines()[1]

    out = cli.ok("vaccination", "change", booking, "--slot", slot_ids[2], "--as", "agent1")
    new_booking = out.split()[5].rstrip(",")
    assert f"{day} 10:00" in out
    assert f"changed from {booking}" in out
    err = cli.fails("vaccination", "change", new_booking, "--slot", slot_ids[1])
    assert f"slot {slot_ids[1]}" in err
    assert "is full" in err
    cli.ok("vaccination", "cancel", new_booking, "--as", "agent1")
    err = cli.fails("vaccination", "cancel", new_booking, "--as", "agent1")
    assert f"booking {new_booking} is cancelled: nothing cancelled" in err
    history = cli.ok("vaccination", "bookings", "--patient", first).splitlines()
    assert [line.split()[:2] for line in history] == [[booking, "cancelled"], [new_booking, "cancelled"]]
    assert consistency_problems(engine) == []

    entries = [stored.to_entry() for stored in SqlAuditStore(engine).entries()]
    assert [(e.actor, e.action, e.details["operation"], e.patient) for e in entries] == [
        ("agent1", "change", "book", None),
        (entries[1].actor, "change", "book", None),
        ("agent1", "change", "change", None),
        ("agent1", "change", "cancel", None),
    ]
    assert entries[2].details == {"booking": new_booking, "slot": slot_ids[2], "operation": "change",
                                  "changed_from": booking}  # fmt: skip
    assert not any(first in str(e.details) or second in str(e.details) for e in entries)
    assert [log["event"] for log in cli.logs] == [
        "vaccination.booked", "vaccination.booked", "vaccination.changed", "vaccination.cancelled"
    ]  # fmt: skip
    assert not any(first in str(log) or second in str(log) for log in cli.logs)


def test_cli_refuses_bad_arguments(
    database_url: str, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(tmp_path, database_url, capsys)
    assert "--start '2026-12-01 9am'" in cli.fails(
        "vaccination", "slots", "add", "--clinic", "c", "--vaccine", "v", "--start", "2026-12-01 9am",
        "--minutes", "30", "--capacity", "5",
    )  # fmt: skip
    assert "--date '2026-02-30'" in cli.fails("vaccination", "slots", "list", "--date", "2026-02-30")
    assert "book needs --slot SLOT_ID, or --date" in cli.fails("vaccination", "book", "--patient", patient())
    assert "--date needs --part" in cli.fails("vaccination", "book", "--patient", patient(), "--date", "2026-12-01")
    err = cli.fails("vaccination", "book", "--patient", "13800138000", "--slot", "x")
    assert "not an opaque registry id" in err
    assert "13800138000" not in err
    assert "no patient" in cli.fails("vaccination", "book", "--patient", patient(), "--slot", "x")
    assert "no vaccination booking nope" in cli.fails("vaccination", "cancel", "nope", "--as", "agent1")
    assert "--as must be an account id" in cli.fails("vaccination", "cancel", "nope", "--as", "agent 1")
    assert "no clinic c" in cli.fails(
        "vaccination", "slots", "add", "--clinic", "c", "--vaccine", "v", "--start", "2026-12-01 09:00",
        "--minutes", "30", "--capacity", "5",
    )  # fmt: skip
    assert parse_start("2026-12-01 09:05") == datetime(2026, 12, 1, 9, 5, tzinfo=LOCAL_TZ)
    with pytest.raises(MedhotlineError, match="no such time of day"):
        parse_start("2026-12-01 24:00")


def test_cli_refuses_an_old_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'old' / 'medhotline.db'}"
    db.upgrade(url, "0009_outreach")
    cli = Cli(tmp_path, url, capsys)
    assert "run `medhotline db upgrade`" in cli.fails("vaccination", "vaccines", "list")
