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
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from compliance.access import (
    DEFAULT_BREAK_GLASS_MINUTES,
    Action,
    Decision,
    Resource,
    Verdict,
)
from compliance.access_core import AccessPart
from compliance.access_decisions import AccessDecisions
from compliance.access_records import (
    DEFAULT_SESSION_HOURS,
    GRANT_ID,
    MIN_SHORT_REASON,
    SESSION_ID,
    SYSTEM_ACTOR,
    AccessAuditFailed,
    AccessDenied,
    AccessSession,
    Actor,
    AssignmentRecord,
    BreakGlassError,
    BreakGlassGrant,
    BreakGlassRow,
    FreezeResult,
    PatientAssignment,
    PatientDirectory,
    PatientRef,
    SessionRecord,
    cli_actor,
)
from compliance.access_sessions import AccessSessions
from compliance.account_admin import AccountAdministration
from compliance.accounts import (
    AccountRecord,
)
from compliance.assignments import Assignments
from compliance.audit import AuditLog, SqlAuditStore
from compliance.break_glass import BreakGlass

# The tables, values and errors live in compliance.access_records; callers keep importing them from here.
__all__ = [
    "DEFAULT_SESSION_HOURS",
    "GRANT_ID",
    "MIN_SHORT_REASON",
    "SESSION_ID",
    "SYSTEM_ACTOR",
    "AccessAuditFailed",
    "AccessControl",
    "AccessDenied",
    "AccessSession",
    "Actor",
    "AssignmentRecord",
    "BreakGlassError",
    "BreakGlassGrant",
    "BreakGlassRow",
    "FreezeResult",
    "PatientAssignment",
    "PatientDirectory",
    "PatientRef",
    "SessionRecord",
    "cli_actor",
    "freeze_account",
    "registry_authorizer",
]


class AccessControl(AccessPart):
    """The database-backed, audited access control service (see the module docstring): one object for callers,
    composed of focused parts over the same sessions, audit log and patient directory: :attr:`decisions`
    (the check), :attr:`admin` (accounts), :attr:`assignment`, :attr:`break_glass` and :attr:`sessions`."""

    def __init__(
        self, sessions: sessionmaker[Session], audit: AuditLog, *, patients: PatientDirectory | None = None
    ) -> None:
        super().__init__(sessions, audit, patients=patients)
        self.decisions = AccessDecisions(sessions, audit, patients=patients)
        self.admin = AccountAdministration(sessions, audit, patients=patients)
        self.assignment = Assignments(sessions, audit, patients=patients)
        self.break_glass = BreakGlass(sessions, audit, patients=patients)
        self.sessions = AccessSessions(sessions, audit, patients=patients)

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
        return self.decisions.evaluate(account_id, action, resource, at, reason=reason, session_id=session_id)

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
        return self.decisions.check(
            account_id, action, resource, at, reason=reason, session_id=session_id, record_allowed=record_allowed
        )

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
        return self.decisions.authorize(
            account_id, action, resource, at, reason=reason, session_id=session_id, record_allowed=record_allowed
        )

    def authorize_new_patient(self, account_id: str, at: datetime) -> None:
        self.decisions.authorize_new_patient(account_id, at)

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
        return self.admin.add_account(account_id, display_name, roles, at, actor=actor, departments=departments)

    def set_roles(self, account_id: str, roles: Iterable[str], at: datetime, *, actor: Actor) -> AccountRecord:
        return self.admin.set_roles(account_id, roles, at, actor=actor)

    def set_departments(
        self, account_id: str, departments: Iterable[str], at: datetime, *, actor: Actor
    ) -> AccountRecord:
        return self.admin.set_departments(account_id, departments, at, actor=actor)

    def freeze(self, account_id: str, reason: str, at: datetime, *, actor: Actor) -> FreezeResult:
        return self.admin.freeze(account_id, reason, at, actor=actor)

    def unfreeze(self, account_id: str, reason: str, at: datetime, *, actor: Actor) -> AccountRecord:
        return self.admin.unfreeze(account_id, reason, at, actor=actor)

    def begin_call_assignment(self, account_id: str, patient_id: str, call_id: str, at: datetime) -> int:
        return self.assignment.begin_call_assignment(account_id, patient_id, call_id, at)

    def end_call_assignment(self, call_id: str, at: datetime) -> int:
        return self.assignment.end_call_assignment(call_id, at)

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
        return self.assignment.assign_patient(account_id, patient_id, at, actor=actor, until=until, audit_ref=audit_ref)

    def unassign_patient(
        self, account_id: str, patient_id: str, at: datetime, *, actor: Actor, audit_ref: str | None = None
    ) -> int:
        return self.assignment.unassign_patient(account_id, patient_id, at, actor=actor, audit_ref=audit_ref)

    def assignments(self, account_id: str, at: datetime | None = None) -> list[AssignmentRecord]:
        return self.assignment.assignments(account_id, at)

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
        return self.break_glass.open_break_glass(
            account_id, reason, at, patient_id=patient_id, department=department, minutes=minutes, audit_ref=audit_ref
        )

    def close_break_glass(
        self, grant_id: str, at: datetime, reason: str, *, actor: Actor | None = None
    ) -> BreakGlassGrant:
        return self.break_glass.close_break_glass(grant_id, at, reason, actor=actor)

    def sweep_break_glass(self, at: datetime) -> list[BreakGlassGrant]:
        return self.break_glass.sweep_break_glass(at)

    def grant(self, grant_id: str) -> BreakGlassGrant:
        return self.break_glass.grant(grant_id)

    def list_break_glass(
        self, *, pending_review: bool = False, open_at: datetime | None = None, account_id: str | None = None
    ) -> list[BreakGlassGrant]:
        return self.break_glass.list_break_glass(pending_review=pending_review, open_at=open_at, account_id=account_id)

    def pending_reviews(self) -> list[BreakGlassGrant]:
        return self.break_glass.pending_reviews()

    def review_break_glass(self, grant_id: str, supervisor_id: str, at: datetime, verdict: Verdict) -> BreakGlassGrant:
        return self.break_glass.review_break_glass(grant_id, supervisor_id, at, verdict)

    def open_session(self, account_id: str, at: datetime, *, hours: int = DEFAULT_SESSION_HOURS) -> SessionRecord:
        return self.sessions.open_session(account_id, at, hours=hours)

    def close_session(self, session_id: str, at: datetime, reason: str = "logout") -> bool:
        return self.sessions.close_session(session_id, at, reason)


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
