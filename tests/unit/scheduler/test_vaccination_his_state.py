"""A vaccination booking sent to the HIS is ``requested`` until the HIS answers (migration 0017_his_messages):
the outbox's answer hook calls ``record_his_answer`` with the message's control id. SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from scheduler.vaccination import VaccinationStore

AT = datetime(2026, 12, 11, 9, 30, tzinfo=UTC)


def test_a_booking_is_requested_until_the_his_answers(engine: Engine) -> None:
    store = VaccinationStore.for_engine(engine)
    store.add_vaccine("flu", "流感疫苗", at=AT)
    store.add_clinic("east", "东院", "vaccination", at=AT)
    (slot,) = store.add_slots("east", "flu", AT + timedelta(days=1), minutes=240, capacity=5, at=AT)
    first = store.book(str(uuid.uuid4()), slot.id, AT)
    second = store.book(str(uuid.uuid4()), slot.id, AT)
    assert store.his_state(first.id) == (None, None)  # booked without a HIS
    store.mark_his_requested(first.id, "MHAAAA")
    store.mark_his_requested(second.id, "MHBBBB")
    assert store.his_state(first.id) == ("requested", None)
    assert store.record_his_answer("MHAAAA", accepted=True) == first.id
    assert store.record_his_answer("MHBBBB", accepted=False, reason="AR SCH-11 102") == second.id
    assert store.record_his_answer("MHNONE", accepted=True) is None
    assert store.his_state(first.id) == ("confirmed", None)
    assert store.his_state(second.id) == ("refused", "AR SCH-11 102")
