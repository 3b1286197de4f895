"""Field encryption of patient data at rest, sans-I/O.

``FieldCipher`` encrypts one column value with AES-256-GCM under a data key (obtained from the key service and
held only while needed). The associated data is the canonical text ``table|column|row_id|key_version``, so a
ciphertext copied to another row, column or table fails to decrypt: nobody with write access to the database can
swap one patient's phone number into another's record unnoticed. The row id must therefore be known before the
value is encrypted (client-generated ids, or insert-then-update in one transaction).

Token (stored as base64url text without padding): ``key_version`` (1 byte, 1-255) | 12-byte random nonce |
ciphertext with its 16-byte tag. The version byte names the data key, so data keys can be replaced over time
while older rows stay readable; KEK rotation does not touch these tokens at all (it rewraps the data keys).

``BlindIndex`` turns a phone number into the keyed HMAC the key service computes (the application never holds the
HMAC key), so a caller can be looked up by number without storing the number in clear.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ground.errors import MedhotlineError

NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32
_IDENTIFIER: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ROW_ID: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class FieldCipherError(MedhotlineError):
    """A field cipher was built or used wrongly (bad key, table or column name)."""


class FieldDecryptError(FieldCipherError):
    """A stored value could not be decrypted. Names where it was stored, never what it holds."""

    def __init__(self, table: str, column: str, row_id: str, reason: str) -> None:
        super().__init__(f"cannot decrypt {table}.{column} of row {row_id}: {reason}")
        self.table = table
        self.column = column
        self.row_id = row_id


def associated_data(table: str, column: str, row_id: str | int, key_version: int) -> bytes:
    """The canonical ``table|column|row_id|key_version`` bound to a ciphertext; refuses ambiguous parts."""
    if not _IDENTIFIER.match(table):
        raise FieldCipherError(f"table name {table!r} must match {_IDENTIFIER.pattern}")
    if not _IDENTIFIER.match(column):
        raise FieldCipherError(f"column name {column!r} must match {_IDENTIFIER.pattern}")
    row = _row_text(row_id)
    if not 1 <= key_version <= 255:
        raise FieldCipherError(f"key version {key_version} must be 1-255")
    return f"{table}|{column}|{row}|{key_version}".encode("ascii")


def _row_text(row_id: str | int) -> str:
    if isinstance(row_id, bool):
        raise FieldCipherError("row id must be a string or an integer")
    row = str(row_id)
    if not _ROW_ID.match(row):
        raise FieldCipherError("row id must be 1-128 characters of [A-Za-z0-9_.:-]")
    return row


def token_key_version(token: str) -> int:
    """The data key version a stored token needs, so the caller can unwrap the right data key."""
    try:
        return _decode_token(token)[0]
    except ValueError as exc:
        raise FieldCipherError(f"malformed field token: {exc}") from None


def _decode_token(token: str) -> bytes:
    if not isinstance(token, str) or not token.isascii():
        raise ValueError("token is not base64url text")
    padded = token + "=" * (-len(token) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, ValueError):
        raise ValueError("token is not base64url text") from None
    if len(raw) < 1 + NONCE_SIZE + TAG_SIZE:
        raise ValueError("token is too short")
    return raw


class FieldCipher:
    """AES-256-GCM for column values under one or more data keys by version; encrypts with ``current``.

    The keys are the plain data keys; the caller obtains them from the key service for the duration of its work
    and drops (wipes) them afterwards: this object keeps only the ``AESGCM`` instances built from them.
    """

    def __init__(self, keys: Mapping[int, bytes | bytearray], current: int) -> None:
        if current not in keys:
            raise FieldCipherError(f"current key version {current} is not among the keys given")
        self._ciphers: dict[int, AESGCM] = {}
        for version, key in keys.items():
            if not 1 <= version <= 255:
                raise FieldCipherError(f"key version {version} must be 1-255")
            if len(key) != KEY_SIZE:
                raise FieldCipherError(f"data key version {version} must be {KEY_SIZE} bytes, got {len(key)}")
            self._ciphers[version] = AESGCM(bytes(key))
        self._current = current

    @classmethod
    def single(cls, key: bytes | bytearray, version: int = 1) -> FieldCipher:
        return cls({version: key}, version)

    def __repr__(self) -> str:
        return f"FieldCipher(versions={sorted(self._ciphers)}, current={self._current})"

    def encrypt_bytes(self, value: bytes, *, table: str, column: str, row_id: str | int) -> str:
        aad = associated_data(table, column, row_id, self._current)
        nonce = secrets.token_bytes(NONCE_SIZE)
        ciphertext = self._ciphers[self._current].encrypt(nonce, value, aad)
        token = bytes([self._current]) + nonce + ciphertext
        return base64.urlsafe_b64encode(token).decode("ascii").rstrip("=")

    def encrypt(self, value: str, *, table: str, column: str, row_id: str | int) -> str:
        """The token to store for ``value`` in ``table.column`` of row ``row_id``."""
        return self.encrypt_bytes(value.encode("utf-8"), table=table, column=column, row_id=row_id)

    def decrypt_bytes(self, token: str, *, table: str, column: str, row_id: str | int) -> bytes:
        row = _row_text(row_id)
        try:
            raw = _decode_token(token)
        except ValueError as exc:
            raise FieldDecryptError(table, column, row, str(exc)) from None
        version = raw[0]
        cipher = self._ciphers.get(version)
        if cipher is None:
            raise FieldDecryptError(table, column, row, f"data key version {version} is not loaded")
        aad = associated_data(table, column, row, version)
        try:
            return cipher.decrypt(raw[1 : 1 + NONCE_SIZE], raw[1 + NONCE_SIZE :], aad)
        except InvalidTag:
            raise FieldDecryptError(
                table, column, row, "authentication failed (wrong key, altered, or moved from another row/column)"
            ) from None

    def decrypt(self, token: str, *, table: str, column: str, row_id: str | int) -> str:
        plain = self.decrypt_bytes(token, table=table, column=column, row_id=row_id)
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            raise FieldDecryptError(table, column, _row_text(row_id), "plaintext is not UTF-8") from None


class BlindIndexer(Protocol):
    """The port the key service client satisfies: HMAC of a value under the key service's blind-index key."""

    async def blind_index(self, value: str, purpose: str) -> str: ...


