"""The base of access control's parts: the sessions, the audit log, the account store, the patient directory
port, and the helpers every part uses to name a patient, refuse and audit (see :mod:`compliance.access_store`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from compliance.access import (
    BLIND_ID,
    AccessError,
    Resource,
    check_blind_id,
    primary_role,
)
from compliance.access_records import (
    AccessAuditFailed,
    AccessDenied,
    Actor,
    BreakGlassGrant,
    PatientDirectory,
    _first_line,
)
from compliance.accounts import (
    AccountStore,
)
from compliance.audit import AuditAction, AuditError, AuditLog, AuditOutcome, JsonValue
from ground.db import Repository
from ground.errors import MedhotlineError


class AccessPart(Repository):
    """What every part of access control shares; one instance of each part per :class:`AccessControl`."""

    def __init__(
        self, sessions: sessionmaker[Session], audit: AuditLog, *, patients: PatientDirectory | None = None
    ) -> None:
        super().__init__(sessions)
        self._audit = audit
        self._accounts = AccountStore(sessions)
        self._patients = patients

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

    def _audit_grant_end(self, grant: BreakGlassGrant, actor: str, role: str, doing: str) -> None:
        self._append(
            doing, actor=actor, role=role, action="break_glass_end", outcome="success", patient=grant.patient_ref,
            reason=grant.close_reason or "", details={"grant": grant.id, "holder": grant.account_id},
        )  # fmt: skip
