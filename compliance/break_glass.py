"""Break-glass grants (see :mod:`compliance.access_store`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from compliance.access import (
    DEFAULT_BREAK_GLASS_MINUTES,
    MAX_BREAK_GLASS_MINUTES,
    VERDICTS,
    Subject,
    Verdict,
    break_glass_problem,
    break_glass_role,
    check_department,
    check_patient_id,
    check_reason,
    primary_role,
)
from compliance.access_core import AccessPart
from compliance.access_records import (
    GRANT_ID,
    MIN_SHORT_REASON,
    SYSTEM_ACTOR,
    AccessDenied,
    Actor,
    BreakGlassError,
    BreakGlassGrant,
    BreakGlassRow,
    _letters,
    _names,
    _open_grant,
    _safe_id,
    _valid_account_id,
)
from compliance.accounts import (
    locked_row,
)
from compliance.audit import JsonValue
from ground.db import rowcount
from ground.errors import MedhotlineError


class BreakGlass(AccessPart):
    """Per-access emergency grants: open with a reason, close, expire, review."""

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
            done = rowcount(
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
            done = rowcount(
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
