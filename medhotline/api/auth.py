"""Who is asking: sign-in (password, and a TOTP code for supervisors and auditors), the session token, and the
one access policy's decision with its audit entry for every request.

A session is the access policy's own (``access_sessions``, :mod:`compliance.access_sessions`): bound to the
account's epoch, so freezing an account ends its API sessions at once, and expiring after
:data:`SESSION_HOURS`. Its id is the bearer token (``Authorization: Bearer …``) or the ``medhotline_session``
cookie (HttpOnly, SameSite=Strict, Secure under TLS). Nothing about a refusal that could help a guesser (which of
password or code was wrong, whether the account exists) goes to the client; the audit log has the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine

from compliance.access import Action, RecordKind, Resource, primary_role
from compliance.access_records import SESSION_ID, AccessDenied, AccessSession
from compliance.access_store import AccessControl
from compliance.accounts import ACCOUNT_ID, AccountStore
from compliance.audit import AuditError, AuditLog, JsonValue, SqlAuditStore
from compliance.data_keys import KeyServicePort
from compliance.keyservice_client import GeneratedDataKey, KeyServiceStatus
from compliance.keyservice_protocol import KeyServiceUnavailable
from compliance.totp_vault import SecondFactorUnavailable, TotpVault
from ground.db import Repository

__all__ = ["COOKIE", "SESSION_HOURS", "UNAVAILABLE", "Authenticator", "NoKeyService", "Refused", "Signed"]

COOKIE: Final = "medhotline_session"
SESSION_HOURS: Final = 8
# Who an audit entry names when the request carried no usable session.
ANONYMOUS: Final = "anonymous"
UNAVAILABLE: Final = (
    "sign-in unavailable: second factors can't be checked while the key service is unreachable; "
    "try again shortly, and tell the administrator if it persists"
)


class Refused(Exception):
    """The request is refused: ``status`` (401 no valid session, 403 the policy says no) and a short message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed-in caller: account, the role the policy allowed under, the session id."""

    account_id: str
    role: str
    session_id: str


class NoKeyService:
    """The key service port of an API started without one: every use fails, so second factors fail closed."""

    def _refuse(self) -> KeyServiceUnavailable:
        return KeyServiceUnavailable("no key service is configured for the API")

    async def generate_data_key(self, purpose: str) -> GeneratedDataKey:
        raise self._refuse()

    async def unwrap(self, wrapped: bytes, purpose: str) -> bytearray:
        raise self._refuse()

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        raise self._refuse()

    async def rotate(self) -> int:
        raise self._refuse()

    async def status(self) -> KeyServiceStatus:
        raise self._refuse()


class _Sessions(Repository):
    def account_of(self, session_id: str) -> str | None:
        with self._transaction("reading a session") as session:
            row = session.get(AccessSession, session_id)
            return None if row is None else row.account_id


class Authenticator:
    """Sign-in, sign-out and the per-request check, over one engine; every outcome is audited."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime], keys: KeyServicePort | None = None) -> None:
        self._clock = clock
        self.audit = AuditLog(SqlAuditStore(engine))
        self.access = AccessControl.for_engine(engine, self.audit)
        self._accounts = AccountStore.for_engine(engine)
        # Second factors are opened through the key service for each sign-in (nothing cached), so a key service
        # that stops answering stops second-factor sign-ins at once; without one they are all refused.
        self._vault = TotpVault.for_engine(engine, keys if keys is not None else NoKeyService(), self.audit)
        self._sessions = _Sessions.for_engine(engine)

    def _denied(self, actor: str, role: str, details: Mapping[str, JsonValue]) -> None:
        # The request is refused either way; a refusal that could not be recorded is still a refusal.
        with contextlib.suppress(AuditError):
            self.audit.append(actor=actor, role=role, action="denied", outcome="denied", details=details)

    async def sign_in(self, account_id: str, password: str, code: str | None) -> tuple[str, datetime]:
        """A new session (audited ``login``) → (token, expiry); Refused(401) for any wrong part, Refused(503) when
        the account's second factor can't be opened because the key service is unavailable (both audited)."""
        now = self._clock()
        account = await asyncio.to_thread(self._accounts.find, account_id) if ACCOUNT_ID.fullmatch(account_id) else None
        if account is None:
            await asyncio.to_thread(self._denied, ANONYMOUS, "none", {"attempted": "login",
                                                                       "why": "there is no such account"})  # fmt: skip
            raise Refused(401, "sign-in refused")
        role = primary_role(account.roles)
        try:
            check = await self._vault.check(account, password, code, now)
        except SecondFactorUnavailable as exc:
            await asyncio.to_thread(self._denied, account.id, role, {"attempted": "login", "why": str(exc)})
            raise Refused(503, UNAVAILABLE) from None
        if not check.ok:
            await asyncio.to_thread(self._denied, account.id, role, {"attempted": "login", "why": check.why})
            raise Refused(401, "sign-in refused")
        try:
            # audits login or refusal
            record = await asyncio.to_thread(self.access.open_session, account.id, now, hours=SESSION_HOURS)
        except AccessDenied:
            raise Refused(401, "sign-in refused") from None
        return record.id, record.expires_at

    def sign_out(self, session_id: str) -> bool:
        return SESSION_ID.fullmatch(session_id) is not None and self.access.close_session(session_id, self._clock())

    def signed_in(self, session_id: str | None, action: Action, kind: RecordKind, endpoint: str) -> str:
        """The account of a valid session, before any policy decision (endpoints whose decision needs more than
        the session, such as a supervisor action's reason, make it themselves); Refused(401), audited, else."""
        account_id = None
        if session_id is not None and SESSION_ID.fullmatch(session_id):
            account_id = self._sessions.account_of(session_id)
        if session_id is None or account_id is None:
            self._denied(ANONYMOUS, "none", {"attempted": action, "kind": kind, "endpoint": endpoint,
                                             "why": "no valid session"})  # fmt: skip
            raise Refused(401, "sign in first")
        return account_id

    def authorize(
        self, session_id: str | None, action: Action, kind: RecordKind, endpoint: str,
        details: Mapping[str, JsonValue] | None = None, *, audit_allowed: bool = True,
    ) -> Signed:  # fmt: skip
        """The policy's decision for this request, from the database as it is now; an allowed request is audited
        (``read``, with the endpoint) unless ``audit_allowed`` is False (the wallboard's stream re-checks)."""
        now = self._clock()
        account_id = self.signed_in(session_id, action, kind, endpoint)
        assert session_id is not None  # signed_in refused it otherwise
        try:
            decision = self.access.authorize(account_id, action, Resource(kind), now, session_id=session_id,
                                             record_allowed=False)  # fmt: skip
        except AccessDenied as exc:
            status = 401 if exc.decision is not None and exc.decision.denial == "stale_session" else 403
            raise Refused(status, "sign in again" if status == 401 else "not allowed for your role") from None
        role = decision.role or "unknown"
        if audit_allowed:
            entry: dict[str, JsonValue] = {"kind": kind, "endpoint": endpoint, **(details or {})}
            try:
                self.audit.append(actor=account_id, role=role, action=action, outcome="success", details=entry)
            except AuditError:
                raise Refused(503, "not shown: the audit log could not record the request") from None
        return Signed(account_id, role, session_id)
