"""Access sessions (see :mod:`compliance.access_store`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from compliance.access import (
    AccessError,
    primary_role,
)
from compliance.access_core import AccessPart
from compliance.access_records import (
    DEFAULT_SESSION_HOURS,
    SESSION_ID,
    AccessSession,
    SessionRecord,
    _letters,
    _names,
    _safe_id,
    _valid_account_id,
)


class AccessSessions(AccessPart):
    """Login sessions tied to the account's epoch (a freeze ends them all)."""

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
