"""Staff sign-in secrets: a password (scrypt) and, for supervisors and auditors, a TOTP second factor (RFC 6238).

GB/T 22239 level 3 asks for two factors where an account can see or change much; here that is the ``supervisor``
and ``auditor`` roles (:data:`SECOND_FACTOR_ROLES`). The password is stored as an scrypt hash with its own salt and
parameters (``hashlib.scrypt``, no new dependency); the TOTP secret is 20 random bytes, RFC 6238 with HMAC-SHA1,
30-second steps and 6 digits, which every authenticator app reads from an ``otpauth://`` URI. A code is accepted
one step either side of now (clock drift) and only once: the last step used is stored, so a code seen over a
shoulder can't be replayed.

The pure parts (:func:`hash_password`, :func:`password_matches`, :func:`totp_code`, :func:`totp_step`) read no
clock and no database; :class:`CredentialStore` keeps the secrets in ``account_credentials`` (migrations
``0018_api_credentials`` and ``0022_totp_sealed``). Nothing here writes a secret to a log or an exception.

The TOTP secret is a secret the server must read back, so it can't be hashed like the password: it is sealed
with AES-256-GCM under a data key of purpose ``totp`` that the key service wraps (:mod:`compliance.totp_vault`
seals and opens it; this module only stores the token and the data key's id). ``totp_secret`` is the clear
column of rows enrolled before sealing: nothing writes it any more, sign-in refuses it, and
``medhotline keys seal-totp`` seals and blanks what is left of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from urllib.parse import quote

from sqlalchemy import CheckConstraint, Engine, ForeignKey, Integer, String, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from compliance.accounts import Account, AccountRecord, Role
from compliance.data_keys import DataKey
from ground.db import DatabaseError, Repository, rowcount
from ground.models import Base, UTCDateTime

__all__ = [
    "SECOND_FACTOR_ROLES",
    "AccountCredentials",
    "ClearTotp",
    "CredentialError",
    "CredentialStore",
    "SignInCheck",
    "StoredSignIn",
    "code_well_formed",
    "hash_password",
    "matching_step",
    "needs_second_factor",
    "new_totp_secret",
    "password_matches",
    "secret_bytes",
    "secret_text",
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
    """One row per account that may sign in to the API: its password hash and sealed TOTP secret (if enrolled)."""

    __tablename__ = "account_credentials"

    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    # Clear base32 secrets of rows enrolled before 0022_totp_sealed; never written now except to blank it.
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    # FieldCipher token (key version | nonce | ciphertext and tag) and the data key (purpose ``totp``) it is under.
    totp_sealed: Mapped[str | None] = mapped_column(String(128))
    totp_data_key_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey(DataKey.id, name="fk_account_credentials_totp_data_key_id_data_keys", ondelete="RESTRICT")
    )
    # The last TOTP step accepted: a code is good once.
    totp_last_step: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (CheckConstraint("(totp_sealed IS NULL) = (totp_data_key_id IS NULL)", name="totp_sealed"),)


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


def secret_bytes(secret_b32: str) -> bytes:
    """The raw secret of a base32 text (padding optional); ValueError if it is not base32."""
    try:
        return base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def new_totp_secret() -> bytes:
    return secrets.token_bytes(TOTP_SECRET_BYTES)


def secret_text(secret: bytes) -> str:
    """The base32 text (no padding) an authenticator app is given."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def matching_step(secret: bytes, code: str, at: datetime) -> int | None:
    """The step (one either side of ``at``'s) whose code is ``code``, compared in constant time; None if none."""
    now = totp_step(at)
    found = None
    for step in (now - 1, now, now + 1):
        if hmac.compare_digest(totp_code(secret, step), code) and found is None:
            found = step
    return found


