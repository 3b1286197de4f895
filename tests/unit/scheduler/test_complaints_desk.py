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
from scheduler.complaints import ComplaintDesk, ComplaintRules, answer_from_survey
from scheduler.outreach_core import SYSTEM_ACTOR, SYSTEM_ROLE
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


# -- the survey call's score (the record_survey node, through the outreach port) -----------------------------------


def _resolved(desk: ComplaintDesk, at: datetime = MONDAY) -> str:
    cid = desk.open("sup.one", call_id="call-6", category="quality", summary="检查结果解释不清", received_at=at,
                    patient_id=PATIENT).task.id  # fmt: skip
    desk.refer("sup.one", cid, "cardiology", at + timedelta(hours=1))
    desk.resolve("nur.card", cid, at + timedelta(hours=2))
    return cid


def _survey(desk: ComplaintDesk, engine: Engine, cid: str, score: int, at: datetime) -> bool:
    return answer_from_survey(desk.store, AuditLog(SqlAuditStore(engine)), RULES, cid, score=score, at=at,
                              actor=SYSTEM_ACTOR, role=SYSTEM_ROLE)  # fmt: skip


def test_the_survey_score_answers_the_task_audited_as_the_scheduler_once_even_if_run_twice(
    desk: ComplaintDesk, engine: Engine
) -> None:
    cid = _resolved(desk)
    assert _survey(desk, engine, cid, 5, MONDAY + timedelta(hours=3)) is True
    assert _survey(desk, engine, cid, 5, MONDAY + timedelta(hours=3, minutes=1)) is False  # the node run twice
    stored = desk.store.get(cid)
    assert stored is not None
    assert (stored.task.state, stored.task.survey_score) == ("answered", 5)
    assert stored.task.answered_at == MONDAY + timedelta(hours=3)
    answers = [(actor, d) for actor, _, d in _complaint_entries(engine) if d["step"] == "answer"]
    assert answers == [("scheduler", {"kind": "complaint", "step": "answer", "complaint": cid,
                                      "department": "cardiology", "score": 5, "source": "survey_call"})]  # fmt: skip
    [entry] = [e for e in SqlAuditStore(engine).entries() if e.actor == SYSTEM_ACTOR]
    assert entry.role == SYSTEM_ROLE
    # Nothing left overdue once answered, even past the answer deadline.
    assert desk.overdue("sup.one", MONDAY + timedelta(days=5)) == []


def test_a_survey_score_after_the_desk_answered_changes_nothing(desk: ComplaintDesk, engine: Engine) -> None:
    cid = _resolved(desk)
    desk.answer("sup.one", cid, MONDAY + timedelta(hours=3), 2)
    assert _survey(desk, engine, cid, 5, MONDAY + timedelta(hours=4)) is False
    stored = desk.store.get(cid)
    assert stored is not None
    assert stored.task.survey_score == 2
    assert [a for a, _, d in _complaint_entries(engine) if d["step"] == "answer"] == ["sup.one"]


def test_a_late_survey_answer_is_audited_late(desk: ComplaintDesk, engine: Engine) -> None:
    cid = _resolved(desk)  # resolved Monday: answer by the end of Tuesday
    assert _survey(desk, engine, cid, 3, MONDAY + timedelta(days=2)) is True
    [details] = [d for _, _, d in _complaint_entries(engine) if d["step"] == "answer"]
    assert details["late"] is True


@pytest.mark.parametrize("score", [0, 6, -1, 45])
def test_a_bad_survey_score_is_refused_and_nothing_is_stored_or_audited(
    desk: ComplaintDesk, engine: Engine, score: int
) -> None:
    cid = _resolved(desk)
    with pytest.raises(ComplaintError, match=f"satisfaction score {score} is outside 1..5"):
        _survey(desk, engine, cid, score, MONDAY + timedelta(hours=3))
    stored = desk.store.get(cid)
    assert stored is not None
    assert (stored.task.state, stored.task.survey_score, stored.task.answered_at) == ("resolved", None, None)
    assert [d for _, _, d in _complaint_entries(engine) if d["step"] == "answer"] == []


def test_a_survey_score_for_a_task_not_resolved_or_unknown_is_refused(desk: ComplaintDesk, engine: Engine) -> None:
    cid = desk.open("sup.one", call_id="call-7", category="fees", summary="收费不清", received_at=MONDAY).task.id
    with pytest.raises(ComplaintError, match="it must be resolved"):
        _survey(desk, engine, cid, 4, MONDAY + timedelta(hours=1))
    with pytest.raises(ComplaintError, match="no complaint task"):
        _survey(desk, engine, "nope", 4, MONDAY)
    stored = desk.store.get(cid)
    assert stored is not None
    assert stored.task.state == "received"
