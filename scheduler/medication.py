"""Medication reminders: what to take and when, stored encrypted, and the confirmations patients give.

A reminder names the patient by registry id, a local time of day (``HH:MM`` in the hospital's time zone), the
channel (``call``: the patient must confirm twice on the keypad; ``sms``: a notification only) and who is
responsible (the physician an unconfirmed dose is escalated to). The medication and the dose are clinical data:
they are stored only as one AES-GCM token under the ``outreach`` data key, bound to
``medication_reminders|medication|<row id>``, and padded so the token's length does not tell a short drug name
from a long one.

``next_due_at`` is the next moment the reminder fires. :func:`next_due` computes it from the local time of day,
so a daily reminder stays at 08:00 local across daylight-saving changes (for zones that have them): a time that
does not exist that day (skipped by a spring-forward) fires at the same offset after the gap, and a time that
happens twice (fall-back) fires only at its first occurrence.

Every confirmation (or its absence) is kept as evidence, with the keys pressed at the two questions.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Final, Literal

from sqlalchemy import select, update

from compliance.data_keys import DataKeyRing
from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from ground.ids import is_uuid
from ground.logs import get_logger
from scheduler.policy import LOCAL_TZ
from scheduler.tables import DATA_KEY_PURPOSE, MedicationConfirmation, MedicationReminder

log = get_logger("medhotline.scheduler.medication")

TABLE: Final = "medication_reminders"
MEDICATION_COLUMN: Final = "medication"  # the column name bound into the token's associated data
Channel = Literal["call", "sms"]
CHANNELS: Final[tuple[Channel, ...]] = ("call", "sms")
MAX_TEXT_CHARS: Final = 200
PAD_BLOCK: Final = 128  # a drug name and dose of up to ~30 Chinese characters together fit one block
_HHMM: Final = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
_ACCOUNT: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# The keys pressed at the two questions, e.g. "1,1", "1,2", "1,-" (no key): see MedicationConfirmation.keys.
_KEYS: Final = re.compile(r"^[0-9*#-]{1,7}(,[0-9*#-]{1,7})?$")


class MedicationError(MedhotlineError):
    """A reminder could not be stored or read; names the reminder id and the field, never a medication or dose."""


@dataclass(frozen=True, slots=True)
class ReminderRecord:
    """A reminder without its medication (read that with :meth:`MedicationStore.text`, which decrypts)."""

    id: str
    patient_id: str
    at_time: str
    channel: str
    responsible: str | None
    active: bool
    next_due_at: datetime
    created_at: datetime
    data_key_id: int
    medication_token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ConfirmationRecord:
    id: str
    reminder_id: str
    attempt_id: str | None
    confirmed: bool
    keys: str
    at: datetime


def _reminder(row: MedicationReminder) -> ReminderRecord:
    return ReminderRecord(
        row.id, row.patient_id, row.at_time, row.channel, row.responsible, row.active, row.next_due_at,
        row.created_at, row.data_key_id, row.medication_token,
    )  # fmt: skip


def _confirmation(row: MedicationConfirmation) -> ConfirmationRecord:
    return ConfirmationRecord(row.id, row.reminder_id, row.attempt_id, row.confirmed, row.keys, row.at)


def check_at_time(at_time: str) -> time:
    """``HH:MM`` (00:00-23:59, two digits each) as a time; MedicationError otherwise."""
    match = _HHMM.match(at_time) if isinstance(at_time, str) else None
    if match is None:
        raise MedicationError(f"reminder time must be HH:MM (00:00-23:59), got {at_time!r}")
    return time(int(match.group(1)), int(match.group(2)))


def next_due(at_time: str, after: datetime, tz: tzinfo) -> datetime:
    """The first moment strictly after ``after`` at which the local clock in ``tz`` reads ``at_time``, in UTC.

    Local times are resolved with ``fold=0``: a time skipped by a spring-forward gap maps to the instant the
    offset before the gap gives it (02:30 in a 02:00-03:00 gap fires at 03:30 new time), and a time repeated by a
    fall-back means its first occurrence, so after a run at the first the next is the following day's, not the
    repeat an hour later: one dose a day either way.
    """
    wanted = check_at_time(at_time)
    if after.tzinfo is None or after.utcoffset() is None:
        raise MedicationError("next_due needs a timezone-aware 'after'")
    start = after.astimezone(tz).date()
    for offset in range(3):  # today's time, else tomorrow's (a third day only guards odd zone rules)
        candidate = datetime.combine(start + timedelta(days=offset), wanted, tzinfo=tz).astimezone(UTC)
        if candidate > after:
            return candidate
    raise MedicationError(f"no {at_time} found in the three days after {after.isoformat()}")  # pragma: no cover


def _check_text(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise MedicationError(f"the {what} must be text")
    text = " ".join(value.split())
    if not text or len(text) > MAX_TEXT_CHARS:
        raise MedicationError(f"the {what} must be 1-{MAX_TEXT_CHARS} characters")
    if any(not ch.isprintable() for ch in text):
        raise MedicationError(f"the {what} contains control characters")
    return text


def _plaintext(medication: str, dose: str) -> str:
    """The JSON that is encrypted, padded with spaces (which JSON ignores) to a multiple of PAD_BLOCK bytes."""
    raw = json.dumps({"medication": medication, "dose": dose}, ensure_ascii=False, separators=(",", ":"))
    return raw + " " * (-len(raw.encode("utf-8")) % PAD_BLOCK)


def _parse(plain: str, reminder_id: str) -> tuple[str, str]:
    try:
        value = json.loads(plain)
    except json.JSONDecodeError:
        raise MedicationError(
            f"{TABLE}.{MEDICATION_COLUMN} of reminder {reminder_id}: decrypted value is not JSON"
        ) from None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("medication"), str)
        or not isinstance(value.get("dose"), str)
    ):
        raise MedicationError(
            f"{TABLE}.{MEDICATION_COLUMN} of reminder {reminder_id}: decrypted value lacks medication and dose"
        )
    return value["medication"], value["dose"]


class MedicationStore(Repository):
    """``medication_reminders`` and ``medication_confirmations``. ``add`` and ``text`` are async (they go
    through the key ring); the rest is synchronous, one short transaction each (callers use ``to_thread``)."""

    async def add(
        self,
        ring: DataKeyRing,
        *,
        patient_id: str,
        medication: str,
        dose: str,
        at_time: str,
        channel: str,
        responsible: str | None,
        now: datetime,
        tz: tzinfo = LOCAL_TZ,
    ) -> str:
        """A new active reminder, first due at the next ``at_time`` (local in ``tz``) after ``now``; its id."""
        if not isinstance(patient_id, str) or not is_uuid(patient_id):
            raise MedicationError("a reminder's patient is a registry id (a UUID)")
        medication = _check_text(medication, "medication")
        dose = _check_text(dose, "dose")
        first = next_due(at_time, now, tz)
        if channel not in CHANNELS:
            raise MedicationError(f"reminder channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
        if responsible is not None and not _ACCOUNT.match(responsible):
            raise MedicationError(f"responsible must be an account id matching {_ACCOUNT.pattern}")
        reminder_id = str(uuid.uuid4())
        key = await ring.current_key(DATA_KEY_PURPOSE)
        async with ring.cipher([key]) as cipher:
            token = cipher.encrypt(
                _plaintext(medication, dose), table=TABLE, column=MEDICATION_COLUMN, row_id=reminder_id
            )
        row = MedicationReminder(
            id=reminder_id,
            patient_id=patient_id,
            medication_token=token,
            data_key_id=key.id,
            at_time=at_time,
            channel=channel,
            responsible=responsible,
            active=True,
            next_due_at=first,
            created_at=now,
        )
        await asyncio.to_thread(self._add, row)
        log.info("medication.reminder_added", reminder_id=reminder_id, channel=channel, at_time=at_time)
        return reminder_id

    def _add(self, row: MedicationReminder) -> None:
        with self._transaction(f"adding medication reminder {row.id}") as session:
            session.add(row)

    def get(self, reminder_id: str) -> ReminderRecord:
        with self._transaction(f"reading medication reminder {reminder_id}") as session:
            row = session.get(MedicationReminder, reminder_id)
            if row is None:
                raise MedicationError(f"no medication reminder {reminder_id}")
            return _reminder(row)

    async def text(self, ring: DataKeyRing, reminder_id: str) -> tuple[str, str]:
        """The reminder's (medication, dose), decrypted for this use only."""
        record = await asyncio.to_thread(self.get, reminder_id)
        keys = await ring.keys([record.data_key_id])
        if keys[0].purpose != DATA_KEY_PURPOSE:
            raise MedicationError(
                f"medication reminder {reminder_id}: data key {record.data_key_id} is not an {DATA_KEY_PURPOSE} key"
            )
        async with ring.cipher(keys) as cipher:
            plain = cipher.decrypt(record.medication_token, table=TABLE, column=MEDICATION_COLUMN, row_id=reminder_id)
        return _parse(plain, reminder_id)

    def reminders(self, *, patient_id: str | None = None, active_only: bool = False) -> list[ReminderRecord]:
        """Reminders (of one patient), by time of day."""
        query = select(MedicationReminder).order_by(MedicationReminder.at_time, MedicationReminder.id)
        if patient_id is not None:
            query = query.where(MedicationReminder.patient_id == patient_id)
        if active_only:
            query = query.where(MedicationReminder.active.is_(True))
        with self._transaction("listing medication reminders") as session:
            return [_reminder(r) for r in session.scalars(query)]

    def due(self, now: datetime) -> list[ReminderRecord]:
        """Active reminders whose ``next_due_at`` has come, earliest first."""
        with self._transaction("listing due medication reminders") as session:
            rows = session.scalars(
                select(MedicationReminder)
                .where(MedicationReminder.active.is_(True), MedicationReminder.next_due_at <= now)
                .order_by(MedicationReminder.next_due_at, MedicationReminder.id)
            )
            return [_reminder(r) for r in rows]

    def advance(self, reminder_id: str, next_due_at: datetime, *, from_due: datetime | None = None) -> bool:
        """Set the next time the reminder fires. With ``from_due``, only if it is still due then (compare-and-set:
        of two nodes firing the same dose, one advances it and the other gets False)."""
        query = update(MedicationReminder).where(MedicationReminder.id == reminder_id)
        if from_due is not None:
            query = query.where(MedicationReminder.next_due_at == from_due)
        with self._transaction(f"advancing medication reminder {reminder_id}") as session:
            result = session.execute(query.values(next_due_at=next_due_at))
            changed = rowcount(result) == 1
            if not changed and session.get(MedicationReminder, reminder_id) is None:
                raise MedicationError(f"no medication reminder {reminder_id}")
            return changed

    def deactivate(self, reminder_id: str) -> bool:
        """Stop the reminder (the prescription ended); False if it was already inactive."""
        with self._transaction(f"deactivating medication reminder {reminder_id}") as session:
            if session.get(MedicationReminder, reminder_id) is None:
                raise MedicationError(f"no medication reminder {reminder_id}")
            result = session.execute(
                update(MedicationReminder)
                .where(MedicationReminder.id == reminder_id, MedicationReminder.active.is_(True))
                .values(active=False)
            )
            return rowcount(result) == 1

    def record_confirmation(
        self, reminder_id: str, attempt_id: str | None, confirmed: bool, keys: str, at: datetime
    ) -> ConfirmationRecord:
        """Keep what the patient answered on a reminder call. Idempotent per call attempt: recording the same
        attempt again (a retried job) returns the first record unchanged."""
        if not isinstance(keys, str) or not _KEYS.match(keys):
            raise MedicationError(
                f"confirmation keys of reminder {reminder_id} must look like '1,1' or '1,-' (keys per question)"
            )
        if not isinstance(confirmed, bool):
            raise MedicationError(f"confirmation of reminder {reminder_id}: confirmed must be true or false")
        with self._transaction(f"recording a confirmation of medication reminder {reminder_id}") as session:
            if session.get(MedicationReminder, reminder_id) is None:
                raise MedicationError(f"no medication reminder {reminder_id}")
            if attempt_id is not None:
                existing = session.scalars(
                    select(MedicationConfirmation).where(
                        MedicationConfirmation.reminder_id == reminder_id,
                        MedicationConfirmation.attempt_id == attempt_id,
                    )
                ).first()
                if existing is not None:
                    return _confirmation(existing)
            row = MedicationConfirmation(
                id=str(uuid.uuid4()),
                reminder_id=reminder_id,
                attempt_id=attempt_id,
                confirmed=confirmed,
                keys=keys,
                at=at,
            )
            session.add(row)
            session.flush()
            log.info("medication.confirmation", reminder_id=reminder_id, attempt_id=attempt_id, confirmed=confirmed)
            return _confirmation(row)

    def confirmations(self, reminder_id: str) -> list[ConfirmationRecord]:
        """Every answer recorded for the reminder, oldest first."""
        with self._transaction(f"listing confirmations of medication reminder {reminder_id}") as session:
            rows = session.scalars(
                select(MedicationConfirmation)
                .where(MedicationConfirmation.reminder_id == reminder_id)
                .order_by(MedicationConfirmation.at, MedicationConfirmation.id)
            )
            return [_confirmation(r) for r in rows]