_PHONE_SEPARATORS: Final = re.compile(r"[\s\-().]")
_PHONE: Final = re.compile(r"^\+?[0-9]{3,20}$")


def normalise_phone(value: str) -> str:
    """Digits only, so ``138-0013-8000``, ``+86 138 0013 8000`` and ``008613800138000`` index alike.

    The Chinese country code (``+86``/``0086``) is dropped; other international numbers keep theirs as ``00..``.
    """
    compact = _PHONE_SEPARATORS.sub("", value)
    if not _PHONE.match(compact):
        raise FieldCipherError("phone number must be 3-20 digits, optionally with a leading + and separators")
    if compact.startswith("+"):
        compact = "00" + compact[1:]
    if compact.startswith("0086") and len(compact) > 6:
        compact = compact[4:]
    return compact


class BlindIndex:
    """Blind index of one kind of value (``purpose``), computed by the key service after normalisation."""

    def __init__(self, indexer: BlindIndexer, purpose: str, normalise: Callable[[str], str] = normalise_phone) -> None:
        self._indexer = indexer
        self._purpose = purpose
        self._normalise = normalise

    @property
    def purpose(self) -> str:
        return self._purpose

    def normalise(self, value: str) -> str:
        return self._normalise(value)

    async def index(self, value: str) -> str:
        """The hex index to store beside the encrypted value and to look it up by."""
        return await self._indexer.blind_index(self._normalise(value), self._purpose)
