"""Concurrent bookings against one database never overbook a slot.

Several "nodes" (each its own engine and connection pool) run many threads at once, released together by a
barrier, against a real PostgreSQL (and, for the single-node deployment, a SQLite file):

- 40 patients race for the 10 seats of one slot: exactly 10 get one, the other 30 are told the slot is full;
- one patient books from many threads at once: one booking, whatever the slots;
- books, moves to a small slot, cancels, swaps between two slots in both directions and double cancels, all at
  once: every slot's counter equals the bookings holding a seat, never above capacity, and every double cancel
  freed exactly one seat.

The harness judges the database afterwards (:func:`tests.unit.scheduler.test_vaccination.consistency_problems`), not the
threads' own story, and it is shown to catch what it is there to catch: a booking that reads ``booked`` and then
writes ``booked + 1`` overbooks (every thread reads before any writes), a cancel that checks the state and then
writes frees two seats for one booking, and a change that locks the old slot before the new one (instead of in id
order) deadlocks when bookings swap in both directions. The real operations pass the same harness.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, insert, select, update

from ground import db
from scheduler import vaccination
from scheduler.vaccination import (
    LOCAL_TZ,
    AlreadyBooked,
    BookingRecord,
    SlotFull,
    VaccinationStore,
)
from scheduler.vaccination_tables import VaccinationBooking, VaccinationSlot
from tests.unit.scheduler.test_vaccination import consistency_problems, seed

T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
DAY = date(2026, 12, 1)
JOIN_TIMEOUT = 300
BOOKERS = 32

Book = Callable[[str, str, datetime], object]


@dataclass
class Tally:
    """What the racing threads saw: successes and refusals by kind, and any unexpected error (a failure)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter[str] = field(default_factory=Counter)
    bookings: list[BookingRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, outcome: str, booking: object = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if isinstance(booking, BookingRecord):
                self.bookings.append(booking)

    def error(self, where: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{where}: {type(exc).__name__}: {exc}")


@pytest.fixture
def engines() -> Iterator[Callable[[str, int], list[Engine]]]:
    """``count`` engines (nodes) on ``url``; all disposed after the test."""
    made: list[Engine] = []

    def make(url: str, count: int) -> list[Engine]:
        new = [db.make_engine(url) for _ in range(count)]
        made.extend(new)
        return new

    yield make
    for engine in made:
        engine.dispose()


def prepare(url: str, capacities: list[int]) -> list[str]:
    """A migrated database with the catalogue and one influenza slot per capacity (ids in start order)."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        store = VaccinationStore.for_engine(engine)
        seed(store)
        start = datetime(DAY.year, DAY.month, DAY.day, 9, 0, tzinfo=LOCAL_TZ)
        return [
            store.add_slots("community1", "influenza", start + index * timedelta(hours=1), minutes=30,
                            capacity=capacity, at=T0)[0].id
            for index, capacity in enumerate(capacities)
        ]  # fmt: skip
    finally:
        engine.dispose()


def run_threads(workers: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=work, name=f"racer-{index}") for index, work in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a racing thread hung"


def race_for_one_slot(books: list[Book], slot_id: str, patients: list[str]) -> Tally:
    """Patient ``i`` books through ``books[i % len(books)]``; all start at the same instant."""
    tally = Tally()
    start = threading.Barrier(len(patients))

    def worker(index: int, patient_id: str) -> Callable[[], None]:
        def work() -> None:
            book = books[index % len(books)]
            start.wait(timeout=60)
            try:
                tally.count("booked", book(patient_id, slot_id, T0))
            except SlotFull:
                tally.count("full")
            except Exception as exc:
                tally.error(f"patient #{index}", exc)

        return work

    run_threads([worker(index, patient_id) for index, patient_id in enumerate(patients)])
    return tally


def seats_of(engine: Engine, slot_id: str) -> tuple[int, int]:
    """The slot's counter and the number of its active bookings."""
    with engine.connect() as connection:
        booked = connection.scalar(select(VaccinationSlot.booked).where(VaccinationSlot.id == slot_id))
        active = connection.scalar(
            select(func.count()).where(VaccinationBooking.slot_id == slot_id, VaccinationBooking.state == "booked")
        )
    return int(booked or 0), int(active or 0)


def stores_of(nodes: list[Engine]) -> list[VaccinationStore]:
    return [VaccinationStore.for_engine(engine) for engine in nodes]


# --- many patients, one slot ------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_forty_patients_race_for_ten_seats_on_postgres(
    postgres_url: str, engines: Callable[[str, int], list[Engine]]
) -> None:
    [slot_id] = prepare(postgres_url, [10])
    nodes = engines(postgres_url, 4)
    patients = [str(uuid.uuid4()) for _ in range(40)]
    tally = race_for_one_slot([store.book for store in stores_of(nodes)], slot_id, patients)
    assert tally.errors == []
    assert tally.outcomes == Counter({"booked": 10, "full": 30})
    assert seats_of(nodes[0], slot_id) == (10, 10)
    assert len({b.patient_id for b in tally.bookings}) == 10
    assert consistency_problems(nodes[0]) == []


def test_sixteen_patients_race_for_five_seats_on_one_sqlite_file(
    tmp_path: Path, engines: Callable[[str, int], list[Engine]]
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    [slot_id] = prepare(url, [5])
    nodes = engines(url, 2)
    patients = [str(uuid.uuid4()) for _ in range(16)]
    tally = race_for_one_slot([store.book for store in stores_of(nodes)], slot_id, patients)
    assert tally.errors == []
    assert tally.outcomes == Counter({"booked": 5, "full": 11})
    assert seats_of(nodes[0], slot_id) == (5, 5)
    assert consistency_problems(nodes[0]) == []


# --- one patient, many threads ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_one_patient_booking_from_many_threads_gets_one_booking(
    postgres_url: str, engines: Callable[[str, int], list[Engine]]
) -> None:
    slots = prepare(postgres_url, [5] * 6)
    nodes = engines(postgres_url, 3)
    stores = stores_of(nodes)
    person = str(uuid.uuid4())
    tally = Tally()
    start = threading.Barrier(12)

    def worker(index: int) -> Callable[[], None]:
        def work() -> None:
            start.wait(timeout=60)
            try:
                tally.count("booked", stores[index % 3].book(person, slots[index % len(slots)], T0))
            except AlreadyBooked:
                tally.count("already")
            except Exception as exc:
                tally.error(f"thread {index}", exc)

        return work

    run_threads([worker(index) for index in range(12)])
    assert tally.errors == []
    assert tally.outcomes == Counter({"booked": 1, "already": 11})
    assert sum(seats_of(nodes[0], slot)[0] for slot in slots) == 1
    assert consistency_problems(nodes[0]) == []


# --- books, changes, cancels mixed ------------------------------------------------------------------------------


@pytest.mark.postgres
def test_books_changes_and_cancels_mixed_keep_the_counters_exact(
    postgres_url: str, engines: Callable[[str, int], list[Engine]]
) -> None:
    """All at once, on four nodes: 32 patients race for the 10 seats of one slot and every winner tries to move on to
    a slot of 4 seats (half of those who get there then cancel); 6 bookings swap between two slots in both
    directions; 6 bookings are each cancelled by two threads at the same instant."""
    swap_a, swap_b, crowded, small, quiet = prepare(postgres_url, [6, 6, 10, 4, 12])
    nodes = engines(postgres_url, 4)
    stores = stores_of(nodes)
    swapping = [stores[0].book(str(uuid.uuid4()), slot, T0) for slot in (swap_a, swap_b) for _ in range(3)]
    cancelling = [stores[0].book(str(uuid.uuid4()), quiet, T0) for _ in range(6)]
    tally = Tally()
    double_cancels: Counter[str] = Counter()

    def booker(index: int) -> Callable[[], None]:
        def work() -> None:
            store = stores[index % len(stores)]
            start.wait(timeout=60)
            try:
                booking = store.book(str(uuid.uuid4()), crowded, T0)
            except SlotFull:
                tally.count("book_full")
                return
            except Exception as exc:
                tally.error(f"booker {index}", exc)
                return
            tally.count("booked", booking)
            try:
                moved = store.change(booking.id, small, T0, f"node{index % len(stores)}")
            except SlotFull:
                tally.count("move_full")
                return
            except Exception as exc:
                tally.error(f"booker {index} changing", exc)
                return
            tally.count("moved", moved)
            if index % 2:
                try:
                    tally.count("cancelled" if store.cancel(moved.id, T0, "agent1") else "not_cancelled")
                except Exception as exc:
                    tally.error(f"booker {index} cancelling", exc)

        return work

    def swapper(booking: BookingRecord, index: int) -> Callable[[], None]:
        def work() -> None:
            store = stores[index % len(stores)]
            start.wait(timeout=60)
            try:
                tally.count("swapped", store.change(booking.id, swap_b if booking.slot_id == swap_a else swap_a, T0,
                                                    "agent2"))  # fmt: skip
            except Exception as exc:
                tally.error(f"swapper {index}", exc)

        return work

    def canceller(booking: BookingRecord, index: int) -> Callable[[], None]:
        def work() -> None:
            store = stores[index % len(stores)]
            start.wait(timeout=60)
            try:
                if store.cancel(booking.id, T0, "agent3"):
                    with tally.lock:
                        double_cancels[booking.id] += 1
            except Exception as exc:
                tally.error(f"canceller {index}", exc)

        return work

    workers = [booker(index) for index in range(BOOKERS)]
    workers += [swapper(booking, index) for index, booking in enumerate(swapping)]
    workers += [canceller(booking, index) for index, booking in enumerate(cancelling * 2)]
    start = threading.Barrier(len(workers))
    run_threads(workers)

    print(dict(tally.outcomes))
    assert tally.errors == []
    booked, moved, cancelled = (tally.outcomes[key] for key in ("booked", "moved", "cancelled"))
    # Every attempt was decided: a seat or "full". The first ten bookings and the first four moves find a seat
    # (seats only free up after that); a move frees a seat in the crowded slot, which a later booker may take.
    assert booked + tally.outcomes["book_full"] == BOOKERS
    assert moved + tally.outcomes["move_full"] == booked
    assert booked >= 10
    assert moved >= 4
    assert tally.outcomes["book_full"] > 0
    assert tally.outcomes["swapped"] == 6  # there is always room: each slot gives back what it receives
    assert tally.outcomes["not_cancelled"] == 0
    # Each booking cancelled by two threads at once was cancelled once: exactly one seat freed for it.
    assert double_cancels == Counter({booking.id: 1 for booking in cancelling})
    assert seats_of(nodes[0], crowded) == (booked - moved,) * 2
    assert seats_of(nodes[0], small) == (moved - cancelled,) * 2
    assert seats_of(nodes[0], swap_a) == seats_of(nodes[0], swap_b) == (3, 3)
    assert seats_of(nodes[0], quiet) == (0, 0)
    assert consistency_problems(nodes[0]) == []


# --- the harness against a booking that is not atomic -----------------------------------------------------------


@pytest.mark.postgres
def test_the_harness_catches_a_booking_that_reads_then_writes(
    postgres_url: str, engines: Callable[[str, int], list[Engine]]
) -> None:
    """Every thread reads ``booked`` (0 of 2) before any writes, then writes ``booked + 1`` and its booking: four
    bookings for two seats and a counter of 1. The same harness and checks as the real booking's race."""
    [slot_id] = prepare(postgres_url, [2])
    nodes = engines(postgres_url, 2)
    all_read = threading.Barrier(4)

    def naive(engine: Engine) -> Book:
        def book(patient_id: str, slot: str, at: datetime) -> str:
            with engine.begin() as connection:
                booked, capacity = connection.execute(
                    select(VaccinationSlot.booked, VaccinationSlot.capacity).where(VaccinationSlot.id == slot)
                ).one()
            if booked >= capacity:
                raise SlotFull(f"slot {slot} is full", slot)
            all_read.wait(timeout=30)
            booking_id = str(uuid.uuid4())
            with engine.begin() as connection:
                connection.execute(update(VaccinationSlot).where(VaccinationSlot.id == slot).values(booked=booked + 1))
                connection.execute(
                    insert(VaccinationBooking).values(
                        id=booking_id, slot_id=slot, patient_id=patient_id, vaccine="influenza", state="booked",
                        created_at=at,
                    )
                )  # fmt: skip
            return booking_id

        return book

    patients = [str(uuid.uuid4()) for _ in range(4)]
    tally = race_for_one_slot([naive(engine) for engine in nodes], slot_id, patients)
    assert tally.errors == []
    assert tally.outcomes == Counter({"booked": 4})
    problems = consistency_problems(nodes[0])
    assert f"slot {slot_id}: 4 bookings for 2 seats" in problems, problems
    assert f"slot {slot_id}: counter 1, 4 bookings hold a seat" in problems, problems


@pytest.mark.postgres
def test_the_harness_catches_a_double_cancel_that_reads_then_writes(
    postgres_url: str, engines: Callable[[str, int], list[Engine]]
) -> None:
    """Both threads see the booking still booked, then each marks it cancelled and gives a seat back: two seats
    freed for one booking. The consistency check finds the counter below the bookings that hold a seat."""
    [slot_id] = prepare(postgres_url, [5])
    nodes = engines(postgres_url, 2)
    stores = stores_of(nodes)
    bookings = [stores[0].book(str(uuid.uuid4()), slot_id, T0) for _ in range(2)]
    both_read = threading.Barrier(2)
    freed: Counter[str] = Counter()

    def naive_cancel(engine: Engine, booking_id: str) -> Callable[[], None]:
        def work() -> None:
            with engine.begin() as connection:
                state = connection.scalar(select(VaccinationBooking.state).where(VaccinationBooking.id == booking_id))
            both_read.wait(timeout=30)
            if state != "booked":
                return
            with engine.begin() as connection:
                connection.execute(
                    update(VaccinationBooking)
                    .where(VaccinationBooking.id == booking_id)
                    .values(state="cancelled", cancelled_at=T0, cancelled_by="naive")
                )
                connection.execute(
                    update(VaccinationSlot)
                    .where(VaccinationSlot.id == slot_id)
                    .values(booked=VaccinationSlot.booked - 1)
                )
            freed[booking_id] += 1

        return work

    run_threads([naive_cancel(engine, bookings[0].id) for engine in nodes])
    assert freed == Counter({bookings[0].id: 2})
    assert consistency_problems(nodes[0]) == [f"slot {slot_id}: counter 0, 1 bookings hold a seat"]


@pytest.mark.postgres
def test_the_swap_race_catches_an_unordered_lock_acquisition(
    postgres_url: str, engines: Callable[[str, int], list[Engine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes that lock the old slot before the new one (instead of in id order) deadlock when bookings swap
    between two slots in both directions at once: PostgreSQL aborts one, which the swap harness reports as an
    error. The ordered change passes the same harness (the mixed test above, and the last round here)."""
    slot_a, slot_b = prepare(postgres_url, [200, 200])
    nodes = engines(postgres_url, 2)
    stores = stores_of(nodes)

    def swap_round() -> Tally:
        tally = Tally()
        pairs = [(stores[0].book(str(uuid.uuid4()), a, T0), b) for a, b in ((slot_a, slot_b), (slot_b, slot_a))
                 for _ in range(4)]  # fmt: skip
        start = threading.Barrier(len(pairs))

        def worker(index: int, booking: BookingRecord, target: str) -> Callable[[], None]:
            def work() -> None:
                start.wait(timeout=60)
                try:
                    tally.count("swapped", stores[index % 2].change(booking.id, target, T0, "agent2"))
                except Exception as exc:
                    tally.error(f"swapper {index}", exc)

            return work

        run_threads([worker(index, booking, target) for index, (booking, target) in enumerate(pairs)])
        return tally

    with monkeypatch.context() as patched:
        patched.setattr(vaccination, "_slot_lock_order", lambda old, new: [old, new])
        errors: list[str] = []
        for _ in range(20):  # a deadlock needs the two directions to interleave: usually the first round does
            errors += swap_round().errors
            if any("deadlock detected" in error for error in errors):
                break
    assert any("deadlock detected" in error for error in errors), errors
    assert consistency_problems(nodes[0]) == []  # an aborted change leaves nothing half done
    ordered = swap_round()
    assert ordered.errors == []
    assert ordered.outcomes == Counter({"swapped": 8})
