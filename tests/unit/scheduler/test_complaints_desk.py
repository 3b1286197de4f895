"""12320 complaint tasks on a migrated database (SQLite and PostgreSQL): policy, audit, survey call, bad input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Final

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import compliance.data_keys  # noqa: F401 - data_keys on Base.metadata (outreach tables refer to it)
import scheduler.complaint_tables  # noqa: F401 - the table on Base.metadata
from compliance.access_records import AccessDenied
from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore
from ground.clock import HOSPITAL_TZ
from ground.models import Base
from ground.workdays import WorkingCalendar
from scheduler.complaint_core import ComplaintError
from scheduler.complaint_tables import ComplaintTask
from scheduler.complaints import ComplaintDesk, ComplaintRules
from scheduler.tables import OutreachAttempt

MONDAY: Final = datetime(2026, 3, 2, 9, 0, tzinfo=HOSPITAL_TZ)
PATIENT: Final = "ab" * 16
RULES: Final = ComplaintRules(WorkingCalendar(HOSPITAL_TZ))


@pytest.fixture
def desk(engine: Engine) -> ComplaintDesk:
    accounts = AccountStore.for_engine(engine)
    accounts.add("sup.one", "Supervisor", ["supervisor"], MONDAY - timedelta(days=1))
    accounts.add("nur.card", "Nurse", ["nurse"], MONDAY - timedelta(days=1), departments=["cardiology"])
    accounts.add("nur.surg", "Nurse", ["nurse"], MONDAY - timedelta(days=1), departments=["surgery"])
    accounts.add("agt.one", "Agent", ["agent"], MONDAY - timedelta(days=1))
    return ComplaintDesk(engine, AuditLog(SqlAuditStore(engine)), RULES)


def _complaint_entries(engine: Engine) -> list[tuple[str, str, dict[str, object]]]:
    found = []
    for entry in SqlAuditStore(engine).entries():
        details = json.loads(entry.details) if entry.details else {}
        if details.get("kind") == "complaint":
            found.append((entry.actor, entry.action, details))
    return found


def test_a_complaint_goes_through_its_steps_audited_with_the_survey_call_scheduled(
    desk: ComplaintDesk, engine: Engine
) -> None:
    opened = desk.open("sup.one", call_id="call-1", category="attitude", summary="挂号窗口服务态度差",
                       received_at=MONDAY, patient_id=PATIENT)  # fmt: skip
    cid = opened.task.id
    assert [o.stage for o in desk.overdue("sup.one", MONDAY + timedelta(days=2))] == ["refer"]
    desk.refer("sup.one", cid, "cardiology", MONDAY + timedelta(hours=2))
    with pytest.raises(AccessDenied):  # another department's nurse
        desk.resolve("nur.surg", cid, MONDAY + timedelta(days=1))
    resolved, attempt_id = desk.resolve("nur.card", cid, MONDAY + timedelta(days=1))
    assert resolved.state == "resolved"
    assert attempt_id is not None
    with Session(engine) as session:
        attempt = session.get(OutreachAttempt, attempt_id)
        assert attempt is not None
        assert (attempt.kind, attempt.subject_id, attempt.patient_id, attempt.state) == (
            "complaint_survey", cid, PATIENT, "scheduled")  # fmt: skip
    # Resolved Tuesday: answer by the end of Wednesday.
    assert desk.overdue("sup.one", MONDAY + timedelta(days=2, hours=14)) == []
    assert [o.stage for o in desk.overdue("sup.one", MONDAY + timedelta(days=2, hours=15))] == ["answer"]
    answered = desk.answer("sup.one", cid, MONDAY + timedelta(days=2), 4)
    assert (answered.state, answered.survey_score) == ("answered", 4)
    stored = desk.store.get(cid)
    assert stored is not None
    assert stored.survey_attempt_id == attempt_id
    assert stored.task.survey_score == 4
    steps = [(actor, d["step"]) for actor, action, d in _complaint_entries(engine) if action == "change"]
    assert steps == [("sup.one", "open"), ("sup.one", "refer"), ("nur.card", "resolve"), ("sup.one", "answer")]
    assert desk.listing("nur.card", MONDAY, open_only=False, department="cardiology")[0].task.id == cid


def test_refusals_are_audited_and_store_nothing(desk: ComplaintDesk, engine: Engine) -> None:
    with pytest.raises(AccessDenied):
        desk.open("agt.one", call_id="call-2", category="fees", summary="收费不清", received_at=MONDAY)
    opened = desk.open("sup.one", call_id="call-3", category="fees", summary="收费不清", received_at=MONDAY)
    with pytest.raises(AccessDenied):  # clinical staff resolve in their department; they do not refer
        desk.refer("nur.card", opened.task.id, "cardiology", MONDAY)
    with pytest.raises(AccessDenied):
        desk.listing("nur.card", MONDAY, open_only=True)  # no department: not in scope
    denied = [e for e in SqlAuditStore(engine).entries() if e.action == "denied"]
    assert {e.actor for e in denied} == {"agt.one", "nur.card"}
    with pytest.raises(ComplaintError, match="number-like"):
        desk.open("sup.one", call_id="call-4", category="fees", summary="患者电话13800138000", received_at=MONDAY)
    with pytest.raises(ComplaintError, match="--category"):
        desk.open("sup.one", call_id="call-4", category="rude", summary="态度", received_at=MONDAY)
    with pytest.raises(ComplaintError, match="it must be referred"):
        desk.resolve("sup.one", opened.task.id, MONDAY)
    with pytest.raises(ComplaintError, match="no complaint task"):
        desk.answer("sup.one", "nope", MONDAY, 3)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(ComplaintTask)) == 1
        assert session.scalar(select(func.count()).select_from(OutreachAttempt)) == 0
        assert session.scalars(select(ComplaintTask.state)).one() == "received"


def test_no_patient_no_survey_call_and_the_score_can_be_left_out(desk: ComplaintDesk) -> None:
    cid = desk.open("sup.one", call_id="call-5", category="access", summary="候诊时间长", received_at=MONDAY).task.id
    desk.refer("sup.one", cid, "surgery", MONDAY)
    assert desk.resolve("sup.one", cid, MONDAY + timedelta(hours=3))[1] is None
    assert desk.answer("sup.one", cid, MONDAY + timedelta(hours=4), None).survey_score is None


def test_migration_matches_the_models(engine: Engine) -> None:
    ours = {"complaint_tasks", "outreach_attempts"}

    def include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table in ours

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": include})
        assert compare_metadata(context, Base.metadata) == []
