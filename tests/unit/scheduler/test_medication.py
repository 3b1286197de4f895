"""Medication reminders and confirmations against a real key service and a real database (SQLite, PostgreSQL),
and the pure ``next_due`` across days, time zones and daylight-saving changes.

The medication and dose must exist only encrypted: the SQLite file and its WAL are searched byte for byte.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.fields import FieldDecryptError
from compliance.keyservice_client import KeyServiceClient
from ground.models import Base
from scheduler.medication import (
    MAX_TEXT_CHARS,
    MedicationError,
    MedicationStore,
    check_at_time,
    next_due,
)
from scheduler.tables import MedicationReminder, OutreachAttempt

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
# 2025-03-14 09:30 in Shanghai.
NOW = datetime(2025, 3, 14, 1, 30, tzinfo=UTC)
MEDICATION = "阿托伐他汀钙片"
DOSE = "每晚一次，每次20mg"
SECRETS = (MEDICATION, "阿托伐他汀", DOSE, "20mg")


@pytest.fixture
def ring(engine: Engine, keys: KeyServiceClient) -> DataKeyRing:
    return DataKeyRing(DataKeyStore.for_engine(engine), keys)


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> MedicationStore:
    return MedicationStore(sessions)


async def add(store: MedicationStore, ring: DataKeyRing, **changes: Any) -> str:
    args: dict[str, Any] = {
        "patient_id": str(uuid.uuid4()),
        "medication": MEDICATION,
        "dose": DOSE,
        "at_time": "20:00",
        "channel": "call",
        "responsible": "dr.li",
        "now": NOW,
    }
    return await store.add(ring, **(args | changes))


def attempt(engine: Engine, reminder_id: str, patient_id: str) -> str:
    """An outreach attempt row (a confirmation refers to the call it was given on)."""
    attempt_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        session.add(
            OutreachAttempt(
                id=attempt_id, kind="medication", subject_id=reminder_id, patient_id=patient_id,
                round_id=str(uuid.uuid4()), attempt=1, state="answered", not_before=NOW,
            )
        )  # fmt: skip
    return attempt_id


def database_dump(engine: Engine, database_url: str) -> bytes:
    """Every row of every table as text, plus (SQLite) the raw database and WAL files."""
    parts: list[bytes] = []
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if conn.dialect.has_table(conn, table.name):
                parts += [repr(tuple(row)).encode("utf-8") for row in conn.execute(table.select())]
    path = database_url.removeprefix("sqlite:///")
    if path != database_url:
        engine.dispose()  # checkpoint and close: the main file then holds everything
        for suffix in ("", "-wal", "-journal"):
            if Path(path + suffix).exists():
                parts.append(Path(path + suffix).read_bytes())
    return b"\n".join(parts)


def set_row(engine: Engine, reminder_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(MedicationReminder).where(MedicationReminder.id == reminder_id).values(**values))


# --- storage --------------------------------------------------------------------------------------------------------


async def test_a_reminder_round_trips_and_is_first_due_at_its_next_local_time(
    store: MedicationStore, ring: DataKeyRing
) -> None:
    reminder_id = await add(store, ring)
    assert await store.text(ring, reminder_id) == (MEDICATION, DOSE)
    record = store.get(reminder_id)
    # 20:00 in Shanghai is 12:00 UTC, later the same day as NOW (09:30 local).
    assert record.next_due_at == datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    assert (record.at_time, record.channel, record.responsible, record.active) == ("20:00", "call", "dr.li", True)
    assert record.created_at == NOW
    assert "medication_token" not in repr(record)


async def test_whitespace_is_normalised(store: MedicationStore, ring: DataKeyRing) -> None:
    reminder_id = await add(store, ring, medication="  二甲双胍   缓释片 ", dose="0.5g\t每日两次")
    assert await store.text(ring, reminder_id) == ("二甲双胍 缓释片", "0.5g 每日两次")


async def test_the_medication_is_never_in_the_database_in_clear(
    store: MedicationStore, ring: DataKeyRing, engine: Engine, database_url: str
) -> None:
    with capture_logs() as logs:
        reminder_id = await add(store, ring)
        await store.text(ring, reminder_id)
    dump = database_dump(engine, database_url)
    found = [s for s in SECRETS if s.encode("utf-8") in dump]
    assert not found, f"the database holds {found} in clear"
    assert not [s for s in SECRETS if s in repr(logs)], "a log line names the medication"
    assert reminder_id.encode() in dump  # the dump did read the row


async def test_the_token_length_does_not_tell_a_short_name_from_a_long_one(
    store: MedicationStore, ring: DataKeyRing
) -> None:
    short = await add(store, ring, medication="A", dose="1")
    long = await add(store, ring, medication="阿莫西林克拉维酸钾", dose="每次一片，每日三次")
    assert len(store.get(short).medication_token) == len(store.get(long).medication_token)


async def test_a_token_moved_to_another_reminder_does_not_decrypt(
    store: MedicationStore, ring: DataKeyRing, engine: Engine
) -> None:
    first = await add(store, ring)
    second = await add(store, ring, medication="氨氯地平", dose="5mg")
    set_row(engine, second, medication_token=store.get(first).medication_token)
    with pytest.raises(FieldDecryptError, match=f"cannot decrypt medication_reminders.medication of row {second}"):
        await store.text(ring, second)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
async def test_a_damaged_token_does_not_decrypt(
    store: MedicationStore, ring: DataKeyRing, engine: Engine, damage: str
) -> None:
    reminder_id = await add(store, ring)
    token = store.get(reminder_id).medication_token
    flipped = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
    set_row(engine, reminder_id, medication_token={"truncated": token[:30], "flipped": flipped, "empty": ""}[damage])
    with pytest.raises(FieldDecryptError, match=f"of row {reminder_id}") as info:
        await store.text(ring, reminder_id)
    assert MEDICATION not in str(info.value)


async def test_a_token_under_another_purposes_key_is_refused(
    store: MedicationStore, ring: DataKeyRing, engine: Engine
) -> None:
    reminder_id = await add(store, ring)
    other = await ring.current_key("patients")
    set_row(engine, reminder_id, data_key_id=other.id)
    with pytest.raises(MedicationError, match=f"data key {other.id} is not an outreach key"):
        await store.text(ring, reminder_id)


async def test_a_well_encrypted_value_that_is_not_a_medication_is_refused(
    store: MedicationStore, ring: DataKeyRing, engine: Engine
) -> None:
    reminder_id = await add(store, ring)
    key = await ring.current_key("outreach")
    for plain, message in [("not json", "is not JSON"), ('{"medication": 1, "dose": "x"}', "lacks medication")]:
        async with ring.cipher([key]) as cipher:
            token = cipher.encrypt(plain, table="medication_reminders", column="medication", row_id=reminder_id)
        set_row(engine, reminder_id, medication_token=token)
        with pytest.raises(MedicationError, match=f"reminder {reminder_id}: decrypted value {message}"):
            await store.text(ring, reminder_id)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patient_id": "13800138000"}, "registry id"),
        ({"medication": ""}, "medication must be 1-"),
        ({"medication": "药" * (MAX_TEXT_CHARS + 1)}, "medication must be 1-"),
        ({"dose": "   "}, "dose must be 1-"),
        ({"dose": "1\x07"}, "dose contains control characters"),
        ({"at_time": "8:00"}, "HH:MM"),
        ({"at_time": "24:00"}, "HH:MM"),
        ({"channel": "email"}, "channel must be one of call, sms"),
        ({"responsible": "dr li; drop"}, "responsible must be an account id"),
        ({"now": datetime(2025, 3, 14, 9, 30)}, "timezone-aware"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_stored(
    store: MedicationStore, ring: DataKeyRing, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(MedicationError, match=message) as info:
        await add(store, ring, **changes)
    assert "13800138000" not in str(info.value)
    assert store.reminders() == []


async def test_unknown_reminders_are_named_in_the_error(store: MedicationStore, ring: DataKeyRing) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: store.get(missing),
        lambda: store.advance(missing, NOW),
        lambda: store.deactivate(missing),
        lambda: store.record_confirmation(missing, None, True, "1,1", NOW),
    ):
        with pytest.raises(MedicationError, match=f"no medication reminder {missing}"):
            call()
    with pytest.raises(MedicationError, match=f"no medication reminder {missing}"):
        await store.text(ring, missing)


# --- due, advance, deactivate ----------------------------------------------------------------------------------------


async def test_due_lists_active_reminders_whose_time_has_come(store: MedicationStore, ring: DataKeyRing) -> None:
    morning = await add(store, ring, at_time="10:00")  # 02:00 UTC
    evening = await add(store, ring, at_time="20:00")  # 12:00 UTC
    stopped = await add(store, ring, at_time="09:45")  # 01:45 UTC
    assert store.deactivate(stopped)
    assert not store.deactivate(stopped)
    assert store.due(NOW) == []
    assert [r.id for r in store.due(datetime(2025, 3, 14, 2, 0, tzinfo=UTC))] == [morning]
    assert [r.id for r in store.due(datetime(2025, 3, 14, 12, 0, tzinfo=UTC))] == [morning, evening]


async def test_advance_moves_the_next_dose_once_even_when_two_nodes_fire(
    store: MedicationStore, ring: DataKeyRing
) -> None:
    reminder_id = await add(store, ring)
    due = store.get(reminder_id).next_due_at
    following = next_due("20:00", due, SHANGHAI)
    assert following == due + timedelta(days=1)
    assert store.advance(reminder_id, following, from_due=due)
    assert not store.advance(reminder_id, following + timedelta(days=1), from_due=due)  # the second node
    assert store.get(reminder_id).next_due_at == following
    assert store.advance(reminder_id, due)  # unconditional
    assert store.get(reminder_id).next_due_at == due


async def test_reminders_are_listed_per_patient(store: MedicationStore, ring: DataKeyRing) -> None:
    patient = str(uuid.uuid4())
    late = await add(store, ring, patient_id=patient, at_time="21:00", channel="sms", responsible=None)
    early = await add(store, ring, patient_id=patient, at_time="07:30")
    await add(store, ring)
    assert [r.id for r in store.reminders(patient_id=patient)] == [early, late]
    store.deactivate(early)
    assert [r.id for r in store.reminders(patient_id=patient, active_only=True)] == [late]
    assert store.get(late).channel == "sms"


# --- confirmations ------------------------------------------------------------------------------------------------


async def test_confirmations_are_kept_as_evidence_and_idempotent_per_call(
    store: MedicationStore, ring: DataKeyRing, engine: Engine
) -> None:
    reminder_id = await add(store, ring)
    patient = store.get(reminder_id).patient_id
    first_call, second_call = attempt(engine, reminder_id, patient), attempt(engine, reminder_id, patient)
    once = store.record_confirmation(reminder_id, first_call, False, "1,-", NOW)
    again = store.record_confirmation(reminder_id, first_call, True, "1,1", NOW + timedelta(minutes=1))
    assert again == once  # a retried job does not rewrite what the patient answered
    store.record_confirmation(reminder_id, second_call, True, "1,1", NOW + timedelta(minutes=30))
    store.record_confirmation(reminder_id, None, False, "2", NOW + timedelta(minutes=40))  # not on a call
    history = store.confirmations(reminder_id)
    assert [(c.attempt_id, c.confirmed, c.keys) for c in history] == [
        (first_call, False, "1,-"),
        (second_call, True, "1,1"),
        (None, False, "2"),
    ]
    assert store.confirmations(str(uuid.uuid4())) == []


@pytest.mark.parametrize("pressed", ["", "1,1,1", "1;1", "12345678", "a,b", " 1,1"])
async def test_confirmation_keys_that_are_not_keypad_answers_are_refused(
    store: MedicationStore, ring: DataKeyRing, pressed: str
) -> None:
    reminder_id = await add(store, ring)
    with pytest.raises(MedicationError, match=f"confirmation keys of reminder {reminder_id}"):
        store.record_confirmation(reminder_id, None, True, pressed, NOW)
    assert store.confirmations(reminder_id) == []


# --- next_due --------------------------------------------------------------------------------------------------------


def local(
    tz: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int, second: int = 0, us: int = 0
) -> datetime:
    """A wall-clock time in ``tz`` (``fold=0``: the first of a repeated hour)."""
    return datetime(year, month, day, hour, minute, second, us, tzinfo=tz)


@pytest.mark.parametrize(
    ("at_time", "after", "expected"),
    [
        # Later the same local day.
        ("08:00", local(SHANGHAI, 2025, 3, 14, 7, 59), local(SHANGHAI, 2025, 3, 14, 8, 0)),
        # Strictly after: exactly at the time means tomorrow; a microsecond before means now.
        ("08:00", local(SHANGHAI, 2025, 3, 14, 8, 0), local(SHANGHAI, 2025, 3, 15, 8, 0)),
        ("08:00", local(SHANGHAI, 2025, 3, 14, 7, 59, 59, 999999), local(SHANGHAI, 2025, 3, 14, 8, 0)),
        # Midnight, and the last minute of the day.
        ("00:00", local(SHANGHAI, 2025, 3, 14, 23, 59), local(SHANGHAI, 2025, 3, 15, 0, 0)),
        ("23:59", local(SHANGHAI, 2025, 3, 14, 0, 0), local(SHANGHAI, 2025, 3, 14, 23, 59)),
        # Across a month and a year end, and a leap day.
        ("07:00", local(SHANGHAI, 2024, 12, 31, 21, 0), local(SHANGHAI, 2025, 1, 1, 7, 0)),
        ("07:00", local(SHANGHAI, 2024, 2, 28, 8, 0), local(SHANGHAI, 2024, 2, 29, 7, 0)),
        # ``after`` in UTC on the previous calendar day: the local date counts (UTC 23:30 is 07:30 in Shanghai).
        ("08:00", datetime(2025, 3, 13, 23, 30, tzinfo=UTC), local(SHANGHAI, 2025, 3, 14, 8, 0)),
        ("07:00", datetime(2025, 3, 13, 23, 30, tzinfo=UTC), local(SHANGHAI, 2025, 3, 15, 7, 0)),
    ],
)
def test_next_due_in_shanghai(at_time: str, after: datetime, expected: datetime) -> None:
    due = next_due(at_time, after, SHANGHAI)
    assert due == expected
    assert due.tzinfo is UTC
    assert due.astimezone(SHANGHAI).strftime("%H:%M") == at_time


def test_next_due_keeps_local_time_across_daylight_saving() -> None:
    # New York, 2024-03-10: 02:00 EST jumps to 03:00 EDT. 08:00 stays 08:00 local (13:00 UTC before, 12:00 after).
    assert next_due("08:00", local(NEW_YORK, 2024, 3, 9, 9, 0), NEW_YORK) == datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
    assert next_due("08:00", local(NEW_YORK, 2024, 3, 8, 9, 0), NEW_YORK) == datetime(2024, 3, 9, 13, 0, tzinfo=UTC)
    # 02:30 does not exist that day: it fires at 03:30 EDT (07:30 UTC), the offset before the gap applied.
    skipped = next_due("02:30", local(NEW_YORK, 2024, 3, 10, 0, 0), NEW_YORK)
    assert skipped == datetime(2024, 3, 10, 7, 30, tzinfo=UTC)
    assert skipped.astimezone(NEW_YORK).strftime("%H:%M %Z") == "03:30 EDT"
    # 2024-11-03: 02:00 EDT falls back to 01:00 EST, so 01:30 happens twice. It fires at the first (05:30 UTC) ...
    first = next_due("01:30", local(NEW_YORK, 2024, 11, 3, 0, 0), NEW_YORK)
    assert first == datetime(2024, 11, 3, 5, 30, tzinfo=UTC)
    # ... and after that, not at the repeat an hour later (06:30 UTC) but the next day.
    assert next_due("01:30", first, NEW_YORK) == datetime(2024, 11, 4, 6, 30, tzinfo=UTC)
    # London's spring-forward at 01:00 GMT: 01:30 is skipped, 00:30 is not.
    assert next_due("00:30", local(LONDON, 2025, 3, 29, 12, 0), LONDON) == datetime(2025, 3, 30, 0, 30, tzinfo=UTC)


def test_next_due_over_a_year_of_days_is_one_a_day_at_the_local_time() -> None:
    due = datetime(2024, 1, 1, tzinfo=UTC)
    days = []
    for _ in range(366):
        due = next_due("08:00", due, NEW_YORK)
        days.append(due.astimezone(NEW_YORK))
    assert all(d.strftime("%H:%M") == "08:00" for d in days)
    assert len({d.date() for d in days}) == 366
    assert all((b.date() - a.date()).days == 1 for a, b in itertools.pairwise(days))


@pytest.mark.parametrize("bad", ["8:00", "08:0", "0800", "24:00", "12:60", "12:5a", "", " 08:00", "08:00 "])
def test_bad_times_are_refused(bad: str) -> None:
    with pytest.raises(MedicationError, match="HH:MM"):
        next_due(bad, NOW, SHANGHAI)
    with pytest.raises(MedicationError, match="HH:MM"):
        check_at_time(bad)


def test_a_naive_after_is_refused() -> None:
    with pytest.raises(MedicationError, match="timezone-aware"):
        next_due("08:00", datetime(2025, 3, 14, 8, 0), SHANGHAI)
