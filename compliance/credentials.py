"""Staff sign-in secrets: a password (scrypt) and, for supervisors and auditors, a TOTP second factor (RFC 6238).

GB/T 22239 level 3 asks for two factors where an account can see or change much; here that is the ``supervisor``
and ``auditor`` roles (:data:`SECOND_FACTOR_ROLES`). The password is stored as an scrypt hash with its own salt and
parameters (``hashlib.scrypt``, no new dependency); the TOTP secret is 20 random bytes, RFC 6238 with HMAC-SHA1,
30-second steps and 6 digits, which every authenticator app reads from an ``otpauth://`` URI. A code is accepted
one step either side of now (clock drift) and only once: the last step used is stored, so a code seen over a
shoulder can't be replayed.

The pure parts (:func:`hash_password`, :func:`password_matches`, :func:`totp_code`, :func:`totp_step`) read no
clock and no database; :class:`CredentialStore` keeps the secrets in ``account_credentials`` (migration
``0018_api_credentials``). Nothing here writes a secret to a log or an exception.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from urllib.parse import quote

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from compliance.accounts import Account, AccountRecord, Role
from ground.db import DatabaseError, Repository
from ground.models import Base, UTCDateTime

__all__ = [
    "SECOND_FACTOR_ROLES",
    "AccountCredentials",
    "CredentialError",
    "CredentialStore",
    "SignInCheck",
    "hash_password",
    "needs_second_factor",
    "password_matches",
    "totp_code",
    "totp_step",
    "totp_uri",
]

SECOND_FACTOR_ROLES: Final[frozenset[Role]] = frozenset({"supervisor", "auditor"})
MIN_PASSWORD_CHARS: Final = 12
MAX_PASSWORD_CHARS: Final = 256
TOTP_STEP_SECONDS: Final = 30
TOTP_DIGITS: Final = 6
TOTP_SECRET_BYTES: Final = 20
# scrypt's cost: 16 MiB of memory, about 50 ms here; stored with each hash so it can be raised later.
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16


class CredentialError(DatabaseError):
    """A password or second factor that can't be set (too short, unknown account); never carries the secret."""


class AccountCredentials(Base):
    """One row per account that may sign in to the API: its password hash and TOTP secret (if enrolled)."""

    __tablename__ = "account_credentials"

    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    # The last TOTP step accepted: a code is good once.
    totp_last_step: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), the form stored in ``account_credentials.password_hash``."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def password_matches(password: str, stored: str) -> bool:
    """Whether ``password`` hashes to ``stored`` (constant-time compare); False for a malformed hash."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
        digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


def totp_step(at: datetime) -> int:
    """The RFC 6238 time step of ``at`` (Unix time / 30 s)."""
    return int(at.timestamp()) // TOTP_STEP_SECONDS


def totp_code(secret: bytes, step: int) -> str:
    """The 6-digit code of ``step`` (RFC 4226 HOTP over the step counter, dynamic truncation)."""
    mac = hmac.new(secret, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{value % 10**TOTP_DIGITS:0{TOTP_DIGITS}d}"


def totp_uri(secret_b32: str, account_id: str, issuer: str = "medhotline") -> str:
    """The ``otpauth://`` URI an authenticator app reads (usually shown as a QR code)."""
    label = quote(f"{issuer}:{account_id}")
    return f"otpauth://totp/{label}?secret={secret_b32}&issuer={quote(issuer)}&digits={TOTP_DIGITS}&period=30"


def needs_second_factor(account: AccountRecord) -> bool:
    return bool(account.roles & SECOND_FACTOR_ROLES)


def _secret_bytes(secret_b32: str) -> bytes:
    return base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))


@dataclass(frozen=True, slots=True)
class SignInCheck:
    """The outcome of checking a sign-in: ``ok``, or why not (said to the audit log, not to the client)."""

    ok: bool
    why: str = ""


class CredentialStore(Repository):
    """``account_credentials``: set a password, enrol a second factor, check a sign-in."""

    def set_password(self, account_id: str, password: str, at: datetime) -> None:
        if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
            raise CredentialError(
                f"password for {account_id}: use {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
            )
        hashed = hash_password(password)
        with self._transaction(f"setting the password of {account_id}") as session:
            if session.get(Account, account_id) is None:
                raise CredentialError(f"no account {account_id!r}")
            row = session.get(AccountCredentials, account_id)
            if row is None:
                session.add(AccountCredentials(account_id=account_id, password_hash=hashed, updated_at=at))
            else:
                row.password_hash = hashed
                row.updated_at = at

    def enroll_totp(self, account_id: str, at: datetime) -> str:
        """A new TOTP secret (base32) for the account, replacing any earlier one; the password must be set first."""
        secret = base64.b32encode(secrets.token_bytes(TOTP_SECRET_BYTES)).decode("ascii").rstrip("=")
        with self._transaction(f"enrolling a second factor for {account_id}") as session:
            row = session.get(AccountCredentials, account_id)
            if row is None:
                raise CredentialError(f"account {account_id}: set a password before enrolling a second factor")
            row.totp_secret = secret
            row.totp_last_step = None
            row.updated_at = at
        return secret

    def check(self, account: AccountRecord, password: str, code: str | None, at: datetime) -> SignInCheck:
        """Password, then (for :data:`SECOND_FACTOR_ROLES`) the TOTP code; a good code is used up."""
        with self._transaction(f"checking the sign-in of {account.id}") as session:
            row = session.get(AccountCredentials, account.id, with_for_update=True)
            if row is None:
                hash_password(password)  # the same work as a real check: no timing hint that the account has none
                return SignInCheck(False, "no password is set for the account")
            if not password_matches(password, row.password_hash):
                return SignInCheck(False, "wrong password")
            if not needs_second_factor(account):
                return SignInCheck(True)
            if row.totp_secret is None:
                return SignInCheck(False, "the role needs a second factor and none is enrolled")
            if code is None or not (len(code) == TOTP_DIGITS and code.isdigit()):
                return SignInCheck(False, "the role needs a second factor code")
            now = totp_step(at)
            secret = _secret_bytes(row.totp_secret)
            for step in (now - 1, now, now + 1):
                if hmac.compare_digest(totp_code(secret, step), code):
                    if row.totp_last_step is not None and step <= row.totp_last_step:
                        return SignInCheck(False, "second factor code already used")
                    row.totp_last_step = step
                    return SignInCheck(True)
            return SignInCheck(False, "wrong second factor code")
