"""Access decisions: the one door to patient data (see :mod:`compliance.access_store`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.access import (
    Action,
    Assignment,
    Context,
    Decision,
    Grant,
    Resource,
    Subject,
    create_problem,
    decide,
    deny,
    primary_role,
    reason_problem,
)
from compliance.access_core import AccessPart
from compliance.access_records import (
    _AUDITED,
    SESSION_ID,
    AccessDenied,
    AccessSession,
    BreakGlassGrant,
    BreakGlassRow,
    PatientAssignment,
    _active_assignment,
    _names,
    _open_grant,
    _safe_id,
    _valid_account_id,
)
from compliance.accounts import (
    Account,
    record_of,
)
from compliance.audit import JsonValue


class AccessDecisions(AccessPart):
    """The audited check: load everything from the database, decide, audit, answer."""

    def evaluate(
        self,
        account_id: str,
        action: Action,
        resource: Resource,
        at: datetime,
        *,
        reason: str | None = None,
        session_id: str | None = None,
    ) -> Decision:
        """The decision as :meth:`check` would make it, from the database as it is now, WITHOUT auditing it.

        For ``medhotline access check`` (what-if questions of admins and auditors); no data is accessed. Every
        real access goes through :meth:`check` or :meth:`authorize`.
        """
        resolved = self._resolved(resource, need_ref=False)
        return self._evaluate(account_id, action, resolved, at, reason=reason, session_id=session_id)[1]

    def check(
        self,
        account_id: str,
        action: Action,
        resource: Resource,
        at: datetime,
        *,
        reason: str | None = None,
        session_id: str | None = None,
        record_allowed: bool = True,
    ) -> Decision:
        """Decide from the database as it is now and audit the decision; a denial is returned, not raised.

        Raises :class:`AccessAuditFailed` (the access is refused) if the audit entry cannot be written.
        ``record_allowed=False``: the caller audits the allowed access itself (the patient registry records each
        read it serves); denials are audited here regardless.
        """
        resolved = self._resolved(resource, need_ref=True)
        subject, decision = self._evaluate(account_id, action, resolved, at, reason=reason, session_id=session_id)
        if record_allowed or not decision.allowed:
            self._audit_decision(subject, action, resolved, decision, reason)
        return decision

    def authorize(
        self,
        account_id: str,
        action: Action,
        resource: Resource,
        at: datetime,
        *,
        reason: str | None = None,
        session_id: str | None = None,
        record_allowed: bool = True,
    ) -> Decision:
        """As :meth:`check`, but a denial raises :class:`AccessDenied` (who, what, why; no patient identifier)."""
        decision = self.check(
            account_id, action, resource, at, reason=reason, session_id=session_id, record_allowed=record_allowed
        )
        if not decision.allowed:
            raise AccessDenied(f"access denied: {decision.explanation}", decision)
        return decision

    def authorize_new_patient(self, account_id: str, at: datetime) -> None:
        """May the account register a new patient (a caller not in the registry yet)? By role alone (see
        :func:`compliance.access.create_problem`); a refusal is audited and raises AccessDenied. An allowed
        creation is not audited here: the registry records the new patient, by its blind id, once stored."""
        account = self._accounts.find(account_id) if _valid_account_id(account_id) else None
        subject = Subject(_safe_id(account_id), frozenset()) if account is None else Subject.from_account(account)
        problem = "there is no such account" if account is None else create_problem(subject)
        if problem is not None:
            self._append(
                "denied patient registration", actor=subject.account_id, role=primary_role(subject.roles),
                action="denied", outcome="denied",
                details={"attempted": "create", "kind": "patient_identity", "why": problem,
                         "roles": _names(subject.roles)},
            )  # fmt: skip
            raise AccessDenied(f"access denied: {subject.account_id} may not register a patient: {problem}")

    def _evaluate(
        self,
        account_id: str,
        action: Action,
        resource: Resource,
        at: datetime,
        *,
        reason: str | None,
        session_id: str | None,
    ) -> tuple[Subject, Decision]:
        with self._transaction(f"checking access of account {_safe_id(account_id)}") as session:
            row = session.get(Account, account_id) if _valid_account_id(account_id) else None
            if row is None:
                subject = Subject(_safe_id(account_id), frozenset())
                return subject, deny(subject, action, resource.kind, "unknown_account")
            subject = Subject.from_account(record_of(row))
            if session_id is not None and not self._session_valid(session, session_id, subject, at):
                return subject, deny(subject, action, resource.kind, "stale_session")
            assignments: tuple[Assignment, ...] = ()
            grants: tuple[Grant, ...] = ()
            if resource.patient_id is not None:
                rows = session.scalars(
                    select(PatientAssignment).where(
                        PatientAssignment.account_id == account_id,
                        PatientAssignment.patient_id == resource.patient_id,
                        *_active_assignment(at),
                    )
                )
                assignments = tuple(
                    Assignment(r.patient_id, "call" if r.kind == "call" else "responsible", r.starts_at, r.ends_at,
                               r.call_id)
                    for r in rows
                )  # fmt: skip
                grant_rows = session.scalars(
                    select(BreakGlassRow).where(BreakGlassRow.account_id == account_id, *_open_grant(at))
                )
                grants = tuple(BreakGlassGrant.from_row(g).policy_grant() for g in grant_rows)
        return subject, decide(subject, action, resource, Context(assignments, grants, reason), at)

    @staticmethod
    def _session_valid(session: Session, session_id: str, subject: Subject, at: datetime) -> bool:
        row = session.get(AccessSession, session_id) if SESSION_ID.fullmatch(session_id) else None
        return (
            row is not None
            and row.account_id == subject.account_id
            and row.closed_at is None
            and row.opened_at <= at < row.expires_at
            and row.account_epoch == subject.session_epoch
        )

    def _audit_decision(
        self, subject: Subject, action: Action, resource: Resource, decision: Decision, reason: str | None
    ) -> None:
        if decision.allowed and not (resource.is_patient_data or resource.kind == "audit_log" or action == "export"):
            return  # administration reads and changes: the change itself is audited by the operation
        details: dict[str, JsonValue] = {"kind": resource.kind, "roles": _names(subject.roles)}
        if resource.department is not None:
            details["department"] = resource.department
        if decision.basis is not None:
            details["basis"] = decision.basis
        if decision.grant_id is not None:
            details["grant"] = decision.grant_id
        safe_reason = (reason or "").strip() if reason_problem(reason) is None else ""
        role = decision.role or primary_role(subject.roles)
        if decision.allowed:
            if action == "delete":
                details["operation"] = "delete"  # the audit log has no delete action; a deletion is a change
            self._append(
                f"{action} of {resource.kind}", actor=subject.account_id, role=role, action=_AUDITED[action],
                outcome="success", patient=resource.audit_ref, reason=safe_reason, details=details,
            )  # fmt: skip
            return
        details["attempted"] = action
        details["why"] = decision.denial
        if reason is not None and not safe_reason:
            details["reason_rejected"] = True  # the reason itself is not recorded: it may hold an identifier
        self._append(
            f"denied {action} of {resource.kind}", actor=subject.account_id, role=role, action="denied",
            outcome="denied", patient=resource.audit_ref, reason=safe_reason, details=details,
        )  # fmt: skip
