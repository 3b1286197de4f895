"""Access control against the database: assignments, break-glass grants, sessions, and the audited check.

:class:`AccessControl` is the one door to patient data. Its :meth:`~AccessControl.check` loads the account, its
assignments to the patient, its break-glass grants and (if given) its session *from the database on every call*,
evaluates the pure policy (:func:`compliance.access.decide`) and appends an audit entry before it answers. There
is deliberately no cache: a role revoked, a department removed, a call ended or an account frozen a moment ago
is refused on the very next request, on every node. If the audit entry cannot be written the request is refused
(:class:`AccessAuditFailed`): no access to patient data goes unrecorded.

What is audited: every decision on patient data (allowed → the action, outcome ``success``; denied → ``denied``
with the attempted action in the details), every denied attempt on anything, every allowed export and read of
the audit log, break-glass start, end (closed, expired, account frozen) and review, every permission change
(account created, roles, departments, responsible assignments), freezes, unfreezes, logins and logouts.
Patients appear in the audit log only by their blind id (the registry's keyed HMAC of the patient id, looked up
through the :class:`PatientDirectory` port or passed as ``Resource.audit_ref``; a hex patient id is its own), never
by name or number; tables and messages hold the opaque registry id at most. Call assignments are not audited one
by one (the calls table and routing record who took which call); the reads they allow are.

Tables (migration ``0007_access``): ``patient_assignments`` (account ↔ patient, ``responsible`` or ``call``),
``break_glass_grants`` and ``access_sessions``. Role and department history lives in the audit log.

Everything is synchronous; the asyncio service calls it through ``asyncio.to_thread``. Each method is its own
short transaction (plus audit appends after the commit of what they record, or before, for grants: see
:meth:`AccessControl.open_break_glass`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol, cast

from sqlalchemy import CheckConstraint, ColumnElement, Engine, ForeignKey, Index, Integer, String, or_, select, update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from compliance.access import (
    BLIND_ID,
    DEFAULT_BREAK_GLASS_MINUTES,
    MAX_BREAK_GLASS_MINUTES,
    VERDICTS,
    AccessError,
    Action,
    Assignment,
    Context,
    Decision,
    Grant,
    Resource,
    Subject,
    Verdict,
    break_glass_problem,
    break_glass_role,
    check_blind_id,
    check_call_id,
    check_department,
    check_patient_id,
    check_reason,
    create_problem,
    decide,
    deny,
    primary_role,
    reason_problem,
)
from compliance.accounts import (
    Account,
    AccountError,
    AccountRecord,
    AccountStore,
    check_account_id,
    check_departments,
    check_separation,
    freeze_row,
    locked_row,
    record_of,
)
from compliance.audit import AuditAction, AuditError, AuditLog, AuditOutcome, JsonValue, SqlAuditStore
from ground.db import Repository
from ground.errors import MedhotlineError
from ground.models import Base, UTCDateTime
from ground.operator import operator_id

GRANT_ID: Final = re.compile(r"bg-[a-z]{12}")
SESSION_ID: Final = re.compile(r"s-[a-z]{32}")
DEFAULT_SESSION_HOURS: Final = 12
SYSTEM_ACTOR: Final = "medhotline"
# Closing, freezing and unfreezing reasons may be short ("left the hospital"); access reasons may not.
MIN_SHORT_REASON: Final = 3
_AUDITED: Final[Mapping[Action, AuditAction]] = {
    "read": "read",
    "export": "export",
    "change": "change",
    "delete": "change",
}


class AccessDenied(MedhotlineError):
    """Refused by policy. The message names who, what and why, never a patient identifier; audited already."""

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class BreakGlassError(AccessError):
    """A break-glass operation that cannot be done (unknown grant, already closed or reviewed, bad scope)."""


class AccessAuditFailed(AccessError):
    """The audit log refused or failed to record an access decision or change: the access is refused."""


def _letters(n: int) -> str:
    # Letters only: ids go into audit details, whose validation refuses long digit runs (phone-number-like).
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


class PatientRef(Protocol):
    """What access control needs to know of a patient: how the audit log names them, and their department."""

    @property
    def blind_id(self) -> str: ...

    @property
    def department(self) -> str | None: ...


class PatientDirectory(Protocol):
    """The port to the patient registry (``his.PatientStore`` satisfies it): a patient's blind id and department,
    by opaque id, without decrypting anything. Raises (a MedhotlineError) for an unknown patient."""

    def ref(self, patient_id: str) -> PatientRef: ...


# --- tables ----------------------------------------------------------------------------------------------------


class PatientAssignment(Base):
    """The account is responsible for the patient (``responsible``), or on a call with them (``call``)."""

    __tablename__ = "patient_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    # The registry's opaque patient id (hex), never a name, phone or record number.
    patient_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    call_id: Mapped[str | None] = mapped_column(String(64))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assigned_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        CheckConstraint("kind IN ('responsible', 'call')", name="kind"),
        CheckConstraint("kind <> 'call' OR call_id IS NOT NULL", name="call_has_id"),
        CheckConstraint("ends_at IS NULL OR ends_at >= starts_at", name="period"),
        Index("ix_patient_assignments_account_patient", "account_id", "patient_id"),
        Index("ix_patient_assignments_call_id", "call_id"),
    )


class BreakGlassRow(Base):
    __tablename__ = "break_glass_grants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    # The account's session epoch when opened: a grant from before a freeze never counts again.
    account_epoch: Mapped[int] = mapped_column(Integer)
    patient_id: Mapped[str | None] = mapped_column(String(128))
    # The patient's blind id as the audit log names them, kept so the grant's end is audited alike.
    patient_ref: Mapped[str | None] = mapped_column(String(128))
    department: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(500))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(String(500))
    closed_by: Mapped[str | None] = mapped_column(String(128))
    reviewed_by: Mapped[str | None] = mapped_column(String(64), ForeignKey("accounts.id"))
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    review_verdict: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint(
            "(patient_id IS NOT NULL AND department IS NULL) OR (patient_id IS NULL AND department IS NOT NULL)",
            name="one_scope",
        ),
        CheckConstraint("expires_at > opened_at", name="period"),
        CheckConstraint(
            "(closed_at IS NULL AND close_reason IS NULL) OR (closed_at IS NOT NULL AND close_reason IS NOT NULL)",
            name="closed",
        ),
        CheckConstraint(
            "(reviewed_by IS NULL AND reviewed_at IS NULL AND review_verdict IS NULL) OR "
            "(reviewed_by IS NOT NULL AND reviewed_at IS NOT NULL AND review_verdict IN ('justified', 'unjustified'))",
            name="review",
        ),
        Index("ix_break_glass_grants_account_id", "account_id"),
        Index("ix_break_glass_grants_reviewed_at", "reviewed_at"),
    )


class AccessSession(Base):
    """A signed-in session; valid while open, unexpired and at the account's current epoch."""

    __tablename__ = "access_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    account_epoch: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_access_sessions_account_id", "account_id"),)


