"""Setting an account's API sign-in secrets on behalf of staff: the change, then its audit entry, as one call.

``medhotline signin password|totp`` only parses, calls :class:`SignInAdministration` and prints. The desk finds
the account, sets the password (:class:`compliance.credentials.CredentialStore`) or enrols the TOTP second factor,
sealed through the key service (:class:`compliance.totp_vault.TotpVault`), and appends one ``permission_change``
entry naming the account and which credential, for whoever made the change: a staff account acts in its primary
role, the operator at the shell in its own kind (as before the move).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from compliance.access import primary_role
from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore
from compliance.credentials import CredentialError, CredentialStore, totp_uri
from compliance.totp_vault import SecondFactorUnavailable, TotpVault
from ground.errors import CommandError

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Engine

    from compliance.access_records import Actor
    from compliance.data_keys import KeyServicePort

__all__ = ["SignInAdministration", "SignInChange"]


@dataclass(frozen=True, slots=True)
class SignInChange:
    """What was changed: the account, and for TOTP the ``otpauth://`` URI to show once (never stored or logged)."""

    account_id: str
    credential: Literal["password", "totp"]
    totp_uri: str | None = None


@dataclass
class SignInAdministration:
    """Set passwords and enrol second factors, each audited as a permission change."""

    accounts: AccountStore
    credentials: CredentialStore
    audit: AuditLog
    # Seals second factors; None (no key service given): enrolling one is refused.
    vault: TotpVault | None = None

    @classmethod
    def for_engine(cls, engine: Engine, keys: KeyServicePort | None = None) -> SignInAdministration:
        audit = AuditLog(SqlAuditStore(engine))
        vault = TotpVault.for_engine(engine, keys, audit) if keys is not None else None
        return cls(AccountStore.for_engine(engine), CredentialStore.for_engine(engine), audit, vault)

    def set_password(self, account_id: str, password: str, *, actor: Actor, at: datetime) -> SignInChange:
        """The account's password (checked for length by the store); CommandError for an unknown account or a
        refused password, with nothing stored."""
        role = self._role(actor)
        account = self._account(account_id)
        try:
            self.credentials.set_password(account, password, at)
        except CredentialError as exc:
            raise CommandError(str(exc)) from None
        return self._audited(actor, role, SignInChange(account, "password"))

    async def enroll_totp(self, account_id: str, *, actor: Actor, at: datetime) -> SignInChange:
        """A new TOTP secret for the account, stored sealed; the change carries the URI for the authenticator app.
        CommandError, with nothing stored or audited, without a password or when the key service can't seal it."""
        if self.vault is None:
            raise CommandError("enrolling a second factor needs the key service (it seals the secret)")
        role = self._role(actor)
        account = self._account(account_id)
        try:
            secret = await self.vault.enroll(account, at)
        except (CredentialError, SecondFactorUnavailable) as exc:
            raise CommandError(str(exc)) from None
        return self._audited(actor, role, SignInChange(account, "totp", totp_uri(secret, account)))

    def _account(self, account_id: str) -> str:
        account = self.accounts.find(account_id)
        if account is None:
            raise CommandError(f"no account {account_id!r}")
        return account.id

    def _role(self, actor: Actor) -> str:
        """The role the change is audited under, found before anything changes: an unknown acting account must
        leave the credentials as they were, not changed and unaudited."""
        if actor.kind != "account":
            return actor.kind
        acting = self.accounts.find(actor.id)
        if acting is None:
            raise CommandError(f"no account {actor.id!r} to act as")
        return primary_role(acting.roles)

    def _audited(self, actor: Actor, role: str, change: SignInChange) -> SignInChange:
        self.audit.append(
            actor=actor.id, role=role, action="permission_change", outcome="success",
            details={"account": change.account_id, "credential": change.credential},
        )  # fmt: skip
        return change
