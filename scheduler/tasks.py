"""Clinical tasks: the work outreach hands to people.

A follow-up whose readings are abnormal creates a *recall* for the plan's responsible physician; three
unanswered attempts create an *unreachable* task for any nurse; a medication reminder not confirmed after its
retries creates *medication_not_confirmed* for the responsible physician (or a nurse); a reported adverse
reaction after a vaccination creates *adverse_reaction* for medical staff. A task names the patient by opaque id
only; whoever works it reads the patient through the access policy.

Creating a task is idempotent per (kind, subject, call): a retried job or a second node never doubles it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from scheduler.tables import TASK_KINDS, ClinicalTask


class TaskError(MedhotlineError):
    pass


@dataclass(frozen=True, slots=True)
class TaskRecord:
    id: str
    kind: str
    patient_id: str
    assignee: str | None
    role: str
    subject_id: str | None
    call_id: str | None
    created_at: datetime
    status: str


def _record(row: ClinicalTask) -> TaskRecord:
    return TaskRecord(
        row.id, row.kind, row.patient_id, row.assignee, row.role, row.subject_id, row.call_id, row.created_at,
        row.status,
    )  # fmt: skip


class TaskStore(Repository):
    def create(
        self,
        kind: str,
        patient_id: str,
        *,
        role: str,
        at: datetime,
        assignee: str | None = None,
        subject_id: str | None = None,
        call_id: str | None = None,
    ) -> TaskRecord:
        """A new open task, or the open one of the same kind for the same subject and call."""
        if kind not in TASK_KINDS:
            raise TaskError(f"unknown task kind {kind!r}; kinds: {', '.join(TASK_KINDS)}")
        with self._transaction(f"creating a {kind} task") as session:
            existing = session.scalars(
                select(ClinicalTask).where(
                    ClinicalTask.kind == kind,
                    ClinicalTask.patient_id == patient_id,
                    ClinicalTask.subject_id == subject_id if subject_id else ClinicalTask.subject_id.is_(None),
                    ClinicalTask.call_id == call_id if call_id else ClinicalTask.call_id.is_(None),
                    ClinicalTask.status == "open",
                )
            ).first()
            if existing is not None:
                return _record(existing)
            row = ClinicalTask(
                id=str(uuid.uuid4()),
                kind=kind,
                patient_id=patient_id,
                assignee=assignee,
                role=role,
                subject_id=subject_id,
                call_id=call_id,
                created_at=at,
                status="open",
            )
            session.add(row)
            session.flush()
            return _record(row)

    def open_tasks(self, *, kind: str | None = None, patient_id: str | None = None) -> list[TaskRecord]:
        with self._transaction("listing open tasks") as session:
            query = select(ClinicalTask).where(ClinicalTask.status == "open").order_by(ClinicalTask.created_at)
            if kind is not None:
                query = query.where(ClinicalTask.kind == kind)
            if patient_id is not None:
                query = query.where(ClinicalTask.patient_id == patient_id)
            return [_record(r) for r in session.scalars(query).all()]

    def close(self, task_id: str, by: str, at: datetime) -> bool:
        with self._transaction(f"closing task {task_id}") as session:
            result = session.execute(
                update(ClinicalTask)
                .where(ClinicalTask.id == task_id, ClinicalTask.status == "open")
                .values(status="done", closed_at=at, closed_by=by)
            )
            return bool(rowcount(result))