# --- values ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a staff account (its role is read from the database and checked), the operator at
    the host's shell (``os:<user>``: whoever runs the CLI has database access anyway), or the service itself."""

    id: str
    kind: Literal["account", "operator", "system"] = "account"

    @classmethod
    def account(cls, account_id: str) -> Actor:
        return cls(check_account_id(account_id), "account")

    @classmethod
    def operator(cls, user: str | None = None) -> Actor:
        return cls(operator_id(user), "operator")

    @classmethod
    def system(cls) -> Actor:
        return cls(SYSTEM_ACTOR, "system")


def cli_actor(by: str | None) -> Actor:
    """The actor of a CLI change: ``--by ACCOUNT`` when given, else the OS user at the shell."""
    return Actor.account(by) if by else Actor.operator()


@dataclass(frozen=True, slots=True)
class BreakGlassGrant:
    id: str
    account_id: str
    account_epoch: int
    patient_id: str | None
    patient_ref: str | None
    department: str | None
    reason: str
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    close_reason: str | None
    closed_by: str | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_verdict: str | None

    @classmethod
    def from_row(cls, row: BreakGlassRow) -> BreakGlassGrant:
        return cls(
            row.id, row.account_id, row.account_epoch, row.patient_id, row.patient_ref, row.department, row.reason,
            row.opened_at,
            row.expires_at, row.closed_at, row.close_reason, row.closed_by, row.reviewed_by, row.reviewed_at,
            row.review_verdict,
        )  # fmt: skip

    def policy_grant(self) -> Grant:
        return Grant(
            self.id, self.opened_at, self.expires_at, self.patient_id, self.department, self.closed_at,
            self.account_epoch,
        )  # fmt: skip

    def is_open(self, at: datetime) -> bool:
        return self.closed_at is None and at < self.expires_at

    def scope_text(self) -> str:
        """The scope for listings: a patient grant shows only that it is one, never the patient's id."""
        return f"department {self.department}" if self.department is not None else "one patient"


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    id: int
    account_id: str
    patient_id: str
    kind: str
    call_id: str | None
    starts_at: datetime
    ends_at: datetime | None
    assigned_by: str | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    account_id: str
    account_epoch: int
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None


