"""TOTP second-factor secrets sealed at rest: enrol, check a sign-in, and seal the clear rows left from before.

The secret must be read back to compute a code, so it is encrypted, not hashed: AES-256-GCM
(:class:`compliance.fields.FieldCipher`) under the current data key of purpose :data:`PURPOSE`, which only the key
service can unwrap (:class:`compliance.data_keys.DataKeyRing`, one unwrap per operation, nothing cached). The
associated data is ``account_credentials|totp|<account id>|<key version>``: it names the account and the purpose,
so a sealed secret copied onto another account (or into another sealed column) does not open there.

Fail closed. A sign-in of an account with a sealed secret opens it through the key service *before* the password
is compared: when the key service can't be reached the sign-in is refused with :class:`SecondFactorUnavailable`
whatever the password, so an outage never turns the API into an oracle that says whether a password was right
without the second factor. A clear ``totp_secret`` is never used: one could have been written by anybody with
write access to the database, which is exactly what sealing with the account bound in guards against. Rows
enrolled before sealing are sealed by :meth:`TotpVault.seal_clear` (``medhotline keys seal-totp``) or by
enrolling the account again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from compliance.accounts import AccountRecord
from compliance.audit import AuditLog, JsonValue
from compliance.credentials import (
    CredentialStore,
    SignInCheck,
    StoredSignIn,
    code_well_formed,
    hash_password,
    matching_step,
    needs_second_factor,
    new_totp_secret,
    password_matches,
    secret_bytes,
    secret_text,
)
from compliance.data_keys import DataKeyError, DataKeyRing, DataKeyStore, KeyServicePort
from compliance.fields import FieldCipherError
from compliance.keyservice_protocol import KeyServiceError
from ground.errors import MedhotlineError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["PURPOSE", "SealReport", "SecondFactorUnavailable", "TotpVault"]

PURPOSE: Final = "totp"  # the data key purpose, and the column name bound into the associated data
TABLE: Final = "account_credentials"
NOT_OPENING: Final = "the sealed second factor does not open (altered, or copied from another account)"
CLEAR_REFUSED: Final = "the second factor is stored in clear from before sealing: run `medhotline keys seal-totp`"


class SecondFactorUnavailable(MedhotlineError):
    """The key service could not open (or seal) a second factor; nothing was accepted and nothing stored."""


@dataclass(frozen=True, slots=True)
class SealReport:
    """One ``seal-totp`` run: clear secrets sealed, clear values blanked (already superseded by a sealed one), and
    rows skipped because they changed while the run went on."""

    sealed: int
    blanked: int
    skipped: int

    @property
    def changed(self) -> int:
        return self.sealed + self.blanked


def _unavailable(exc: Exception, what: str) -> SecondFactorUnavailable:
    return SecondFactorUnavailable(f"cannot {what}: the key service is unavailable ({exc})")


class TotpVault:
    """Sealed TOTP secrets over a credential store and the key ring; ``audit`` records ``seal_clear`` runs."""

    def __init__(
        self,
        credentials: CredentialStore,
        ring: DataKeyRing,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._credentials = credentials
        self._ring = ring
        self._audit = audit
        self._clock = clock or (lambda: datetime.now(UTC))

    @classmethod
    def for_engine(cls, engine: Engine, keys: KeyServicePort, audit: AuditLog | None = None) -> TotpVault:
        return cls(CredentialStore.for_engine(engine), DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit),
                   audit=audit)  # fmt: skip

    async def _seal(self, account_id: str, secret: bytes) -> tuple[str, int]:
        try:
            key = await self._ring.current_key(PURPOSE)
            async with self._ring.cipher([key]) as cipher:
                token = cipher.encrypt_bytes(secret, table=TABLE, column=PURPOSE, row_id=account_id)
        except (KeyServiceError, DataKeyError) as exc:
            raise _unavailable(exc, f"seal the second factor of {account_id}") from None
        return token, key.id

    async def _open(self, stored: StoredSignIn) -> bytes | None:
        """The secret, or None when it does not open here; SecondFactorUnavailable when the key service is down."""
        assert stored.totp_sealed is not None
        assert stored.totp_data_key_id is not None
        try:
            keys = await self._ring.keys([stored.totp_data_key_id])
            if keys[0].purpose != PURPOSE:
                return None  # a data key of another purpose: the token was not sealed for this column
            async with self._ring.cipher(keys) as cipher:
                return cipher.decrypt_bytes(stored.totp_sealed, table=TABLE, column=PURPOSE, row_id=stored.account_id)
        except (FieldCipherError, DataKeyError):
            # The token, or the wrapped data key it names, was altered or moved: an integrity failure, not an outage.
            return None
        except KeyServiceError as exc:
            raise _unavailable(exc, f"open the second factor of {stored.account_id}") from None

    async def enroll(self, account_id: str, at: datetime) -> str:
        """A new secret for the account, stored sealed (replacing any earlier one) → its base32 text, to be shown
        once. CredentialError without a password; SecondFactorUnavailable (nothing stored) without the key service."""
        await asyncio.to_thread(self._credentials.require_password, account_id)
        secret = new_totp_secret()
        token, key_id = await self._seal(account_id, secret)
        await asyncio.to_thread(self._credentials.store_sealed_totp, account_id, token, key_id, at)
        return secret_text(secret)

    async def check(self, account: AccountRecord, password: str, code: str | None, at: datetime) -> SignInCheck:
        """Password, then (for the second-factor roles) the TOTP code; a good code is used up.

        Raises SecondFactorUnavailable when the account's sealed secret can't be opened for want of the key
        service, before the password is looked at (see the module docstring).
        """
        stored = await asyncio.to_thread(self._credentials.material, account.id)
        if stored is None:
            await asyncio.to_thread(hash_password, password)  # the same work as a real check: no timing hint
            return SignInCheck(False, "no password is set for the account")
        second = needs_second_factor(account)
        secret = await self._open(stored) if second and stored.totp_sealed is not None else None
        if not await asyncio.to_thread(password_matches, password, stored.password_hash):
            return SignInCheck(False, "wrong password")
        if not second:
            return SignInCheck(True)
        if stored.totp_sealed is None:
            why = CLEAR_REFUSED if stored.has_clear_totp else "the role needs a second factor and none is enrolled"
            return SignInCheck(False, why)
        if not code_well_formed(code):
            return SignInCheck(False, "the role needs a second factor code")
        assert code is not None
        if secret is None:
            return SignInCheck(False, NOT_OPENING)
        step = matching_step(secret, code, at)
        if step is None:
            return SignInCheck(False, "wrong second factor code")
        if not await asyncio.to_thread(self._credentials.use_totp_step, account.id, stored.totp_sealed, step):
            return SignInCheck(False, "second factor code already used")
        return SignInCheck(True)

    async def seal_clear(self, *, actor: str, role: str, reason: str = "") -> SealReport:
        """Seal every TOTP secret still stored in clear and blank the clear column; audited as ``key_operation``.

        Idempotent and resumable: a row is sealed and blanked in one transaction, so a second run finds nothing.
        A clear value beside a sealed one (a later enrolment) is only blanked. A clear value that is not base32
        is blanked too (it could never have produced a code), and counted as blanked.
        """
        sealed = blanked = skipped = 0
        try:
            for row in await asyncio.to_thread(self._credentials.clear_totp):
                replacement = None
                if not row.has_sealed:
                    try:
                        raw = secret_bytes(row.secret)
                    except ValueError:
                        raw = b""
                    replacement = await self._seal(row.account_id, raw) if raw else None
                done = await asyncio.to_thread(
                    self._credentials.replace_clear_totp, row.account_id, row.secret, replacement, self._clock()
                )
                if not done:
                    skipped += 1
                elif replacement is not None:
                    sealed += 1
                else:
                    blanked += 1
        except SecondFactorUnavailable:
            await self._record(actor, role, reason, SealReport(sealed, blanked, skipped), error=True)
            raise
        if sealed or blanked:
            await asyncio.to_thread(self._credentials.scrub_free_space)
        report = SealReport(sealed, blanked, skipped)
        await self._record(actor, role, reason, report, error=False)
        return report

    async def _record(self, actor: str, role: str, reason: str, report: SealReport, *, error: bool) -> None:
        if self._audit is None:
            return
        audit = self._audit
        details: dict[str, JsonValue] = {
            "operation": "seal_totp", "purpose": PURPOSE, "sealed": report.sealed, "blanked": report.blanked,
            "skipped": report.skipped,
        }  # fmt: skip
        await asyncio.to_thread(
            lambda: audit.append(
                actor=actor, role=role, action="key_operation", outcome="error" if error else "success",
                reason=reason, details=details,
            )
        )  # fmt: skip
