"""Patient assignments: for the length of a call, or as the responsible clinician (see
:mod:`compliance.access_store`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select, update

from compliance.access import (
    AccessError,
    check_call_id,
    check_patient_id,
    primary_role,
)
from compliance.access_core import AccessPart
from compliance.access_records import (
    SYSTEM_ACTOR,
    Actor,
    AssignmentRecord,
    PatientAssignment,
    _active_assignment,
    _assignment,
    _safe_id,
    _valid_account_id,
)
from compliance.accounts import (
    Account,
    locked_row,
    record_of,
)
from ground.db import rowcount
from ground.errors import MedhotlineError


class Assignments(AccessPart):
    """Which agent may see which patient: call assignments and responsible assignments."""

    def begin_call_assignment(self, account_id: str, patient_id: str, call_id: str, at: datetime) -> int:
        """The account is now on call ``call_id`` with the patient: their current-call scope starts.

        Call this when the agent answers (or is bridged to) the call, and :meth:`end_call_assignment` when the
        call ends (or its wrap-up does); a call assignment never ended lapses after
        :data:`compliance.access.MAX_CALL_ASSIGNMENT`. A frozen or unknown account is refused (and the attempt
        audited). Returns the assignment's row id.
        """
        check_patient_id(patient_id)
        check_call_id(call_id)
        with self._transaction(f"assigning call {call_id} to {_safe_id(account_id)}") as session:
            row = session.get(Account, account_id) if _valid_account_id(account_id) else None
            why = "there is no such account" if row is None else "the account is frozen" if row.frozen else None
            if why is None:
                assignment = PatientAssignment(
                    account_id=account_id, patient_id=patient_id, kind="call", call_id=call_id, starts_at=at,
                    assigned_by=SYSTEM_ACTOR,
                )  # fmt: skip
                session.add(assignment)
                session.flush()
                return assignment.id
            role = "none" if row is None else primary_role(record_of(row).roles)
        raise self._refuse(_safe_id(account_id), role, "call_assignment", why, patient=self._ref_or_none(patient_id))

    def end_call_assignment(self, call_id: str, at: datetime) -> int:
        """End every open assignment of call ``call_id`` at ``at``; returns how many were open."""
        check_call_id(call_id)
        with self._transaction(f"ending the assignments of call {call_id}") as session:
            result = rowcount(
                session.execute(
                    update(PatientAssignment)
                    .where(
                        PatientAssignment.call_id == call_id,
                        PatientAssignment.kind == "call",
                        or_(PatientAssignment.ends_at.is_(None), PatientAssignment.ends_at > at),
                        PatientAssignment.starts_at <= at,
                    )
                    .values(ends_at=at)
                )
            )
            return result

    def assign_patient(
        self,
        account_id: str,
        patient_id: str,
        at: datetime,
        *,
        actor: Actor,
        until: datetime | None = None,
        audit_ref: str | None = None,
    ) -> int:
        """Make the account responsible for the patient from ``at`` (until ``until``, or until unassigned).

        Audited (``permission_change``) before it is stored: no permission exists without its entry.
        """
        check_patient_id(patient_id)
        if until is not None and until <= at:
            raise AccessError("an assignment must end after it starts")
        ref = self._patient_ref(patient_id, audit_ref)
        role = self._actor_role(actor, "patient_assignment", ("admin", "supervisor"))
        self._accounts.get(account_id)
        doing = f"assigning a patient to {account_id}"
        self._append(
            doing, actor=actor.id, role=role, action="permission_change", outcome="success", patient=ref,
            details={"account": account_id, "change": "assign", "scope": "responsible", "open_ended": until is None},
        )  # fmt: skip
        try:
            with self._transaction(doing) as session:
                locked_row(session, account_id)
                assignment = PatientAssignment(
                    account_id=account_id, patient_id=patient_id, kind="responsible", starts_at=at, ends_at=until,
                    assigned_by=actor.id,
                )  # fmt: skip
                session.add(assignment)
                session.flush()
                return assignment.id
        except MedhotlineError:
            self._append(
                f"recording that {doing} failed", actor=actor.id, role=role, action="permission_change",
                outcome="error", patient=ref, details={"account": account_id, "change": "assign_failed"},
            )  # fmt: skip
            raise

    def unassign_patient(
        self, account_id: str, patient_id: str, at: datetime, *, actor: Actor, audit_ref: str | None = None
    ) -> int:
        """End the account's responsible assignments to the patient; returns how many were open.

        Stored first, then audited: taking a permission away must not wait on the audit log.
        """
        check_patient_id(patient_id)
        ref = self._patient_ref(patient_id, audit_ref)
        role = self._actor_role(actor, "patient_unassignment", ("admin", "supervisor"))
        with self._transaction(f"unassigning a patient from {account_id}") as session:
            ended = rowcount(
                session.execute(
                    update(PatientAssignment)
                    .where(
                        PatientAssignment.account_id == account_id,
                        PatientAssignment.patient_id == patient_id,
                        PatientAssignment.kind == "responsible",
                        *_active_assignment(at),
                    )
                    .values(ends_at=at)
                )
            )
        self._append(
            f"unassigning a patient from {account_id}", actor=actor.id, role=role, action="permission_change",
            outcome="success", patient=ref,
            details={"account": account_id, "change": "unassign", "scope": "responsible", "ended": int(ended)},
        )  # fmt: skip
        return int(ended)

    def assignments(self, account_id: str, at: datetime | None = None) -> list[AssignmentRecord]:
        """The account's assignments (active at ``at`` if given), oldest first."""
        with self._transaction(f"reading the assignments of {account_id}") as session:
            query = select(PatientAssignment).where(PatientAssignment.account_id == account_id)
            if at is not None:
                query = query.where(*_active_assignment(at))
            return [_assignment(r) for r in session.scalars(query.order_by(PatientAssignment.id))]