@dataclass(frozen=True, slots=True)
class FreezeResult:
    account: AccountRecord
    grants_closed: tuple[str, ...]
    sessions_closed: int
    calls_ended: int


def _assignment(row: PatientAssignment) -> AssignmentRecord:
    return AssignmentRecord(
        row.id, row.account_id, row.patient_id, row.kind, row.call_id, row.starts_at, row.ends_at, row.assigned_by
    )


def _active_assignment(at: datetime) -> tuple[ColumnElement[bool], ...]:
    return PatientAssignment.starts_at <= at, or_(PatientAssignment.ends_at.is_(None), PatientAssignment.ends_at > at)


def _open_grant(at: datetime) -> tuple[ColumnElement[bool], ...]:
    return BreakGlassRow.closed_at.is_(None), BreakGlassRow.expires_at > at


# --- the service ---------------------------------------------------------------------------------------------


class AccessControl(Repository):
    """The database-backed, audited access control service (see the module docstring)."""

    def __init__(
        self, sessions: sessionmaker[Session], audit: AuditLog, *, patients: PatientDirectory | None = None
    ) -> None:
        super().__init__(sessions)
        self._audit = audit
        self._accounts = AccountStore(sessions)
        self._patients = patients

    @classmethod
    def for_engine(
        cls, engine: Engine, audit: AuditLog | None = None, *, patients: PatientDirectory | None = None
    ) -> AccessControl:
        """Over ``engine``; the audit log defaults to the audit tables of the same database.

        ``patients`` (the registry's ``PatientStore``) supplies each patient's blind id for the audit log and
        their department for the department scope; without it, callers pass ``Resource.audit_ref`` (or use
        hex patient ids, which are their own audit reference).
        """
        return cls(
            sessionmaker(engine, expire_on_commit=False), audit or AuditLog(SqlAuditStore(engine)), patients=patients
        )

    def _patient_ref(self, patient_id: str, audit_ref: str | None = None) -> str:
        """The patient's blind id for the audit log: given, from the registry, or the id itself if hex."""
        if audit_ref is not None:
            return check_blind_id(audit_ref)
        if self._patients is not None:
            return check_blind_id(self._patients.ref(patient_id).blind_id)
        if BLIND_ID.fullmatch(patient_id):
            return patient_id
        raise AccessError(
            "the audit log names a patient by blind id: pass audit_ref (the registry's blind id) or give "
            "AccessControl the registry (patients=PatientStore)"
        )

    def _ref_or_none(self, patient_id: str) -> str | None:
        """For the audit entry of a refusal: the patient's reference if it can be had, else the entry names none."""
        try:
            return self._patient_ref(patient_id)
        except MedhotlineError:
            return None

    def _resolved(self, resource: Resource, *, need_ref: bool) -> Resource:
        """The resource with the patient's department (if the caller gave none) and audit reference filled in."""
        if resource.patient_id is None:
            return resource
        department, audit_ref = resource.department, resource.audit_ref
        if self._patients is not None and (department is None or (audit_ref is None and need_ref)):
            ref = self._patients.ref(resource.patient_id)
            department = department if department is not None else ref.department
            audit_ref = audit_ref if audit_ref is not None else check_blind_id(ref.blind_id)
        if audit_ref is None and need_ref:
            audit_ref = self._patient_ref(resource.patient_id)
        return replace(resource, department=department, audit_ref=audit_ref)

    @property
    def accounts(self) -> AccountStore:
        return self._accounts

    # --- the check ---------------------------------------------------------------------------------------------

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

    def _append(
        self,
        doing: str,
        *,
        actor: str,
        role: str,
        action: AuditAction,
        outcome: AuditOutcome,
        patient: str | None = None,
        reason: str = "",
        details: Mapping[str, JsonValue] | None = None,
    ) -> None:
        try:
            self._audit.append(
                actor=actor, role=role, action=action, outcome=outcome, patient=patient, reason=reason,
                details=details,
            )  # fmt: skip
        except AuditError as exc:
            raise AccessAuditFailed(
                f"{doing} by {actor}: refused, the audit log could not record it: {_first_line(exc)}"
            ) from None
        except SQLAlchemyError as exc:
            # Only the type: SQLAlchemy's message repeats the statement's parameters.
            raise AccessAuditFailed(
                f"{doing} by {actor}: refused, the audit log could not record it ({type(exc).__name__})"
            ) from None

    def _refuse(self, actor: str, role: str, attempted: str, why: str, *, patient: str | None = None) -> AccessDenied:
        """Audit a refused administrative attempt and return the exception to raise."""
        self._append(
            f"denied {attempted}", actor=actor, role=role, action="denied", outcome="denied", patient=patient,
            details={"attempted": attempted, "why": why},
        )  # fmt: skip
        return AccessDenied(f"{attempted} by {actor} refused: {why}")

    def _actor_role(self, actor: Actor, attempted: str, allowed_roles: Iterable[str]) -> str:
        """The audit role of ``actor``; an account must exist, be unfrozen and hold one of ``allowed_roles``."""
        if actor.kind != "account":
            return actor.kind
        found = self._accounts.find(actor.id)
        if found is None:
            raise self._refuse(actor.id, "none", attempted, "there is no such account")
        if found.frozen:
            raise self._refuse(actor.id, primary_role(found.roles), attempted, "the account is frozen")
        usable = sorted(found.roles & frozenset(allowed_roles))
        if not usable:
            raise self._refuse(
                actor.id, primary_role(found.roles), attempted,
                f"it needs the role {' or '.join(sorted(allowed_roles))}",
            )  # fmt: skip
        return usable[0]

    # --- accounts (audited administration) ---------------------------------------------------------------------

    def add_account(
        self,
        account_id: str,
        display_name: str,
        roles: Iterable[str],
        at: datetime,
        *,
        actor: Actor,
        departments: Iterable[str] = (),
    ) -> AccountRecord:
        role = self._actor_role(actor, "account_create", ("admin",))
        record = self._accounts.add(account_id, display_name, roles, at, departments)
        self._append(
            f"creating account {account_id}", actor=actor.id, role=role, action="permission_change",
            outcome="success",
            details={"account": record.id, "change": "create", "roles": _names(record.roles),
                     "departments": _names(record.departments)},
        )  # fmt: skip
        return record

    def set_roles(self, account_id: str, roles: Iterable[str], at: datetime, *, actor: Actor) -> AccountRecord:
        chosen = check_separation(roles)
        return self._change_scope(
            account_id, "roles", actor, lambda: self._accounts.set_roles(account_id, chosen, at), lambda r: r.roles
        )

    def set_departments(
        self, account_id: str, departments: Iterable[str], at: datetime, *, actor: Actor
    ) -> AccountRecord:
        chosen = check_departments(departments)
        return self._change_scope(
            account_id,
            "departments",
            actor,
            lambda: self._accounts.set_departments(account_id, chosen, at),
            lambda r: r.departments,
        )

    def _change_scope(
        self,
        account_id: str,
        what: Literal["roles", "departments"],
        actor: Actor,
        change: Callable[[], AccountRecord],
        values: Callable[[AccountRecord], Iterable[str]],
    ) -> AccountRecord:
        """A permission change by an admin (never to one's own account), audited with before and after."""
        operation = "role_change" if what == "roles" else "department_change"
        role = self._actor_role(actor, operation, ("admin",))
        if actor.kind == "account" and actor.id == account_id:
            raise self._refuse(actor.id, role, operation, f"an account may not change its own {what}")
        before = self._accounts.get(account_id)
        record = change()
        self._append(
            f"changing {what} of {account_id}", actor=actor.id, role=role, action="permission_change",
            outcome="success",
            details={"account": account_id, "change": what, what: _names(values(record)),
                     "previous": _names(values(before))},
        )  # fmt: skip
        return record

    def freeze(self, account_id: str, reason: str, at: datetime, *, actor: Actor) -> FreezeResult:
        """Freeze at once, in one transaction: the account (epoch + 1), its open break-glass grants, its sessions
        and its open call assignments; then audit ``account_freeze`` and one ``break_glass_end`` per grant.

        The freeze is committed before it is audited (locking a leaver out must not wait on the audit log); if the
        audit fails, :class:`AccessAuditFailed` says the account IS frozen but the entry is missing.
        """
        text = check_reason(reason, "freeze reason", MIN_SHORT_REASON)
        # Freezing only takes access away: a supervisor may lock out a leaver of their team, too.
        role = self._actor_role(actor, "account_freeze", ("admin", "supervisor"))
        closed: list[BreakGlassGrant] = []
        with self._transaction(f"freezing account {account_id}") as session:
            row = freeze_row(session, account_id, text, at)
            for open_row in session.scalars(
                select(BreakGlassRow).where(BreakGlassRow.account_id == account_id, BreakGlassRow.closed_at.is_(None))
            ):
                expired = open_row.expires_at <= at
                open_row.closed_at = open_row.expires_at if expired else at
                open_row.close_reason = "expired" if expired else "account frozen"
                open_row.closed_by = actor.id
                closed.append(BreakGlassGrant.from_row(open_row))
            sessions_closed = _rowcount(
                session.execute(
                    update(AccessSession)
                    .where(AccessSession.account_id == account_id, AccessSession.closed_at.is_(None))
                    .values(closed_at=at, close_reason="account frozen")
                )
            )
            calls_ended = _rowcount(
                session.execute(
                    update(PatientAssignment)
                    .where(
                        PatientAssignment.account_id == account_id,
                        PatientAssignment.kind == "call",
                        *_active_assignment(at),
                    )
                    .values(ends_at=at)
                )
            )
            record = record_of(row)
        doing = f"account {account_id} IS frozen, but recording the freeze"
        self._append(
            doing, actor=actor.id, role=role, action="account_freeze", outcome="success", reason=text,
            details={"account": account_id, "epoch": record.session_epoch, "grants_closed": len(closed),
                     "sessions_closed": int(sessions_closed), "calls_ended": int(calls_ended)},
        )  # fmt: skip
        for grant in closed:
            self._audit_grant_end(grant, actor.id, role, doing)
        return FreezeResult(record, tuple(g.id for g in closed), int(sessions_closed), int(calls_ended))

    def unfreeze(self, account_id: str, reason: str, at: datetime, *, actor: Actor) -> AccountRecord:
        """Unfreeze; sessions and grants from before the freeze stay invalid (the epoch is not reset)."""
        text = check_reason(reason, "unfreeze reason", MIN_SHORT_REASON)
        role = self._actor_role(actor, "account_unfreeze", ("admin",))
        if actor.kind == "account" and actor.id == account_id:
            raise self._refuse(actor.id, role, "account_unfreeze", "an account may not unfreeze itself")
        record = self._accounts.unfreeze(account_id, at)
        self._append(
            f"unfreezing {account_id}", actor=actor.id, role=role, action="account_unfreeze", outcome="success",
            reason=text, details={"account": account_id, "epoch": record.session_epoch},
        )  # fmt: skip
        return record

    # --- assignments -------------------------------------------------------------------------------------------

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
            result = _rowcount(
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
            ended = _rowcount(
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

    # --- break-glass ---------------------------------------------------------------------------------------

    def open_break_glass(
        self,
        account_id: str,
        reason: str,
        at: datetime,
        *,
        patient_id: str | None = None,
        department: str | None = None,
        minutes: int = DEFAULT_BREAK_GLASS_MINUTES,
        audit_ref: str | None = None,
    ) -> BreakGlassGrant:
        """Open a grant for one patient or one department, for ``minutes`` (1..240, default 60).

        The reason is mandatory (at least 10 characters, no identifiers). The account must be unfrozen and hold
        a role that may break glass (never an admin or auditor); a refusal is audited and raises AccessDenied.
        ``break_glass_start`` is audited *before* the grant is stored, so no grant exists without its entry.
        """
        text = check_reason(reason, "break-glass reason")
        if (patient_id is None) == (department is None):
            raise BreakGlassError("a break-glass grant is for exactly one patient or one department")
        ref = None
        if patient_id is not None:
            check_patient_id(patient_id)
            ref = self._patient_ref(patient_id, audit_ref)
        if department is not None:
            check_department(department)
        if not 1 <= minutes <= MAX_BREAK_GLASS_MINUTES:
            raise BreakGlassError(f"a break-glass grant lasts 1 to {MAX_BREAK_GLASS_MINUTES} minutes, not {minutes}")
        account = self._accounts.find(account_id) if _valid_account_id(account_id) else None
        if account is None:
            raise self._refuse(_safe_id(account_id), "none", "break_glass_start", "there is no such account",
                               patient=ref)  # fmt: skip
        subject = Subject.from_account(account)
        problem = break_glass_problem(subject)
        if problem is not None:
            raise self._refuse(account_id, primary_role(subject.roles), "break_glass_start", problem,
                               patient=ref)  # fmt: skip
        role = break_glass_role(subject)
        grant_id = f"bg-{_letters(12)}"
        details: dict[str, JsonValue] = {"grant": grant_id, "minutes": minutes, "roles": _names(subject.roles)}
        if department is not None:
            details["department"] = department
        self._append(
            f"opening break-glass for {account_id}", actor=account_id, role=role, action="break_glass_start",
            outcome="success", patient=ref, reason=text, details=details,
        )  # fmt: skip
        try:
            with self._transaction(f"opening break-glass for {account_id}") as session:
                row = locked_row(session, account_id)
                if row.frozen or row.session_epoch != subject.session_epoch:
                    raise AccessDenied(f"break-glass by {account_id} refused: the account was frozen meanwhile")
                grant = BreakGlassRow(
                    id=grant_id, account_id=account_id, account_epoch=subject.session_epoch, patient_id=patient_id,
                    patient_ref=ref, department=department, reason=text, opened_at=at,
                    expires_at=at + timedelta(minutes=minutes),
                )  # fmt: skip
                session.add(grant)
                session.flush()
                return BreakGlassGrant.from_row(grant)
        except MedhotlineError:
            # The start is on record but the grant was never stored: say so, so the trail is not misleading.
            self._append(
                f"recording that break-glass {grant_id} did not open", actor=SYSTEM_ACTOR, role="system",
                action="break_glass_end", outcome="error", patient=ref, reason="not opened",
                details={"grant": grant_id, "holder": account_id},
            )  # fmt: skip
            raise

    def close_break_glass(
        self, grant_id: str, at: datetime, reason: str, *, actor: Actor | None = None
    ) -> BreakGlassGrant:
        """Close an open grant (audited ``break_glass_end``). ``actor`` defaults to the holder; another account
        must be a supervisor or admin. Raises BreakGlassError if unknown or already closed."""
        text = check_reason(reason, "closing reason", MIN_SHORT_REASON)
        grant = self.grant(grant_id)
        who = actor or Actor.account(grant.account_id)
        if who.kind == "account" and who.id == grant.account_id:
            holder = self._accounts.get(who.id)
            role = primary_role(holder.roles & frozenset({"agent", "nurse", "pharmacist", "physician", "supervisor"}))
        else:
            role = self._actor_role(who, "break_glass_end", ("supervisor", "admin"))
        if grant.closed_at is not None:
            raise BreakGlassError(f"break-glass grant {grant_id} is already closed ({grant.close_reason})")
        closed_at = min(at, grant.expires_at)
        close_reason = "expired" if at >= grant.expires_at else text
        closed = self._close(grant_id, closed_at, close_reason, who.id)
        if closed is None:
            raise BreakGlassError(f"break-glass grant {grant_id} is already closed")
        self._audit_grant_end(closed, who.id, role, f"closing break-glass {grant_id}")
        return closed

    def _close(self, grant_id: str, at: datetime, reason: str, by: str) -> BreakGlassGrant | None:
        """Close if still open (a conditional UPDATE: of two nodes closing at once, exactly one does it)."""
        with self._transaction(f"closing break-glass grant {grant_id}") as session:
            done = _rowcount(
                session.execute(
                    update(BreakGlassRow)
                    .where(BreakGlassRow.id == grant_id, BreakGlassRow.closed_at.is_(None))
                    .values(closed_at=at, close_reason=reason, closed_by=by)
                )
            )
            if done != 1:
                return None
            row = session.get(BreakGlassRow, grant_id)
            assert row is not None
            session.refresh(row)
            return BreakGlassGrant.from_row(row)

    def _audit_grant_end(self, grant: BreakGlassGrant, actor: str, role: str, doing: str) -> None:
        self._append(
            doing, actor=actor, role=role, action="break_glass_end", outcome="success", patient=grant.patient_ref,
            reason=grant.close_reason or "", details={"grant": grant.id, "holder": grant.account_id},
        )  # fmt: skip

    def sweep_break_glass(self, at: datetime) -> list[BreakGlassGrant]:
        """Close (as of their expiry) and audit every grant expired by ``at``; the service runs it periodically.

        Expired grants are already refused at check time; the sweep puts the end on record.
        """
        with self._transaction("finding expired break-glass grants") as session:
            due = [
                (row.id, row.expires_at)
                for row in session.execute(
                    select(BreakGlassRow.id, BreakGlassRow.expires_at)
                    .where(BreakGlassRow.closed_at.is_(None), BreakGlassRow.expires_at <= at)
                    .order_by(BreakGlassRow.expires_at, BreakGlassRow.id)
                )
            ]
        swept = []
        for grant_id, expires_at in due:
            closed = self._close(grant_id, expires_at, "expired", SYSTEM_ACTOR)
            if closed is not None:  # another node may have swept it first
                self._audit_grant_end(closed, SYSTEM_ACTOR, "system", f"recording the expiry of {grant_id}")
                swept.append(closed)
        return swept

    def grant(self, grant_id: str) -> BreakGlassGrant:
        if not GRANT_ID.fullmatch(grant_id):
            raise BreakGlassError(f"{grant_id!r} is not a break-glass grant id (bg- and 12 letters)")
        with self._transaction(f"reading break-glass grant {grant_id}") as session:
            row = session.get(BreakGlassRow, grant_id)
            if row is None:
                raise BreakGlassError(f"no break-glass grant {grant_id}")
            return BreakGlassGrant.from_row(row)

    def list_break_glass(
        self, *, pending_review: bool = False, open_at: datetime | None = None, account_id: str | None = None
    ) -> list[BreakGlassGrant]:
        """Grants, oldest first: all, or those not yet reviewed, or those open at ``open_at``, or one account's."""
        with self._transaction("listing break-glass grants") as session:
            query = select(BreakGlassRow)
            if pending_review:
                query = query.where(BreakGlassRow.reviewed_at.is_(None))
            if open_at is not None:
                query = query.where(*_open_grant(open_at), BreakGlassRow.opened_at <= open_at)
            if account_id is not None:
                query = query.where(BreakGlassRow.account_id == account_id)
            rows = session.scalars(query.order_by(BreakGlassRow.opened_at, BreakGlassRow.id))
            return [BreakGlassGrant.from_row(r) for r in rows]

    def pending_reviews(self) -> list[BreakGlassGrant]:
        """Grants no supervisor has reviewed yet (open or closed), oldest first."""
        return self.list_break_glass(pending_review=True)

    def review_break_glass(self, grant_id: str, supervisor_id: str, at: datetime, verdict: Verdict) -> BreakGlassGrant:
        """A supervisor's verdict on a grant (not their own), once; audited (``change`` of the grant)."""
        if verdict not in VERDICTS:
            raise BreakGlassError(f"verdict {verdict!r}: use {' or '.join(VERDICTS)}")
        grant = self.grant(grant_id)
        role = self._actor_role(Actor.account(supervisor_id), "break_glass_review", ("supervisor",))
        if supervisor_id == grant.account_id:
            raise self._refuse(supervisor_id, role, "break_glass_review", "nobody reviews their own break-glass")
        with self._transaction(f"reviewing break-glass grant {grant_id}") as session:
            done = _rowcount(
                session.execute(
                    update(BreakGlassRow)
                    .where(BreakGlassRow.id == grant_id, BreakGlassRow.reviewed_at.is_(None))
                    .values(reviewed_by=supervisor_id, reviewed_at=at, review_verdict=verdict)
                )
            )
            if done != 1:
                raise BreakGlassError(f"break-glass grant {grant_id} is already reviewed")
            row = session.get(BreakGlassRow, grant_id)
            assert row is not None
            session.refresh(row)
            reviewed = BreakGlassGrant.from_row(row)
        # AuditAction has no dedicated review action: it is recorded as a change of the grant.
        self._append(
            f"reviewing break-glass {grant_id}", actor=supervisor_id, role=role, action="change", outcome="success",
            reason=f"break-glass review: {verdict}",
            details={"object": "break_glass_grant", "grant": grant_id, "holder": grant.account_id,
                     "verdict": verdict},
        )  # fmt: skip
        return reviewed

    # --- sessions ------------------------------------------------------------------------------------------

    def open_session(self, account_id: str, at: datetime, *, hours: int = DEFAULT_SESSION_HOURS) -> SessionRecord:
        """Sign in (audited ``login``): a session bound to the account's current epoch. A frozen or unknown
        account is refused (audited). Authentication itself (SIP registration, the hospital's SSO) is upstream."""
        if not 1 <= hours <= 24:
            raise AccessError(f"a session lasts 1 to 24 hours, not {hours}")
        account = self._accounts.find(account_id) if _valid_account_id(account_id) else None
        if account is None or account.frozen:
            why = "there is no such account" if account is None else "the account is frozen"
            roles = "none" if account is None else primary_role(account.roles)
            raise self._refuse(_safe_id(account_id), roles, "login", why)
        with self._transaction(f"opening a session for {account_id}") as session:
            row = AccessSession(
                id=f"s-{_letters(32)}", account_id=account_id, account_epoch=account.session_epoch, opened_at=at,
                expires_at=at + timedelta(hours=hours),
            )  # fmt: skip
            session.add(row)
            session.flush()
            record = SessionRecord(row.id, row.account_id, row.account_epoch, row.opened_at, row.expires_at, None)
        # The session id is a bearer reference: it stays out of the audit log.
        self._append(
            f"signing in {account_id}", actor=account_id, role=primary_role(account.roles), action="login",
            outcome="success", details={"roles": _names(account.roles)},
        )  # fmt: skip
        return record

    def close_session(self, session_id: str, at: datetime, reason: str = "logout") -> bool:
        """Sign out (audited ``logout``); False if the session was unknown or already closed."""
        if not SESSION_ID.fullmatch(session_id):
            return False
        with self._transaction("closing a session") as session:
            row = session.get(AccessSession, session_id)
            if row is None or row.closed_at is not None:
                return False
            row.closed_at = at
            row.close_reason = reason[:64]
            account_id = row.account_id
        account = self._accounts.get(account_id)
        self._append(
            f"signing out {account_id}", actor=account_id, role=primary_role(account.roles), action="logout",
            outcome="success",
        )  # fmt: skip
        return True


def freeze_account(
    engine: Engine,
    account_id: str,
    reason: str,
    actor: Actor,
    at: datetime,
    *,
    audit: AuditLog | None = None,
) -> FreezeResult:
    """Freeze an account everywhere at once: the one function every ``freeze`` command calls.

    Flips the account (frozen, epoch + 1: every session and grant issued before is stale), closes its open
    break-glass grants and sessions and ends its current call assignments in one transaction, then audits
    ``account_freeze`` and each ``break_glass_end``. The router reads the frozen flag on every decision, so the
    account also rings no more. ``actor``: :func:`cli_actor` (``--by`` or the OS user), or ``Actor.system()``.
    """
    return AccessControl.for_engine(engine, audit).freeze(account_id, reason, at, actor=actor)


def _valid_account_id(account_id: str) -> bool:
    try:
        check_account_id(account_id)
    except AccountError:
        return False
    return True


def _safe_id(account_id: str) -> str:
    """The account id for messages and audit entries; a malformed one (maybe a phone number) is not repeated."""
    return account_id if _valid_account_id(account_id) else "unknown-account"


def _names(values: Iterable[str]) -> JsonValue:
    names: list[JsonValue] = [*sorted(values)]
    return names


def _rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (a CursorResult's rowcount; typed as the generic Result by SQLAlchemy)."""
    return int(cast("CursorResult[Any]", result).rowcount)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def registry_authorizer(
    access: AccessControl, *, reason: str | None = None
) -> Callable[[str, str, str], Awaitable[None]]:
    """The patient registry's ``authorize`` hook, backed by this policy: every read and change of a patient's
    identity is decided (from the database, at that moment) before anything is decrypted.

    The registry audits each read it serves, so allowed decisions are not audited twice (``record_allowed``
    False); denials are audited here. Registering a new patient is allowed by role alone.
    """

    async def authorize(accessor: str, action: str, patient_id: str) -> None:
        now = datetime.now(UTC)
        if action == "create":
            await asyncio.to_thread(access.authorize_new_patient, accessor, now)
            return
        if action not in ("read", "change"):
            raise AccessDenied(f"{accessor}: {action!r} is not an access to patient data the registry asks about")
        resource = Resource("patient_identity", patient_id)
        await asyncio.to_thread(
            access.authorize, accessor, cast(Action, action), resource, now, reason=reason, record_allowed=False
        )

    return authorize
