"""Streaming encryption of call recordings at rest and of their exports, sans database and network.

A finished recording is sealed with its own 32-byte data key (from the key service, held only while needed) in a
chunked AES-256-GCM format in the style of STREAM (Hoang, Reyhanitabar, Rogaway, Vizár: "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance"): a multi-hour file is encrypted and verified
one chunk at a time, so memory stays O(chunk size) however long the call was, and yet truncation, reordering,
duplication and appended data are detected, not just altered bytes.

Layout (integers big-endian)::

    header   magic "MHREC" | version 1 (1 byte) | chunk size (4) | salt (16)             recordings
             magic "MHEXP" | version 1 (1 byte) | chunk size (4) | ephemeral X25519 public key (32)
                           | label length (2) | label (UTF-8)                                exports
    chunks   0x00 | ciphertext of exactly `chunk size` plaintext bytes + 16-byte tag      (not the last)
             0x01 | plaintext length (4) | ciphertext + 16-byte tag                        (the last, once)

Chunk ``i`` is sealed under the nonce ``prefix (7) | i (4) | last (1)``, ``last`` being 1 for the final chunk only,
and with the associated data ``header | context``. So a chunk is only valid at its own position, a non-final chunk
cannot pose as the final one (dropping the tail fails), and a file cannot be passed off as another recording's:
the caller's ``context`` (e.g. ``b"recording:<id>:v<kek>"``) differs. The clear marker byte and the final chunk's
length are authenticated as well (the marker picks the nonce, the length delimits what GCM checks); they are there
so that a reader can tell a file cut at a chunk boundary ("truncated: no final chunk") and bytes appended after the
final chunk ("trailing data after the final chunk") from a changed byte, and name which chunk is at fault.

The AES key and the nonce prefix come from HKDF-SHA256. For recordings: over the data key, with the header's random
16-byte salt, so even a data key wrongly reused for a second file never repeats a (key, nonce) pair. For exports
(re-encryption to the person who asked for a copy): over the X25519 shared secret of a fresh ephemeral key and the
recipient's public key, salt = ephemeral public || recipient public, info = ``b"medhotline export v1" + label``. The
label (who exported, and when) travels in clear in the header and is authenticated by every chunk: it must never
hold a patient identifier.

Reading: ``open_sealed`` / ``open_for_recipient`` yield plaintext chunks as each is verified. Everything yielded is
authentic and in order, but whether the file is complete is only known when the iterator finishes without error;
a consumer must not act on yielded data before then (or only write it to a temporary file that it discards on
error, as ``unseal_file`` does). Abandoning an iterator early: close it (``contextlib.closing``) to close the file.

Writing: every output file is created with ``O_EXCL`` (an existing file is never overwritten), mode 0600, flushed
and fsync'ed before the function returns, and removed if anything fails on the way. The caller writes to a
temporary name and renames it into place (then fsyncs the directory).

``watermark_wav`` is the other way to hand out a copy: it inserts a LIST/INFO comment (who exported it, and when)
into the RIFF/WAVE file while streaming the audio through unchanged.

Key bytes never appear in a repr, a log line or an exception message. Plain data keys are passed as ``bytes`` or
``bytearray`` so the caller can wipe its ``bytearray``; the keys derived here are short-lived ``bytes`` objects that
Python cannot wipe, which is the same trade-off ``compliance.fields`` makes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import struct
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ground.errors import MedhotlineError

RECORDING_MAGIC: Final = b"MHREC"
EXPORT_MAGIC: Final = b"MHEXP"
FORMAT_VERSION: Final = 1
CHUNK_SIZE: Final = 64 * 1024
# A forged header must not make a reader allocate gigabytes for one chunk.
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
SALT_SIZE: Final = 16
NONCE_PREFIX_SIZE: Final = 7
MAX_CHUNKS: Final = 2**32  # the counter is 32 bits: 256 TiB at the default chunk size
MAX_LABEL_BYTES: Final = 1024
MAX_WATERMARK_BYTES: Final = 4096
# Only the chunks before the audio are buffered; a real recording has ~40 bytes of them.
MAX_WAV_HEADER_BYTES: Final = 1024 * 1024

_NOT_LAST: Final = 0x00
_LAST: Final = 0x01
_COMMON_HEADER: Final = struct.Struct(">5sBI")  # magic, version, chunk size
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_RECORDING_INFO: Final = b"medhotline recording v1"
_EXPORT_INFO: Final = b"medhotline export v1"
_READ_SIZE: Final = 1024 * 1024
_KEY_HINT: Final = "wrong key or context, or altered data"
_IDENTITY_HINT: Final = "wrong identity, or altered data"


class EnvelopeError(MedhotlineError):
    """A sealed file could not be written or read. Names the file (or "stream"), the chunk and the reason.

    ``chunk`` is the index of the chunk at fault (``None`` for the header or errors not tied to a chunk) and
    ``reason`` the short reason, for callers that tell a tampered file from a missing one.
    """

    def __init__(self, message: str, *, chunk: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.reason = reason


def _at_chunk(where: str, chunk: int, reason: str) -> EnvelopeError:
    return EnvelopeError(f"{where}: chunk {chunk}: {reason}", chunk=chunk, reason=reason)


def _at_header(where: str, reason: str) -> EnvelopeError:
    return EnvelopeError(f"{where}: header: {reason}", reason=reason)


@dataclass(frozen=True)
class SealedFile:
    """What was written: hex SHA-256 and size of the plaintext and of the ciphertext file (header included)."""

    plain_sha256: str
    cipher_sha256: str
    plain_size: int
    cipher_size: int


# --- keys and headers --------------------------------------------------------------------------------------------


def _check_key(key: bytes | bytearray) -> None:
    if not isinstance(key, bytes | bytearray):
        raise EnvelopeError(f"a data key must be bytes or bytearray, not {type(key).__name__}")
    if len(key) != KEY_SIZE:
        raise EnvelopeError(f"a data key must be {KEY_SIZE} bytes, not {len(key)}")


def _check_context(context: bytes) -> bytes:
    # Without a context nothing ties a file to its recording: another recording's file under the same key (or a
    # key mix-up) would open as this one.
    if not isinstance(context, bytes | bytearray) or not context:
        raise EnvelopeError("a context (e.g. b'recording:<id>:v<kek>') is required, as non-empty bytes")
    return bytes(context)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(f"chunk size must be an integer from 1 to {MAX_CHUNK_SIZE}, not {chunk_size!r}")


@dataclass(frozen=True)
class _StreamKey:
    """The AES instance and nonce prefix of one file. Holds no raw key bytes, so its repr cannot leak them."""

    aead: AESGCM
    prefix: bytes

    def nonce(self, index: int, last: bool) -> bytes:
        return self.prefix + _U32.pack(index) + (b"\x01" if last else b"\x00")


def _derive(ikm: bytes | bytearray, salt: bytes, info: bytes) -> _StreamKey:
    # The first 32 bytes of HKDF's output are the AES-256 key whatever the length asked for; the 7 after them are
    # the nonce prefix.
    material = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE + NONCE_PREFIX_SIZE, salt=salt, info=info).derive(
        bytes(ikm)
    )
    return _StreamKey(AESGCM(material[:KEY_SIZE]), material[KEY_SIZE:])


def _recording_header(chunk_size: int, salt: bytes) -> bytes:
    return _COMMON_HEADER.pack(RECORDING_MAGIC, FORMAT_VERSION, chunk_size) + salt


def _export_header(chunk_size: int, ephemeral: bytes, label: bytes) -> bytes:
    return _COMMON_HEADER.pack(EXPORT_MAGIC, FORMAT_VERSION, chunk_size) + ephemeral + _U16.pack(len(label)) + label


def _check_label(label: str) -> bytes:
    if not isinstance(label, str) or not label or not label.isprintable():
        raise EnvelopeError("an export label must be non-empty printable text")
    raw = label.encode("utf-8")
    if len(raw) > MAX_LABEL_BYTES:
        raise EnvelopeError(f"an export label must be at most {MAX_LABEL_BYTES} bytes of UTF-8, not {len(raw)}")
    return raw


# --- output files ---------------------------------------------------------------------------------------------


class _Output:
    """An output file opened by ``_exclusive_output``: counts and hashes what is written, maps write errors."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self._handle = handle
        self.path = path
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._handle.write(data)
        except OSError as exc:
            raise EnvelopeError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        self._digest.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    @property
    def handle(self) -> BinaryIO:
        return self._handle


