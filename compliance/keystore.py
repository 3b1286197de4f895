"""The key service's core: versioned key-encryption keys (KEKs) and the blind-index key, in their own directory.

Only the key-service process opens this store. It wraps and unwraps data keys (DEKs) and computes blind indexes;
no method returns a KEK or the blind-index key, so neither ever has to leave this process.

Layout of the directory (mode 0700, owned by the service's user)::

    kek-v1.key, kek-v2.key, ...   32 random bytes each, mode 0600
    blind-index.key               32 random bytes, mode 0600 (HMAC-SHA256 key)
    current                       the KEK version new data keys are wrapped under ("2\\n"), mode 0600
    records-signing.key           Ed25519 private key (raw 32 bytes) signing call records, mode 0600
    tsa/                          the local RFC 3161 timestamp authority's key and certificate

A file or directory that the group or others can access makes ``open`` refuse with an error naming the path and
its mode: a key readable by another account is a key that has leaked, and starting anyway would hide that.

Wrapped data key (65 bytes): format byte ``1`` | KEK version (uint32 big-endian) | 12-byte nonce |
AES-256-GCM(KEK, DEK) with the associated data ``b"medhotline-dek|" + purpose``, so a data key wrapped for
one purpose (``patient.phone``) can't be unwrapped as another's. Rotation adds a version and moves ``current``;
old versions stay to unwrap (decrypt-only) until every wrapped key has been rewrapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from compliance.timestamps import LocalTimestampAuthority
from ground.errors import MedhotlineError

if TYPE_CHECKING:
    from compliance.timestamps import LocalTimestampAuthority

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
WRAP_FORMAT: Final = 1
_WRAP_HEADER: Final = struct.Struct(">BI")
WRAPPED_SIZE: Final = _WRAP_HEADER.size + NONCE_SIZE + KEY_SIZE + 16
CURRENT_FILE: Final = "current"
BLIND_INDEX_FILE: Final = "blind-index.key"
_KEK_FILE: Final = re.compile(r"^kek-v([1-9][0-9]{0,8})\.key$")
_PURPOSE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_DEK_AAD_PREFIX: Final = b"medhotline-dek|"
_BLIND_INDEX_PREFIX: Final = b"medhotline-blind-index|"
RECORDS_SIGNING_FILE: Final = "records-signing.key"
TSA_DIRECTORY: Final = "tsa"
_SIGN_PREFIX: Final = b"medhotline-sign|"


class KeyStoreError(MedhotlineError):
    """The key store can't be opened or can't do what was asked."""


class KeyStorePermissionError(KeyStoreError):
    """A key file or the key directory is accessible to the group or others, or owned by another user."""


class UnwrapError(KeyStoreError):
    """A wrapped data key is malformed, names an unknown KEK version, or was wrapped for another purpose."""


@dataclass(frozen=True)
class KeyStoreStatus:
    versions: tuple[int, ...]
    current: int


def kek_filename(version: int) -> str:
    return f"kek-v{version}.key"


def check_purpose(purpose: str) -> bytes:
    """A purpose names what a data key protects (``patient.phone``); it is bound into the wrap."""
    if not isinstance(purpose, str) or not _PURPOSE.match(purpose):
        raise KeyStoreError("purpose must be 1-128 characters of [A-Za-z0-9_.:-]")
    return purpose.encode("ascii")


def check_private(path: Path, *, directory: bool) -> None:
    """Refuse a path the group or others can access, that another user owns, or that is a symlink."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise KeyStoreError(f"{path} does not exist") from None
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        expected = "a directory" if directory else "a regular file"
        raise KeyStorePermissionError(f"{path} must be {expected} (symlinks are refused)")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        wanted = "0700" if directory else "0600"
        raise KeyStorePermissionError(
            f"{path} has mode {mode:04o}: it is accessible to group or others; it must be {wanted}"
        )
    if info.st_uid != os.geteuid():
        raise KeyStorePermissionError(f"{path} is owned by uid {info.st_uid}, not by this process (uid {os.geteuid()})")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(directory: Path, name: str, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``directory/name`` mode 0600 atomically: temp file, fsync, rename (or link), fsync dir.

    ``replace=False`` refuses to overwrite (a KEK file is never replaced: that would lose every key wrapped
    under it).
    """
    temp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp, directory / name)
        else:
            try:
                os.link(temp, directory / name)
            except FileExistsError:
                raise KeyStoreError(f"{directory / name} already exists; refusing to overwrite a key") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    _fsync_directory(directory)


def _read_key(path: Path) -> bytes:
    check_private(path, directory=False)
    data = path.read_bytes()
    if len(data) != KEY_SIZE:
        raise KeyStoreError(f"{path} holds {len(data)} bytes; a key file must hold exactly {KEY_SIZE}")
    return data


class KeyStore:
    """KEKs and the blind-index key of one key directory, loaded into this (the key service's) process."""

    def __init__(self, directory: Path, keks: dict[int, bytes], current: int, blind_index_key: bytes) -> None:
        self._directory = directory
        self._keks = dict(keks)
        self._current = current
        self._blind_index_key = blind_index_key
        self._signing_key: Ed25519PrivateKey | None = None
        self._tsa: LocalTimestampAuthority | None = None

    def __repr__(self) -> str:  # never show key material, even by accident in a traceback
        return f"KeyStore(directory={str(self._directory)!r}, versions={sorted(self._keks)}, current={self._current})"

    @property
    def directory(self) -> Path:
        return self._directory

    @classmethod
    def create(cls, directory: Path) -> KeyStore:
        """Initialise a new key directory: KEK version 1, a blind-index key and the ``current`` pointer.

        The directory may exist only if it is empty, so this can never replace the keys of a live store.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if any(directory.iterdir()):
            raise KeyStoreError(f"{directory} is not empty; refusing to initialise a key store over existing files")
        check_private(directory, directory=True)
        _write_private(directory, BLIND_INDEX_FILE, secrets.token_bytes(KEY_SIZE), replace=False)
        _write_private(directory, kek_filename(1), secrets.token_bytes(KEY_SIZE), replace=False)
        _write_private(directory, CURRENT_FILE, b"1\n", replace=True)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: Path) -> KeyStore:
        """Load an existing key directory, refusing it if any part of it is not private to this user."""
        check_private(directory, directory=True)
        keks: dict[int, bytes] = {}
        for entry in sorted(directory.iterdir()):
            match = _KEK_FILE.match(entry.name)
            if match:
                keks[int(match.group(1))] = _read_key(entry)
        if not keks:
            raise KeyStoreError(f"{directory} holds no kek-v<N>.key file; initialise it first")
        blind_index_key = _read_key(directory / BLIND_INDEX_FILE)
        current_path = directory / CURRENT_FILE
        check_private(current_path, directory=False)
        text = current_path.read_text(encoding="ascii", errors="replace").strip()
        if not text.isdigit() or int(text) not in keks:
            raise KeyStoreError(f"{current_path} must name an existing KEK version {sorted(keks)}, holds {text[:20]!r}")
        return cls(directory, keks, int(text), blind_index_key)

    @classmethod
    def open_or_create(cls, directory: Path) -> KeyStore:
        """Open the store, initialising it first if the directory is missing or empty."""
        if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
            return cls.create(directory)
        return cls.open(directory)

    # --- operations -------------------------------------------------------------------------------------------

    def generate_data_key(self, purpose: str) -> tuple[bytes, bytes]:
        """A fresh 256-bit data key: ``(plain, wrapped under the current KEK)``."""
        dek = secrets.token_bytes(KEY_SIZE)
        return dek, self._wrap(dek, purpose)

    def unwrap(self, wrapped: bytes, purpose: str) -> bytes:
        """The plain data key of ``wrapped``, under whichever KEK version wrapped it."""
        aad = _DEK_AAD_PREFIX + check_purpose(purpose)
        version, nonce, ciphertext = parse_wrapped(wrapped)
        kek = self._keks.get(version)
        if kek is None:
            raise UnwrapError(f"wrapped key names KEK version {version}, which this key store does not hold")
        try:
            return AESGCM(kek).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise UnwrapError("wrapped key failed authentication (wrong purpose, or altered)") from None

    def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        """``wrapped`` re-wrapped under the current KEK; the data key (hence the data) is unchanged."""
        return self._wrap(self.unwrap(wrapped, purpose), purpose)

    def rotate(self) -> int:
        """Add a KEK version and make it current; returns it. Older versions remain for unwrapping only."""
        version = max(self._keks) + 1
        kek = secrets.token_bytes(KEY_SIZE)
        _write_private(self._directory, kek_filename(version), kek, replace=False)
        _write_private(self._directory, CURRENT_FILE, f"{version}\n".encode("ascii"), replace=True)
        self._keks[version] = kek
        self._current = version
        return version

    def status(self) -> KeyStoreStatus:
        return KeyStoreStatus(versions=tuple(sorted(self._keks)), current=self._current)

    def blind_index(self, value: str, purpose: str) -> str:
        """Keyed HMAC-SHA256 of ``value`` as hex, with a per-purpose key so two columns' indexes don't correlate.

        The caller normalises ``value`` first (a phone number as digits only): equal values index equal.
        """
        purpose_bytes = check_purpose(purpose)
        subkey = hmac.new(self._blind_index_key, _BLIND_INDEX_PREFIX + purpose_bytes, hashlib.sha256).digest()
        return hmac.new(subkey, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def sign(self, message: bytes, purpose: str) -> bytes:
        """Ed25519 signature of ``message`` for ``purpose`` (see :func:`signed_message`).

        The key is created on first use, so key directories made before signed records existed gain one.
        """
        return self._records_signing_key().sign(signed_message(message, purpose))

    def signing_public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key that verifies :meth:`sign`."""
        return self._records_signing_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def timestamp_authority(self) -> LocalTimestampAuthority:
        """The local RFC 3161 timestamp authority (key and certificate in ``tsa/``), created on first use."""
        if self._tsa is None:
            self._tsa = LocalTimestampAuthority.load_or_create(self._directory / TSA_DIRECTORY)
        return self._tsa

    def _records_signing_key(self) -> Ed25519PrivateKey:
        if self._signing_key is None:
            path = self._directory / RECORDS_SIGNING_FILE
            if not path.exists():
                _write_private(self._directory, RECORDS_SIGNING_FILE, secrets.token_bytes(KEY_SIZE), replace=False)
            self._signing_key = Ed25519PrivateKey.from_private_bytes(_read_key(path))
        return self._signing_key

    def _wrap(self, dek: bytes, purpose: str) -> bytes:
        aad = _DEK_AAD_PREFIX + check_purpose(purpose)
        nonce = secrets.token_bytes(NONCE_SIZE)
        ciphertext = AESGCM(self._keks[self._current]).encrypt(nonce, bytes(dek), aad)
        return _WRAP_HEADER.pack(WRAP_FORMAT, self._current) + nonce + ciphertext


def signed_message(message: bytes, purpose: str) -> bytes:
    """What the records key actually signs: domain-separated by purpose, so a signature made for one kind of
    document (``call_records``) can never be presented as one for another."""
    return _SIGN_PREFIX + check_purpose(purpose) + b"|" + message


def parse_wrapped(wrapped: bytes) -> tuple[int, bytes, bytes]:
    """Split a wrapped key into ``(kek_version, nonce, ciphertext)``, refusing anything malformed."""
    if len(wrapped) != WRAPPED_SIZE:
        raise UnwrapError(f"wrapped key must be {WRAPPED_SIZE} bytes, got {len(wrapped)}")
    fmt, version = _WRAP_HEADER.unpack_from(wrapped)
    if fmt != WRAP_FORMAT:
        raise UnwrapError(f"wrapped key has unknown format {fmt}")
    nonce = wrapped[_WRAP_HEADER.size : _WRAP_HEADER.size + NONCE_SIZE]
    return int(version), bytes(nonce), bytes(wrapped[_WRAP_HEADER.size + NONCE_SIZE :])


def wrapped_version(wrapped: bytes) -> int:
    """The KEK version a wrapped key is under, e.g. to find keys still to rewrap after a rotation."""
    return parse_wrapped(wrapped)[0]


MIN_TOKEN_LENGTH: Final = 16


def read_token_file(path: Path) -> bytes:
    """The shared client token from a private (0600) file, surrounding whitespace removed.

    Used by both ends: the key service to check clients, a client to present itself. A token file others can
    read is refused like a key file would be.
    """
    check_private(path, directory=False)
    token = path.read_bytes().strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise KeyStoreError(f"{path} holds a token of {len(token)} bytes; at least {MIN_TOKEN_LENGTH} are required")
    return token