def code_well_formed(code: str | None) -> bool:
    return code is not None and len(code) == TOTP_DIGITS and code.isdigit()


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

    def material(self, account_id: str) -> StoredSignIn | None:
        """What a sign-in check reads, or None when the account has no password set."""
        with self._transaction(f"reading the sign-in secrets of {account_id}") as session:
            row = session.get(AccountCredentials, account_id)
            if row is None:
                return None
            return StoredSignIn(
                row.account_id, row.password_hash, row.totp_sealed, row.totp_data_key_id, row.totp_secret is not None,
                row.totp_last_step,
            )  # fmt: skip

    def store_sealed_totp(self, account_id: str, token: str, data_key_id: int, at: datetime) -> None:
        """A newly enrolled, sealed TOTP secret replaces any earlier one (sealed or clear); the step count restarts."""
        with self._transaction(f"enrolling a second factor for {account_id}") as session:
            row = session.get(AccountCredentials, account_id)
            if row is None:
                raise CredentialError(f"account {account_id}: set a password before enrolling a second factor")
            row.totp_sealed = token
            row.totp_data_key_id = data_key_id
            row.totp_secret = None
            row.totp_last_step = None
            row.updated_at = at

    def require_password(self, account_id: str) -> None:
        """CredentialError unless the account has a password (checked before a secret is generated and sealed)."""
        if self.material(account_id) is None:
            raise CredentialError(f"account {account_id}: set a password before enrolling a second factor")

    def use_totp_step(self, account_id: str, token: str, step: int) -> bool:
        """Record ``step`` as used, unless it (or a later one) was, or the secret changed since it was read.

        One compare-and-set statement: two sign-ins racing with the same code can't both win, on SQLite or
        PostgreSQL, and no lock is held while the key service opens the secret.
        """
        with self._transaction(f"using a second factor code of {account_id}") as session:
            result = session.execute(
                update(AccountCredentials)
                .where(
                    AccountCredentials.account_id == account_id,
                    AccountCredentials.totp_sealed == token,
                    (AccountCredentials.totp_last_step.is_(None)) | (AccountCredentials.totp_last_step < step),
                )
                .values(totp_last_step=step)
            )
            return rowcount(result) == 1

    def clear_totp(self) -> list[ClearTotp]:
        """The rows still holding a clear TOTP secret (enrolled before sealing)."""
        with self._transaction("listing second factors stored in clear") as session:
            rows = session.execute(
                select(AccountCredentials.account_id, AccountCredentials.totp_secret, AccountCredentials.totp_sealed)
                .where(AccountCredentials.totp_secret.is_not(None))
                .order_by(AccountCredentials.account_id)
            ).all()
            return [ClearTotp(str(a), str(s), sealed is not None) for a, s, sealed in rows]

    def replace_clear_totp(self, account_id: str, clear: str, sealed: tuple[str, int] | None, at: datetime) -> bool:
        """Blank the clear secret ``clear`` and, with ``sealed`` (token, data key id), store its sealed form.

        Compare-and-set on the clear value: a row re-enrolled (or sealed by another run) since it was read is left
        alone. ``sealed`` None blanks a clear value that a later enrolment already superseded.
        """
        values: dict[str, object] = {"totp_secret": None, "updated_at": at}
        if sealed is not None:
            values |= {"totp_sealed": sealed[0], "totp_data_key_id": sealed[1]}
        with self._transaction(f"sealing the second factor of {account_id}") as session:
            sqlite = session.get_bind().dialect.name == "sqlite"
            if sqlite:
                # Zero the freed space of the rewritten row, so the clear value does not stay in the page.
                session.execute(text("PRAGMA secure_delete=ON"))
            query = update(AccountCredentials).where(
                AccountCredentials.account_id == account_id, AccountCredentials.totp_secret == clear
            )
            if sealed is not None:
                query = query.where(AccountCredentials.totp_sealed.is_(None))
            done = rowcount(session.execute(query.values(**values))) == 1
            if sqlite:
                session.execute(text("PRAGMA secure_delete=OFF"))
            return done

    def scrub_free_space(self) -> None:
        """After clear secrets were blanked: get their old row versions out of the live database files.

        SQLite: checkpoint the write-ahead log into the main file and truncate it (the log still holds the pages
        as they were). PostgreSQL: ``VACUUM FULL`` rewrites the (small) table without its dead row versions. Copies
        outside the database (backups, PostgreSQL's archived WAL, the file system's free blocks) are beyond reach:
        docs/security.md says what to do about them.
        """
        bind = self._sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            return
        try:
            with bind.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                if connection.dialect.name == "sqlite":
                    connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
                elif connection.dialect.name == "postgresql":
                    connection.execute(text("VACUUM FULL account_credentials"))
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database at {self._where}: scrubbing blanked second factors failed: {exc}") from None


@dataclass(frozen=True, slots=True)
class StoredSignIn:
    """One account's stored sign-in secrets: the password hash and the sealed second factor, as stored."""

    account_id: str
    password_hash: str = field(repr=False)
    totp_sealed: str | None = field(repr=False)
    totp_data_key_id: int | None
    has_clear_totp: bool
    totp_last_step: int | None


@dataclass(frozen=True, slots=True)
class ClearTotp:
    """A row enrolled before sealing: its clear secret, and whether a later enrolment sealed a newer one."""

    account_id: str
    secret: str = field(repr=False)
    has_sealed: bool
