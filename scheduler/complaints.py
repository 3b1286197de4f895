"""12320 complaint tasks with I/O: the table, the access policy (kind ``complaint``), the audit log, the survey call.

Each command is one :class:`ComplaintDesk` method: authorise (a refusal is audited by the policy), apply the
sans-I/O step (:mod:`scheduler.complaint_core`), store it with a conditional UPDATE on the state it started
from (two supervisors never both refer one task), then audit the step (``change``, kind ``complaint``). At
resolution, a patient named by pseudonymous id gets the survey call scheduled through the outreach dialer (kind
``complaint_survey``, flow ``dialplans/complaint_survey.yaml``; the dialer keeps quiet hours and retries). The
score the patient types on that call is written back by :func:`answer_from_survey` (the flow's ``record_survey``
node, through the outreach port), audited under the outreach system identity.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, cast

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.access import Action, Resource, check_call_id, check_department, check_patient_id
from compliance.access_store import AccessControl
from compliance.audit import AuditError, AuditLog, JsonValue
from ground.clock import HOSPITAL_TZ
from ground.config import ComplaintsConfig
from ground.db import Repository, rowcount
from ground.workdays import WorkingCalendar, parse_dates
from scheduler.complaint_core import (
    CATEGORIES,
    Category,
    Complaint,
    ComplaintError,
    Deadlines,
    Stage,
    State,
    check_summary,
    deadlines,
    late_stages,
    overdue_stages,
    step,
)
from scheduler.complaint_tables import ComplaintTask
from scheduler.store import AttemptStore

__all__ = [
    "SURVEY_KIND",
    "ComplaintDesk",
    "ComplaintRules",
    "ComplaintStore",
    "Overdue",
    "StoredComplaint",
    "answer_from_survey",
    "overdue_summary",
]

SURVEY_KIND: Final = "complaint_survey"
_OPEN_STATES: Final = ("received", "referred", "resolved")


@dataclass(frozen=True, slots=True)
class ComplaintRules:
    """The working-day calendar and the number of working days each step may take (``[complaints]``)."""

    calendar: WorkingCalendar
    refer_days: int = 1
    resolve_days: int = 5
    answer_days: int = 1

    def deadlines(self, task: Complaint) -> Deadlines:
        return deadlines(task, self.calendar, refer_days=self.refer_days, resolve_days=self.resolve_days,
                         answer_days=self.answer_days)  # fmt: skip

    @classmethod
    def of(cls, c: ComplaintsConfig) -> ComplaintRules:
        """The rules of ``[complaints]`` (its dates were validated when the configuration was loaded)."""
        calendar = WorkingCalendar(HOSPITAL_TZ, parse_dates(c.holidays, "holidays"),
                                   parse_dates(c.extra_workdays, "extra_workdays"))  # fmt: skip
        return cls(calendar, c.refer_days, c.resolve_days, c.answer_days)


@dataclass(frozen=True, slots=True)
class StoredComplaint:
    task: Complaint
    call_id: str
    summary: str
    patient_id: str | None
    survey_attempt_id: str | None
    opened_by: str


@dataclass(frozen=True, slots=True)
class Overdue:
    complaint_id: str
    stage: Stage
    due: datetime
    department: str | None
    category: str


def _task(row: ComplaintTask) -> Complaint:
    return Complaint(row.id, cast(Category, row.category), row.received_at, cast(State, row.state), row.department,
                     row.referred_at, row.resolved_at, row.answered_at, row.survey_score)  # fmt: skip


def _stored(row: ComplaintTask) -> StoredComplaint:
    return StoredComplaint(_task(row), row.call_id, row.summary, row.patient_id, row.survey_attempt_id, row.opened_by)


def overdue_summary(found: Sequence[StoredComplaint], rules: ComplaintRules, now: datetime) -> list[Overdue]:
    """Every overdue step of the given tasks, the longest overdue (earliest deadline) first."""
    result = [
        Overdue(s.task.id, stage, due, s.task.department, s.task.category)
        for s in found
        for stage, due in overdue_stages(s.task, rules.deadlines(s.task), now)
    ]
    return sorted(result, key=lambda o: (o.due, o.complaint_id))


class ComplaintStore(Repository):
    def add(self, stored: StoredComplaint) -> None:
        t = stored.task
        with self._transaction("opening a complaint task") as session:
            session.add(ComplaintTask(
                id=t.id, call_id=stored.call_id, category=t.category, patient_id=stored.patient_id,
                summary=stored.summary, state=t.state, department=t.department, received_at=t.received_at,
                referred_at=t.referred_at, resolved_at=t.resolved_at, answered_at=t.answered_at,
                survey_score=t.survey_score, survey_attempt_id=stored.survey_attempt_id, opened_by=stored.opened_by,
            ))  # fmt: skip

    def get(self, complaint_id: str) -> StoredComplaint | None:
        with self._transaction("reading a complaint task") as session:
            row = session.get(ComplaintTask, complaint_id)
            return None if row is None else _stored(row)

    def save_step(self, before: State, after: Complaint, survey_attempt_id: str | None = None) -> bool:
        """Store ``after`` if the row is still in ``before`` (False: someone else moved it meanwhile)."""
        values: dict[str, object] = {
            "state": after.state, "department": after.department, "referred_at": after.referred_at,
            "resolved_at": after.resolved_at, "answered_at": after.answered_at, "survey_score": after.survey_score,
        }  # fmt: skip
        if survey_attempt_id is not None:
            values["survey_attempt_id"] = survey_attempt_id
        with self._transaction(f"storing complaint {after.id}") as session:
            result = session.execute(
                update(ComplaintTask)
                .where(ComplaintTask.id == after.id, ComplaintTask.state == before)
                .values(**values)
            )
            return bool(rowcount(result))

    def listing(self, *, open_only: bool, department: str | None = None, limit: int = 500) -> list[StoredComplaint]:
        query = select(ComplaintTask).order_by(ComplaintTask.received_at).limit(limit)
        if open_only:
            query = query.where(ComplaintTask.state.in_(_OPEN_STATES))
        if department is not None:
            query = query.where(ComplaintTask.department == department)
        with self._transaction("listing complaint tasks") as session:
            return [_stored(r) for r in session.scalars(query)]

    def overdue(self, rules: ComplaintRules, now: datetime) -> list[Overdue]:
        return overdue_summary(self.listing(open_only=True, limit=100_000), rules, now)


class ComplaintDesk:
    """The complaint steps for one actor (an account id), authorised and audited; synchronous (SQLAlchemy)."""

    def __init__(self, engine: Engine, audit: AuditLog, rules: ComplaintRules, *, survey_calls: bool = True) -> None:
        self._sessions: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
        self._audit = audit
        self._access = AccessControl.for_engine(engine, audit)
        self._rules = rules
        self._survey_calls = survey_calls
        self.store = ComplaintStore(self._sessions)
        self._attempts = AttemptStore(self._sessions)

    def _authorize(self, actor: str, action: Action, department: str | None, at: datetime) -> str:
        decision = self._access.authorize(actor, action, Resource("complaint", department=department), at,
                                          record_allowed=False)  # fmt: skip
        return decision.role or "supervisor"

    def _record(self, actor: str, role: str, doing: str, details: dict[str, JsonValue]) -> None:
        _audit_step(self._audit, actor, role, doing, details)

    def open(
        self, actor: str, *, call_id: str, category: str, summary: str, received_at: datetime,
        patient_id: str | None = None,
    ) -> StoredComplaint:  # fmt: skip
        if category not in CATEGORIES:
            raise ComplaintError(f"--category {category!r}: one of {', '.join(CATEGORIES)}")
        check_call_id(call_id)
        if patient_id is not None:
            check_patient_id(patient_id)
        text = check_summary(summary)
        role = self._authorize(actor, "change", None, received_at)
        task = Complaint(str(uuid.uuid4()), category, received_at)
        stored = StoredComplaint(task, call_id, text, patient_id, None, actor)
        self._record(actor, role, "open", {"complaint": task.id, "call": call_id, "category": category})
        self.store.add(stored)
        return stored

    def _get(self, complaint_id: str) -> StoredComplaint:
        found = self.store.get(complaint_id)
        if found is None:
            raise ComplaintError(f"no complaint task {complaint_id!r}")
        return found

    def _advance(
        self, actor: str, complaint_id: str, stage: Stage, at: datetime, *, department: str | None = None,
        score: int | None = None,
    ) -> tuple[StoredComplaint, Complaint, str]:  # fmt: skip
        stored = self._get(complaint_id)
        if department is not None:
            check_department(department)
        # Referring is the complaint desk's (global); later steps are the referred department's too.
        role = self._authorize(actor, "change", stored.task.department if stage != "refer" else None, at)
        after = step(stored.task, stage, at, department=department, score=score)
        details: dict[str, JsonValue] = {"complaint": complaint_id, "department": after.department}
        if score is not None:
            details["score"] = score
        late = late_stages(after, self._rules.deadlines(after))
        if stage in late:
            details["late"] = True
        self._record(actor, role, stage, details)
        return stored, after, role

    def refer(self, actor: str, complaint_id: str, department: str, at: datetime) -> Complaint:
        stored, after, _ = self._advance(actor, complaint_id, "refer", at, department=department)
        self._save(stored.task.state, after)
        return after

    def resolve(self, actor: str, complaint_id: str, at: datetime) -> tuple[Complaint, str | None]:
        """Resolved; the survey call is scheduled (its attempt id returned) when a patient is named."""
        stored, after, _ = self._advance(actor, complaint_id, "resolve", at)
        attempt_id = None
        if self._survey_calls and stored.patient_id is not None:
            attempt = self._attempts.open_round(SURVEY_KIND, complaint_id, stored.patient_id, at, at)
            attempt_id = None if attempt is None else attempt.id
        self._save(stored.task.state, after, attempt_id)
        return after, attempt_id

    def answer(self, actor: str, complaint_id: str, at: datetime, score: int | None) -> Complaint:
        stored, after, _ = self._advance(actor, complaint_id, "answer", at, score=score)
        self._save(stored.task.state, after)
        return after

    def _save(self, before: State, after: Complaint, attempt_id: str | None = None) -> None:
        if not self.store.save_step(before, after, attempt_id):
            raise ComplaintError(f"complaint {after.id} was changed meanwhile by someone else: look at it again")

    def listing(
        self, actor: str, at: datetime, *, open_only: bool, department: str | None = None
    ) -> list[StoredComplaint]:
        self._authorize(actor, "read", department, at)
        return self.store.listing(open_only=open_only, department=department)

    def overdue(self, actor: str, at: datetime, department: str | None = None) -> list[Overdue]:
        return overdue_summary(self.listing(actor, at, open_only=True, department=department), self._rules, at)

    def deadlines(self, task: Complaint) -> Deadlines:
        return self._rules.deadlines(task)


def _audit_step(audit: AuditLog, actor: str, role: str, doing: str, details: dict[str, JsonValue]) -> None:
    try:
        audit.append(actor=actor, role=role, action="change", outcome="success",
                     details={"kind": "complaint", "step": doing, **details})  # fmt: skip
    except AuditError as exc:
        raise ComplaintError(f"complaint {doing}: the audit log could not record it: {exc}") from None


def answer_from_survey(
    store: ComplaintStore, audit: AuditLog, rules: ComplaintRules, complaint_id: str, *, score: int, at: datetime,
    actor: str, role: str,
) -> bool:  # fmt: skip
    """The survey call's score written back: the task answered with ``score`` at ``at``, audited as the CLI's
    ``answer`` is but under the outreach system identity (``actor``, ``role``); no access policy (the call was
    scheduled by an authorised ``resolve``). True when this call recorded it; False when the task was answered
    already (the node run twice, or the desk recorded it by hand meanwhile): that answer stays and nothing is
    audited again. ComplaintError for a score outside 1-5, an unknown task, or one not resolved yet."""
    stored = store.get(complaint_id)
    if stored is None:
        raise ComplaintError(f"no complaint task {complaint_id!r}")
    if stored.task.state == "answered":
        return False
    after = step(stored.task, "answer", at, score=score)  # refuses a bad score and a task not resolved
    details: dict[str, JsonValue] = {"complaint": complaint_id, "department": after.department, "score": score,
                                     "source": "survey_call"}  # fmt: skip
    if "answer" in late_stages(after, rules.deadlines(after)):
        details["late"] = True
    # Audited before it is stored, as the desk's steps are: no answer is ever stored unaudited. The conditional
    # UPDATE keeps a second run racing this one (or the desk) from storing a second answer.
    _audit_step(audit, actor, role, "answer", details)
    if store.save_step(stored.task.state, after):
        return True
    again = store.get(complaint_id)
    if again is not None and again.task.state == "answered":
        return False
    raise ComplaintError(f"complaint {complaint_id} was changed meanwhile: the survey score was not recorded")
