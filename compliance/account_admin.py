"""Account administration, every change audited (see :mod:`compliance.access_store`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Literal

from sqlalchemy import select, update

from compliance.access import (
    check_reason,
)
from compliance.access_core import AccessPart
from compliance.access_records import (
    MIN_SHORT_REASON,
    AccessSession,
    Actor,
    BreakGlassGrant,
    BreakGlassRow,
    FreezeResult,
    PatientAssignment,
    _active_assignment,
    _names,
)
from compliance.accounts import (
    AccountRecord,
    check_departments,
    check_separation,
    freeze_row,
    record_of,
)
from ground.db import rowcount


class AccountAdministration(AccessPart):
    """Audited administration of accounts: create, roles, departments, freeze, unfreeze."""

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
            sessions_closed = rowcount(
                session.execute(
                    update(AccessSession)
                    .where(AccessSession.account_id == account_id, AccessSession.closed_at.is_(None))
                    .values(closed_at=at, close_reason="account frozen")
                )
            )
            calls_ended = rowcount(
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