@contextlib.contextmanager
def _exclusive_output(path: Path, mode: int = 0o600) -> Iterator[_Output]:
    """A new file at ``path`` (never an existing one), fsync'ed on success and removed on any failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise EnvelopeError(f"{path}: already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise EnvelopeError(f"{path}: cannot create: {exc.strerror or exc}") from None
    # From here the file is ours: whatever goes wrong, it is removed (BaseException too: a KeyboardInterrupt
    # half-way must not leave half a recording that looks like a finished one).
    try:
        with os.fdopen(fd, "wb") as handle:
            output = _Output(handle, path)
            yield output
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                raise EnvelopeError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


def _open_input(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise EnvelopeError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read(handle: BinaryIO, size: int, path: Path) -> bytes:
    try:
        return handle.read(size)
    except OSError as exc:
        raise EnvelopeError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _file_pieces(handle: BinaryIO, path: Path, size: int) -> Iterator[bytes]:
    while piece := _read(handle, size, path):
        yield piece


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with _open_input(path) as handle:
        for piece in _file_pieces(handle, path, _READ_SIZE):
            digest.update(piece)
    return digest.hexdigest()


# --- sealing ------------------------------------------------------------------------------------------------------


def _seal_into(
    output: _Output, chunks: Iterable[bytes], *, header: bytes, key: _StreamKey, context: bytes, chunk_size: int
) -> SealedFile:
    associated = header + context
    plain_digest = hashlib.sha256()
    plain_size = 0
    index = 0
    output.write(header)

    def emit(data: bytearray, last: bool) -> None:
        nonlocal index
        if index >= MAX_CHUNKS:
            raise EnvelopeError(f"{output.path}: too large: more than {MAX_CHUNKS} chunks of {chunk_size} bytes")
        sealed = key.aead.encrypt(key.nonce(index, last), data, associated)
        output.write(bytes([_LAST]) + _U32.pack(len(data)) if last else b"\x00")
        output.write(sealed)
        index += 1

    # One full chunk is held back until more data arrives: only then is it known not to be the last.
    pending = bytearray()
    for piece in chunks:
        view = memoryview(piece).cast("B")
        plain_digest.update(view)
        plain_size += len(view)
        position = 0
        while position < len(view):
            if len(pending) == chunk_size:
                emit(pending, last=False)
                pending.clear()
            take = min(chunk_size - len(pending), len(view) - position)
            pending += view[position : position + take]
            position += take
    emit(pending, last=True)
    return SealedFile(plain_digest.hexdigest(), output.hexdigest(), plain_size, output.size)


def seal_chunks(
    chunks: Iterable[bytes],
    dst: Path,
    key: bytes | bytearray,
    *,
    context: bytes,
    chunk_size: int = CHUNK_SIZE,
) -> SealedFile:
    """Encrypt the concatenation of ``chunks`` (pieces of any size) into the new file ``dst`` under ``key``.

    ``context`` names what the file is (``b"recording:<id>:v<kek>"``) and must be given again to open it. ``dst``
    must not exist; it is fsync'ed before this returns and removed if anything fails (an exception raised by
    ``chunks`` propagates unchanged after the removal).
    """
    _check_key(key)
    _check_chunk_size(chunk_size)
    context = _check_context(context)
    salt = secrets.token_bytes(SALT_SIZE)
    stream_key = _derive(key, salt, _RECORDING_INFO)
    with _exclusive_output(dst) as output:
        header = _recording_header(chunk_size, salt)
        return _seal_into(output, chunks, header=header, key=stream_key, context=context, chunk_size=chunk_size)


def seal_file(
    src: Path,
    dst: Path,
    key: bytes | bytearray,
    *,
    context: bytes,
    chunk_size: int = CHUNK_SIZE,
) -> SealedFile:
    """Encrypt the file ``src`` into the new file ``dst``, reading ``chunk_size`` bytes at a time.

    The caller gives ``dst`` a temporary name and renames it into place once this returns.
    """
    _check_key(key)
    _check_chunk_size(chunk_size)
    # src is opened first: a missing recording must not even create dst.
    with _open_input(src) as handle:
        return seal_chunks(_file_pieces(handle, src, chunk_size), dst, key, context=context, chunk_size=chunk_size)


# --- opening ------------------------------------------------------------------------------------------------------


@dataclass
class _ReadStats:
    cipher_size: int = 0
    cipher_sha256: str = ""


class _Source:
    """The sealed file being read: exact reads, with the ciphertext hashed and counted as it goes."""

    def __init__(self, handle: BinaryIO, path: Path, *, hashed: bool = False) -> None:
        self._handle = handle
        self._path = path
        # Only unseal_file reports the ciphertext digest; a plain read would pay a SHA-256 pass for nothing.
        self._digest = hashlib.sha256() if hashed else None
        self.size = 0

    def read(self, size: int) -> bytes:
        data = _read(self._handle, size, self._path)
        if self._digest is not None:
            self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        assert self._digest is not None, "the source was opened without hashing"
        return self._digest.hexdigest()


def _read_header(source: _Source, where: str, expected: bytes) -> tuple[bytes, int]:
    """The common header (magic, version, chunk size): its bytes and the chunk size."""
    raw = source.read(_COMMON_HEADER.size)
    magic = raw[: len(expected)]
    if magic not in (RECORDING_MAGIC, EXPORT_MAGIC):
        raise _at_header(where, "not a medhotline envelope")
    if magic != expected:
        if magic == EXPORT_MAGIC:
            raise _at_header(where, "not a medhotline envelope: this is an export, open it with open_for_recipient")
        raise _at_header(where, "not a medhotline envelope: this is a stored recording, open it with open_sealed")
    if len(raw) < _COMMON_HEADER.size:
        raise _at_header(where, "truncated header")
    _, version, chunk_size = _COMMON_HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise _at_header(where, f"unsupported format version {version}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise _at_header(where, f"chunk size {chunk_size} out of range 1-{MAX_CHUNK_SIZE}")
    return raw, chunk_size


def _read_exact(source: _Source, size: int, where: str, reason: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise _at_header(where, reason)
    return data


def _open_chunks(
    source: _Source, where: str, *, header: bytes, chunk_size: int, key: _StreamKey, context: bytes, hint: str
) -> Iterator[bytes]:
    associated = header + context
    index = 0
    while True:
        marker = source.read(1)
        if not marker:
            raise _at_chunk(where, index, "truncated: no final chunk")
        if marker[0] == _NOT_LAST:
            length = chunk_size
        elif marker[0] == _LAST:
            raw_length = source.read(_U32.size)
            if len(raw_length) != _U32.size:
                raise _at_chunk(where, index, "truncated: chunk cut short (or its framing altered)")
            (length,) = _U32.unpack(raw_length)
            if length > chunk_size:
                raise _at_chunk(where, index, f"authentication failed (final chunk length {length} > chunk size)")
        else:
            raise _at_chunk(where, index, f"authentication failed (invalid chunk marker 0x{marker[0]:02x})")
        last = marker[0] == _LAST
        sealed = source.read(length + TAG_SIZE)
        if len(sealed) != length + TAG_SIZE:
            # Also what a final chunk whose marker was flipped to "not last" looks like: say both.
            raise _at_chunk(where, index, "truncated: chunk cut short (or its framing altered)")
        try:
            plain = key.aead.decrypt(key.nonce(index, last), sealed, associated)
        except InvalidTag:
            reason = f"authentication failed ({hint})" if index == 0 else "authentication failed"
            raise _at_chunk(where, index, reason) from None
        if last:
            # Checked before the final chunk is yielded: the last yield means the whole file was verified.
            if source.read(1):
                raise _at_chunk(where, index + 1, "trailing data after the final chunk")
            yield plain
            return
        yield plain
        index += 1
        if index >= MAX_CHUNKS:
            raise _at_chunk(where, index, "truncated: no final chunk")


def _open_recording(
    src: Path, key: bytes | bytearray, context: bytes, stats: _ReadStats | None
) -> Generator[bytes, None, None]:
    where = str(src)
    with _open_input(src) as handle:
        source = _Source(handle, src, hashed=stats is not None)
        common, chunk_size = _read_header(source, where, RECORDING_MAGIC)
        salt = _read_exact(source, SALT_SIZE, where, "truncated header")
        stream_key = _derive(key, salt, _RECORDING_INFO)
        yield from _open_chunks(
            source, where, header=common + salt, chunk_size=chunk_size, key=stream_key, context=context, hint=_KEY_HINT
        )
        if stats is not None:
            stats.cipher_size, stats.cipher_sha256 = source.size, source.hexdigest()


def open_sealed(src: Path, key: bytes | bytearray, *, context: bytes) -> Iterator[bytes]:
    """The verified plaintext of the sealed file ``src``, chunk by chunk; ``EnvelopeError`` at the first bad chunk.

    Do not act on the data before the iterator has finished without error: a file cut short or with data appended
    is only detected at its end. Write the pieces to a temporary file and discard it on error (``unseal_file``).
    """
    _check_key(key)
    return _open_recording(src, key, _check_context(context), None)


def _unseal_into(dst: Path, pieces: Generator[bytes, None, None], stats: _ReadStats) -> SealedFile:
    plain_digest = hashlib.sha256()
    with _exclusive_output(dst) as output, contextlib.closing(pieces):
        for piece in pieces:
            output.write(piece)
            plain_digest.update(piece)
    return SealedFile(plain_digest.hexdigest(), stats.cipher_sha256, output.size, stats.cipher_size)


def unseal_file(src: Path, dst: Path, key: bytes | bytearray, *, context: bytes) -> SealedFile:
    """Decrypt ``src`` into the new file ``dst`` (0600, fsync'ed); ``dst`` is removed if ``src`` fails to verify.

    Returns the digests: ``plain_*`` of what was written, ``cipher_*`` of ``src``.
    """
    _check_key(key)
    stats = _ReadStats()
    return _unseal_into(dst, _open_recording(src, key, _check_context(context), stats), stats)


# --- exports re-encrypted to the requester -------------------------------------------------------------------


def seal_for_recipient(
    chunks: Iterable[bytes],
    dst: Path,
    recipient: X25519PublicKey,
    *,
    label: str,
    chunk_size: int = CHUNK_SIZE,
) -> SealedFile:
    """Encrypt ``chunks`` into the new file ``dst`` so that only the holder of ``recipient``'s private key reads it.

    ``label`` (who exported it and when, never a patient identifier) is stored in clear and authenticated.
    """
    if not isinstance(recipient, X25519PublicKey):
        raise EnvelopeError(f"the recipient must be an X25519 public key, not {type(recipient).__name__}")
    raw_label = _check_label(label)
    _check_chunk_size(chunk_size)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    recipient_public = recipient.public_bytes_raw()
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:
        raise EnvelopeError("the recipient's public key is not usable (a low-order point)") from None
    stream_key = _derive(shared, ephemeral_public + recipient_public, _EXPORT_INFO + raw_label)
    header = _export_header(chunk_size, ephemeral_public, raw_label)
    with _exclusive_output(dst) as output:
        return _seal_into(output, chunks, header=header, key=stream_key, context=b"", chunk_size=chunk_size)


def _open_export(src: Path, identity: X25519PrivateKey) -> Iterator[bytes]:
    where = str(src)
    with _open_input(src) as handle:
        source = _Source(handle, src)
        common, chunk_size = _read_header(source, where, EXPORT_MAGIC)
        ephemeral_public = _read_exact(source, 32, where, "truncated header")
        raw_length = _read_exact(source, _U16.size, where, "truncated header")
        (label_length,) = _U16.unpack(raw_length)
        if label_length > MAX_LABEL_BYTES:
            raise _at_header(where, f"label length {label_length} out of range 0-{MAX_LABEL_BYTES}")
        raw_label = _read_exact(source, label_length, where, "truncated header")
        try:
            shared = identity.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        except ValueError:
            # An all-zero shared secret: the ephemeral key was replaced by a low-order point.
            raise _at_chunk(where, 0, f"authentication failed ({_IDENTITY_HINT})") from None
        recipient_public = identity.public_key().public_bytes_raw()
        stream_key = _derive(shared, ephemeral_public + recipient_public, _EXPORT_INFO + raw_label)
        header = common + ephemeral_public + raw_length + raw_label
        yield from _open_chunks(
            source, where, header=header, chunk_size=chunk_size, key=stream_key, context=b"", hint=_IDENTITY_HINT
        )


def open_for_recipient(src: Path, identity: X25519PrivateKey) -> Iterator[bytes]:
    """The verified plaintext of the export ``src``, chunk by chunk; the same rules as ``open_sealed``."""
    if not isinstance(identity, X25519PrivateKey):
        raise EnvelopeError(f"the identity must be an X25519 private key, not {type(identity).__name__}")
    return _open_export(src, identity)


def export_label(src: Path) -> str:
    """The label in an export's header, e.g. to show who made it. Not verified until the file is opened."""
    where = str(src)
    with _open_input(src) as handle:
        source = _Source(handle, src)
        _read_header(source, where, EXPORT_MAGIC)
        _read_exact(source, 32, where, "truncated header")
        (label_length,) = _U16.unpack(_read_exact(source, _U16.size, where, "truncated header"))
        raw_label = _read_exact(source, label_length, where, "truncated header")
    try:
        return raw_label.decode("utf-8")
    except UnicodeDecodeError:
        raise _at_header(where, "label is not UTF-8") from None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EnvelopeError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def load_recipient_public_key(path: Path) -> X25519PublicKey:
    """The X25519 public key in the PEM file ``path`` (SubjectPublicKeyInfo), as ``generate_identity`` writes it."""
    data = _read_pem(path, "recipient's public key")
    if b"PRIVATE KEY-----" in data:
        raise EnvelopeError(f"{path}: holds a private key; give the recipient's public key file instead")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise EnvelopeError(f"{path}: not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise EnvelopeError(f"{path}: not an X25519 public key (it is {type(key).__name__.lstrip('_')})")
    return key


def load_identity(path: Path) -> X25519PrivateKey:
    """The X25519 private key in the PEM file ``path`` (unencrypted PKCS#8), which must not be readable by others."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise EnvelopeError(f"{path}: cannot read the identity: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # As ssh does: a private key others can read may already be someone else's too.
        raise EnvelopeError(f"{path}: identity is accessible to others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    data = _read_pem(path, "identity")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EnvelopeError(f"{path}: identity is password-protected; only unencrypted PKCS#8 is supported") from None
    except ValueError:
        raise EnvelopeError(f"{path}: not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise EnvelopeError(f"{path}: not an X25519 private key (it is {type(key).__name__.lstrip('_')})")
    return key


def generate_identity(path_private: Path, path_public: Path) -> None:
    """A new X25519 key pair: the private key as PKCS#8 PEM (0600), the public one as SubjectPublicKeyInfo PEM.

    Neither file may exist already; if the public key cannot be written, the private one is removed again.
    """
    for path in (path_private, path_public):
        if path.exists() or path.is_symlink():
            raise EnvelopeError(f"{path}: already exists; refusing to overwrite it")
    identity = X25519PrivateKey.generate()
    private_pem = identity.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = identity.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with _exclusive_output(path_private) as output:
        output.write(private_pem)
    try:
        # Public: whoever exports to this person needs to read it.
        with _exclusive_output(path_public, 0o644) as output:
            output.write(public_pem)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path_private.unlink()
        raise


# --- watermarking ---------------------------------------------------------------------------------------------


class _PieceReader:
    """Byte-exact reads over an iterator of pieces of any size, buffering no more than one piece."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = iter(pieces)
        self._current = memoryview(b"")

    def _fill(self) -> bool:
        while not self._current:
            try:
                self._current = memoryview(next(self._pieces)).cast("B")
            except StopIteration:
                return False
        return True

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the stream."""
        out = bytearray()
        while len(out) < size and self._fill():
            take = self._current[: size - len(out)]
            out += take
            self._current = self._current[len(take) :]
        return bytes(out)

    def copy(self, size: int, write: Callable[[memoryview], None]) -> int:
        """Pass up to ``size`` bytes to ``write`` piece by piece; how many there were."""
        left = size
        while left and self._fill():
            take = self._current[:left]
            write(take)
            self._current = self._current[len(take) :]
            left -= len(take)
        return size - left


_RIFF_CHUNK: Final = struct.Struct("<4sI")


def _info_comment_chunk(text: str) -> bytes:
    if not isinstance(text, str) or not text or "\x00" in text:
        raise EnvelopeError("a watermark must be non-empty text without NUL characters")
    value = text.encode("utf-8") + b"\x00"  # INFO values are NUL-terminated strings
    if len(value) > MAX_WATERMARK_BYTES:
        raise EnvelopeError(
            f"a watermark must be at most {MAX_WATERMARK_BYTES - 1} bytes of UTF-8, not {len(value) - 1}"
        )
    comment = _RIFF_CHUNK.pack(b"ICMT", len(value)) + value + b"\x00" * (len(value) % 2)
    body = b"INFO" + comment
    return _RIFF_CHUNK.pack(b"LIST", len(body)) + body


def watermark_wav(chunks: Iterable[bytes], dst: Path, text: str) -> str:
    """Copy the RIFF/WAVE file given as ``chunks`` to the new file ``dst`` with ``text`` as its ICMT comment.

    The comment goes in a LIST/INFO chunk just before the data chunk; every other chunk and every audio sample is
    copied unchanged and the RIFF size is fixed up. Only the chunks before the audio are buffered. ``text`` (who
    exported, when) must never hold a patient identifier. Returns the hex SHA-256 of ``dst``.
    """
    comment = _info_comment_chunk(text)
    reader = _PieceReader(chunks)
    before_data, data_header = _read_wav_head(reader, "stream")
    with _exclusive_output(dst) as output:
        output.write(b"RIFF\x00\x00\x00\x00WAVE")  # the size is patched below, once it is known
        for part in before_data:
            output.write(part)
        output.write(comment)
        output.write(data_header)
        _copy_chunk_body(reader, data_header, output, "stream")
        # Chunks after the audio (some editors put a LIST there) are copied through as they are, chunk by chunk.
        while chunk_header := reader.read(_RIFF_CHUNK.size):
            if len(chunk_header) < _RIFF_CHUNK.size:
                raise EnvelopeError("stream: truncated chunk header after the data chunk")
            output.write(chunk_header)
            _copy_chunk_body(reader, chunk_header, output, "stream")
        if output.size - 8 > 0xFFFFFFFF:
            raise EnvelopeError(f"{dst}: too large for a RIFF file ({output.size} bytes)")
        try:
            output.handle.seek(4)
            output.handle.write(struct.pack("<I", output.size - 8))
        except OSError as exc:
            raise EnvelopeError(f"{dst}: cannot write: {exc.strerror or exc}") from None
    # The size was patched after the fact, so the digest is taken from the finished file.
    return sha256_file(dst)


def _read_wav_head(reader: _PieceReader, where: str) -> tuple[list[bytes], bytes]:
    """The chunks before the data chunk (each with its header and padding) and the data chunk's header."""
    riff = reader.read(12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
        raise EnvelopeError(f"{where}: not a RIFF/WAVE file")
    before_data: list[bytes] = []
    buffered = 0
    seen_fmt = False
    while True:
        chunk_header = reader.read(_RIFF_CHUNK.size)
        if not chunk_header:
            raise EnvelopeError(f"{where}: no data chunk")
        if len(chunk_header) < _RIFF_CHUNK.size:
            raise EnvelopeError(f"{where}: truncated chunk header at offset {12 + buffered}")
        chunk_id, size = _RIFF_CHUNK.unpack(chunk_header)
        if chunk_id == b"data":
            if not seen_fmt:
                raise EnvelopeError(f"{where}: no fmt chunk before the data chunk")
            return before_data, chunk_header
        buffered += _RIFF_CHUNK.size + size + size % 2
        if buffered > MAX_WAV_HEADER_BYTES:
            raise EnvelopeError(f"{where}: chunks before the data chunk exceed {MAX_WAV_HEADER_BYTES} bytes")
        body = reader.read(size + size % 2)
        if len(body) < size + size % 2:
            raise EnvelopeError(f"{where}: truncated {_chunk_name(chunk_id)} chunk")
        seen_fmt = seen_fmt or chunk_id == b"fmt "
        before_data.append(chunk_header + body)


def _copy_chunk_body(reader: _PieceReader, chunk_header: bytes, output: _Output, where: str) -> None:
    chunk_id, size = _RIFF_CHUNK.unpack(chunk_header)
    copied = reader.copy(size, output.write)
    if copied != size:
        raise EnvelopeError(
            f"{where}: truncated {_chunk_name(chunk_id)} chunk: {size} bytes declared, {copied} present"
        )
    if size % 2:
        # A missing pad byte at the very end is a common writer slip; the copy gets one either way.
        output.write(reader.read(1) or b"\x00")


def _chunk_name(chunk_id: bytes) -> str:
    return repr(chunk_id.decode("latin-1"))


def read_wav_comment(path: Path) -> str | None:
    """The ICMT comment of a RIFF/WAVE file's LIST/INFO chunk (as ``watermark_wav`` writes it), or ``None``."""
    with _open_input(path) as handle:
        riff = _read(handle, 12, path)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            raise EnvelopeError(f"{path}: not a RIFF/WAVE file")
        while len(chunk_header := _read(handle, _RIFF_CHUNK.size, path)) == _RIFF_CHUNK.size:
            chunk_id, size = _RIFF_CHUNK.unpack(chunk_header)
            if chunk_id == b"LIST" and size <= MAX_WAV_HEADER_BYTES:
                body = _read(handle, size + size % 2, path)
                comment = _info_comment(body[:size])
                if comment is not None:
                    return comment
            else:
                handle.seek(size + size % 2, os.SEEK_CUR)
    return None


def _info_comment(body: bytes) -> str | None:
    if body[:4] != b"INFO":
        return None
    position = 4
    while position + _RIFF_CHUNK.size <= len(body):
        chunk_id, size = _RIFF_CHUNK.unpack_from(body, position)
        value = body[position + _RIFF_CHUNK.size : position + _RIFF_CHUNK.size + size]
        if chunk_id == b"ICMT":
            return value.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
        position += _RIFF_CHUNK.size + size + size % 2
    return None
