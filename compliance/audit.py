"""Tamper-evident audit trail: entries are the leaves of an RFC 9162 Merkle tree with Ed25519-signed tree heads.

Every access to patient data, break-glass, permission change and key operation appends one :class:`AuditEntry`
(who, role, what, which patient by blind id, why, when, outcome). Its canonical encoding (JSON, sorted keys, no
spaces, UTF-8) is the Merkle leaf. At intervals :meth:`AuditLog.sign_head` signs the tree head (size, root,
time). :func:`verify` recomputes every leaf from the stored fields, the tree root at every signed head and the
consistency between successive heads, and names the first altered, removed, inserted or reordered entry;
:func:`prove` gives an inclusion proof an auditor checks with :func:`check_inclusion` and the public key only.

Storage sits behind the :class:`AuditStore` port: :class:`MemoryAuditStore` and :class:`SqlAuditStore`, whose
tables live on their own :data:`AUDIT_METADATA`, apart from the business tables; migration ``0003_audit``
creates them with triggers that refuse UPDATE and DELETE. Entry ``seq`` is the 0-based leaf index.

What the design cannot catch on its own: entries appended after the last signed head and then removed, or the
newest heads removed together with their entries; an auditor who keeps copies of the heads catches those
(``verify(..., trusted_head=...)``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from compliance.merkle import (
    ProofError,
    TreeAccumulator,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from ground.canonical import canonical_json
from ground.clock import utc_text
from ground.db import DatabaseUnavailable, is_unavailable
from ground.errors import MedhotlineError
from ground.ids import UUID_PATTERN

if TYPE_CHECKING:
    from compliance.audit_witness import HeadWitness

AuditAction: TypeAlias = Literal[
    "read",
    "export",
    "change",
    "denied",
    "break_glass_start",
    "break_glass_end",
    "permission_change",
    "key_operation",
    "account_freeze",
    "account_unfreeze",
    "login",
    "logout",
    # Recordings and signed call records (recordings/): a retention purge, a legal hold placed or lifted, a
    # record signed and timestamped, a recording stored.
    "delete",
    "legal_hold",
    "sign",
    "store",
    # The hotline switched to a public-health surge configuration and back (routing.surge).
    "surge_on",
    "surge_off",
    # An HL7 v2 message sent to or received from the HIS (his/): type, control id, outcome, patient by blind id.
    "hl7_send",
    "hl7_receive",
]
AuditOutcome: TypeAlias = Literal["success", "denied", "error"]
AUDIT_ACTIONS: Final[frozenset[str]] = frozenset(get_args(AuditAction))
AUDIT_OUTCOMES: Final[frozenset[str]] = frozenset(get_args(AuditOutcome))
JsonValue: TypeAlias = str | int | bool | list["JsonValue"] | dict[str, "JsonValue"] | None

ENTRY_FORMAT: Final = 1
HEAD_DOMAIN: Final = b"medhotline-audit-tree-head-v1\n"
MAX_TEXT: Final = 2000
_BLIND_ID: Final = re.compile(r"(?:[0-9a-f]{2}){16,64}")
_ROLE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_ACTOR: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}")
_DETAIL_KEY: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Seven or more digits, possibly separated by spaces, dots, dashes, slashes or brackets: a phone number, a
# record number or a date of birth. Such values belong in the encrypted business tables, never in the audit log.
_NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")
_DIGEST: Final = re.compile(r"(?:[0-9a-f]{2}){16,64}")
_PII_KEYS: Final = frozenset(
    {"name", "first_name", "last_name", "full_name", "patient_name", "phone", "phone_number", "telephone",
     "mobile", "msisdn", "caller_id", "email", "address", "birth", "birthdate", "date_of_birth", "dob", "mrn",
     "record_number", "national_id", "ssn", "insurance_number"}
)  # fmt: skip


class AuditError(MedhotlineError):
    """An audit entry is invalid (e.g. would carry personal data) or the log cannot be appended to.

    A MedhotlineError: the CLI shows its message and exits 1; an operation that needs its entry did not happen."""


class AuditUnavailable(AuditError, DatabaseUnavailable):
    """No writable database answered (lost connection, a failover in progress): the entry was not appended, unless
    the COMMIT itself was cut off; a retry once a primary answers appends it (possibly a second time, never less)."""


class AuditIntegrityError(AuditError):
    """The stored log does not match its own hashes; the service refuses to sign such a log."""


# --- entries ---------------------------------------------------------------------------------------------------


def _format_time(at: datetime) -> str:
    if at.tzinfo is None or at.utcoffset() is None:
        raise AuditError("audit times must be timezone-aware")
    return utc_text(at)


def _parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _check_free_text(what: str, value: str) -> None:
    if len(value) > MAX_TEXT:
        raise AuditError(f"{what} is longer than {MAX_TEXT} characters")
    if any(ord(c) < 0x20 and c not in "\t\n" for c in value):
        raise AuditError(f"{what} contains control characters")
    if _NUMBER_LIKE.search(value):
        raise AuditError(
            f"{what} contains a number that looks like a phone, record number or date: "
            "the audit log holds no patient identifiers, refer to the patient by blind id"
        )


def _check_details(value: object, where: str = "details") -> None:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1_000_000:
            raise AuditError(f"{where}: large number {value} looks like an identifier; use a blind id")
        return
    if isinstance(value, str):
        if UUID_PATTERN.fullmatch(value) or _DIGEST.fullmatch(value):
            # A record's random id (call, recording, signed record) or a hash: 32+ hex characters of random
            # shape, whose digit runs are not a phone or record number.
            return
        _check_free_text(where, value)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_details(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not _DETAIL_KEY.fullmatch(key):
                raise AuditError(f"{where}: key {key!r} is not a lower-case identifier")
            if key in _PII_KEYS:
                raise AuditError(f"{where}: key {key!r} would hold personal data; the audit log holds none")
            _check_details(item, f"{where}.{key}")
        return
    raise AuditError(f"{where}: {type(value).__name__} is not allowed (only strings, integers, booleans, null, "
                     "lists and objects, so the encoding stays canonical)")  # fmt: skip


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An audit entry exactly as stored (text fields and the leaf hash), possibly tampered with.

    :meth:`canonical` rebuilds the leaf bytes from these fields without validating them, so the verifier can
    hash whatever is in the store; :meth:`to_entry` validates.
    """

    seq: int
    at: str
    actor: str
    role: str
    action: str
    patient: str | None
    reason: str
    outcome: str
    details: str
    leaf_hash: bytes

    def canonical(self, seq: int | None = None) -> bytes:
        """The leaf bytes; ``seq`` overrides the stored sequence number (used to diagnose moved entries)."""
        return canonical_json(
            {
                "v": ENTRY_FORMAT,
                "seq": self.seq if seq is None else seq,
                "at": self.at,
                "actor": self.actor,
                "role": self.role,
                "action": self.action,
                "patient": self.patient,
                "reason": self.reason,
                "outcome": self.outcome,
                # The details' canonical JSON text, embedded as a string: any changed byte changes the leaf.
                "details": self.details,
            }
        )

    def content_matches(self) -> bool:
        return leaf_hash(self.canonical()) == self.leaf_hash

    def to_entry(self) -> AuditEntry:
        try:
            details = json.loads(self.details)
            at = _parse_time(self.at)
        except ValueError as exc:
            raise AuditError(f"entry {self.seq}: unreadable stored fields: {exc}") from None
        if not isinstance(details, dict):
            raise AuditError(f"entry {self.seq}: details are not a JSON object")
        return AuditEntry(
            seq=self.seq,
            at=at,
            actor=self.actor,
            role=self.role,
            action=self.action,  # type: ignore[arg-type]
            patient=self.patient,
            reason=self.reason,
            outcome=self.outcome,  # type: ignore[arg-type]
            details=details,
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited event. ``patient`` is the patient's blind id (lower-case hex), never a name or phone."""

    seq: int
    at: datetime
    actor: str
    role: str
    action: AuditAction
    outcome: AuditOutcome
    patient: str | None = None
    reason: str = ""
    details: Mapping[str, JsonValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise AuditError(f"seq must be >= 0, got {self.seq}")
        _format_time(self.at)
        if not _ACTOR.fullmatch(self.actor):
            raise AuditError(f"actor {self.actor!r} is not a staff or system id")
        if not _ROLE.fullmatch(self.role):
            raise AuditError(f"role {self.role!r} is not a role name")
        if self.action not in AUDIT_ACTIONS:
            raise AuditError(f"unknown audit action {self.action!r}; known: {', '.join(sorted(AUDIT_ACTIONS))}")
        if self.outcome not in AUDIT_OUTCOMES:
            raise AuditError(f"unknown outcome {self.outcome!r}; known: {', '.join(sorted(AUDIT_OUTCOMES))}")
        if self.patient is not None and not _BLIND_ID.fullmatch(self.patient):
            raise AuditError(
                "patient must be a blind id (32 to 128 lower-case hex digits), never a name, phone or record number"
            )
        _check_free_text("reason", self.reason)
        if not isinstance(self.details, Mapping):
            raise AuditError("details must be a JSON object")
        _check_details(dict(self.details))

    def stored(self) -> StoredEntry:
        """The stored form, with the leaf hash of the canonical encoding."""
        row = StoredEntry(
            seq=self.seq,
            at=_format_time(self.at),
            actor=self.actor,
            role=self.role,
            action=self.action,
            patient=self.patient,
            reason=self.reason,
            outcome=self.outcome,
            details=canonical_json(dict(self.details)).decode(),
            leaf_hash=b"",
        )
        return replace(row, leaf_hash=leaf_hash(row.canonical()))

    def canonical(self) -> bytes:
        """The Merkle leaf: canonical JSON (sorted keys, no spaces, UTF-8)."""
        return self.stored().canonical()

    def leaf_hash(self) -> bytes:
        return self.stored().leaf_hash


# --- signed tree heads -----------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: names the key that signed a head."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """The tree of the first ``size`` entries has root ``root_hash``, as signed at ``timestamp``."""

    size: int
    root_hash: bytes
    timestamp: datetime
    signature: bytes
    key_id: str = ""

    def signed_bytes(self) -> bytes:
        return signed_head_bytes(self.size, self.root_hash, self.timestamp)

    def check_signature(self, public_key: Ed25519PublicKey) -> bool:
        """True, or raise ProofError if the signature is not by ``public_key`` over this head."""
        try:
            public_key.verify(self.signature, self.signed_bytes())
        except (InvalidSignature, ValueError):
            raise ProofError(f"head at size {self.size}: signature invalid (forged)") from None
        return True

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "size": self.size,
            "root_hash": self.root_hash.hex(),
            "timestamp": _format_time(self.timestamp),
            "signature": base64.b64encode(self.signature).decode(),
            "key_id": self.key_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedTreeHead:
        try:
            return cls(
                size=int(data["size"]),
                root_hash=bytes.fromhex(str(data["root_hash"])),
                timestamp=_parse_time(str(data["timestamp"])),
                signature=base64.b64decode(str(data["signature"]), validate=True),
                key_id=str(data.get("key_id", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProofError(f"malformed signed tree head: {exc}") from None


def signed_head_bytes(size: int, root_hash: bytes, timestamp: datetime) -> bytes:
    """What the head signature covers: a domain tag, then canonical JSON of size, root and time."""
    body = {"size": size, "root_hash": root_hash.hex(), "timestamp": _format_time(timestamp)}
    return HEAD_DOMAIN + canonical_json(body)


class HeadSigner(Protocol):
    """Signs tree heads; in production the key service implements it, the key never leaves that process."""

    @property
    def public_key(self) -> Ed25519PublicKey: ...

    def sign(self, message: bytes) -> bytes: ...


class Ed25519Signer:
    """An Ed25519 key in a PEM file (mode 0600) in ``directory`` (0700), created on first use.

    The public key is written next to it (``audit-head.pub.pem``) for verifiers.
    """

    KEY_FILE: Final = "audit-head.key.pem"
    PUBLIC_FILE: Final = "audit-head.pub.pem"

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def load_or_create(cls, directory: Path) -> Ed25519Signer:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / cls.KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(_load_private_key(path))
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        signer = cls(key)
        (directory / cls.PUBLIC_FILE).write_bytes(public_key_pem(key.public_key()))
        return signer

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuditError(f"{path}: the signing key is readable by others (mode {mode:04o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: not an Ed25519 private key")
    return key


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM (SubjectPublicKeyInfo) Ed25519 public key; raise AuditError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: cannot read the audit public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path}: not an Ed25519 public key")
    return key


# --- storage port and adapters ---------------------------------------------------------------------------------


class AuditStore(Protocol):
    """Append-only storage of entries and signed heads."""

    def append_next(self, build: Callable[[int], StoredEntry]) -> StoredEntry:
        """Atomically store ``build(next_seq)``, where ``next_seq`` is one more than the last stored seq."""
        ...

    def entries(self, start: int = 0) -> Iterator[StoredEntry]:
        """The stored entries from seq ``start`` on, in seq order."""
        ...

    def entry(self, seq: int) -> StoredEntry | None: ...

    def leaf_hashes(self, stop: int | None = None) -> list[bytes]:
        """The stored leaf hashes of entries ``0..stop-1`` (all without ``stop``) in seq order."""
        ...

    def add_head(self, head: SignedTreeHead) -> None: ...

    def heads(self) -> list[SignedTreeHead]:
        """Every signed head, smallest size first."""
        ...


class MemoryAuditStore:
    """An in-process store, for tests and tools; not append-only against its owner (``items`` is public)."""

    def __init__(self) -> None:
        self.items: list[StoredEntry] = []
        self.signed_heads: list[SignedTreeHead] = []
        self._lock = threading.Lock()

    def append_next(self, build: Callable[[int], StoredEntry]) -> StoredEntry:
        with self._lock:
            seq = self.items[-1].seq + 1 if self.items else 0
            entry = build(seq)
            if entry.seq != seq:
                raise AuditError(f"entry built with seq {entry.seq}, expected {seq}")
            self.items.append(entry)
            return entry

    def entries(self, start: int = 0) -> Iterator[StoredEntry]:
        return iter([e for e in self.items if e.seq >= start])

    def entry(self, seq: int) -> StoredEntry | None:
        return next((e for e in self.items if e.seq == seq), None)

    def leaf_hashes(self, stop: int | None = None) -> list[bytes]:
        return [e.leaf_hash for e in sorted(self.items, key=lambda e: e.seq) if stop is None or e.seq < stop]

    def add_head(self, head: SignedTreeHead) -> None:
        with self._lock:
            if any(h.size == head.size for h in self.signed_heads):
                raise AuditError(f"a head at size {head.size} is already stored")
            self.signed_heads.append(head)

    def heads(self) -> list[SignedTreeHead]:
        return sorted(self.signed_heads, key=lambda h: h.size)


AUDIT_NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# Its own MetaData: the audit store is not part of the business schema (ground.models.Base.metadata).
AUDIT_METADATA: Final = MetaData(naming_convention=AUDIT_NAMING_CONVENTION)

audit_entries: Final = Table(
    "audit_entries",
    AUDIT_METADATA,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", String(32), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("role", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("patient", String(128), nullable=True),
    Column("reason", Text, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("details", Text, nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Index("ix_audit_entries_patient", "patient"),
    Index("ix_audit_entries_actor", "actor"),
    Index("ix_audit_entries_at", "at"),
)
audit_heads: Final = Table(
    "audit_heads",
    AUDIT_METADATA,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("timestamp", String(32), nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    Column("key_id", String(64), nullable=False),
)
# Arbitrary constant: serialises appends of several nodes sharing one PostgreSQL.
_PG_APPEND_LOCK: Final = 0x6D6861756469746C
_APPEND_ATTEMPTS: Final = 20


def _row_to_entry(row: Any) -> StoredEntry:
    return StoredEntry(
        seq=int(row.seq),
        at=row.at,
        actor=row.actor,
        role=row.role,
        action=row.action,
        patient=row.patient,
        reason=row.reason,
        outcome=row.outcome,
        details=row.details,
        leaf_hash=bytes(row.leaf_hash),
    )


def _unavailable(exc: DBAPIError) -> AuditUnavailable:
    first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0][:200]
    return AuditUnavailable(f"the audit log's database is unavailable: {first}")


class SqlAuditStore:
    """The audit tables (created by migration ``0003_audit``) through SQLAlchemy, SQLite or PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def append_next(self, build: Callable[[int], StoredEntry]) -> StoredEntry:
        last_error = ""
        for _ in range(_APPEND_ATTEMPTS):
            try:
                with self._engine.begin() as connection:
                    if connection.dialect.name == "postgresql":
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_APPEND_LOCK})
                    last = connection.scalar(select(func.max(audit_entries.c.seq)))
                    seq = 0 if last is None else int(last) + 1
                    entry = build(seq)
                    if entry.seq != seq:
                        raise AuditError(f"entry built with seq {entry.seq}, expected {seq}")
                    values = {name: getattr(entry, name) for name in (c.name for c in audit_entries.columns)}
                    connection.execute(insert(audit_entries).values(**values))
                    return entry
            except (IntegrityError, OperationalError) as exc:
                if is_unavailable(exc):
                    # No primary to retry against at once: the caller decides when to try again.
                    raise _unavailable(exc) from None
                # Another writer took this seq (or held the SQLite write lock): read the new end and retry.
                last_error = type(exc).__name__
                continue
            except DBAPIError as exc:
                if is_unavailable(exc):
                    raise _unavailable(exc) from None
                # Anything else the database refuses (a trigger, a permission): mapped here, at the adapter edge,
                # so callers see an AuditError (first line only: SQLAlchemy appends the statement and values).
                first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0][:200]
                raise AuditError(f"the audit log refused the entry: {first}") from None
        raise AuditError(f"could not append to the audit log after {_APPEND_ATTEMPTS} attempts: {last_error}")

    def entries(self, start: int = 0) -> Iterator[StoredEntry]:
        with self._engine.connect() as connection:
            result = connection.execution_options(yield_per=1000).execute(
                select(audit_entries).where(audit_entries.c.seq >= start).order_by(audit_entries.c.seq)
            )
            for row in result:
                yield _row_to_entry(row)

    def entry(self, seq: int) -> StoredEntry | None:
        with self._engine.connect() as connection:
            row = connection.execute(select(audit_entries).where(audit_entries.c.seq == seq)).first()
            return None if row is None else _row_to_entry(row)

    def leaf_hashes(self, stop: int | None = None) -> list[bytes]:
        query = select(audit_entries.c.leaf_hash).order_by(audit_entries.c.seq)
        if stop is not None:
            query = query.where(audit_entries.c.seq < stop)
        with self._engine.connect() as connection:
            rows = connection.execute(query)
            return [bytes(row.leaf_hash) for row in rows]

    def add_head(self, head: SignedTreeHead) -> None:
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    insert(audit_heads).values(
                        size=head.size,
                        root_hash=head.root_hash,
                        timestamp=_format_time(head.timestamp),
                        signature=head.signature,
                        key_id=head.key_id,
                    )
                )
        except IntegrityError:
            raise AuditError(f"a head at size {head.size} is already stored") from None

    def heads(self) -> list[SignedTreeHead]:
        with self._engine.connect() as connection:
            rows = connection.execute(select(audit_heads).order_by(audit_heads.c.size)).all()
        heads = []
        for row in rows:
            try:
                timestamp = _parse_time(row.timestamp)
            except ValueError:
                # Keep the head so verification reports it (its signature cannot match) instead of crashing.
                timestamp = datetime.min.replace(tzinfo=UTC)
            heads.append(SignedTreeHead(int(row.size), bytes(row.root_hash), timestamp, bytes(row.signature),
                                        row.key_id))  # fmt: skip
        return heads


# --- the log ---------------------------------------------------------------------------------------------------


class AuditLog:
    """Appends entries (serialised: seq = previous + 1) and signs tree heads."""

    def __init__(self, store: AuditStore, clock: Callable[[], datetime] | None = None) -> None:
        self._store = store
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()

    @property
    def store(self) -> AuditStore:
        return self._store

    def append(
        self,
        *,
        actor: str,
        role: str,
        action: AuditAction,
        outcome: AuditOutcome,
        patient: str | None = None,
        reason: str = "",
        details: Mapping[str, JsonValue] | None = None,
    ) -> AuditEntry:
        """Validate and append one entry; raises AuditError if it is invalid (e.g. would carry personal data)."""
        at = self._clock()
        # Validate before touching the store, so a refused entry never takes a seq.
        AuditEntry(0, at, actor, role, action, outcome, patient, reason, dict(details or {}))
        built: list[AuditEntry] = []

        def build(seq: int) -> StoredEntry:
            entry = AuditEntry(seq, at, actor, role, action, outcome, patient, reason, dict(details or {}))
            built[:] = [entry]
            return entry.stored()

        with self._lock:
            self._store.append_next(build)
        return built[0]

    def sign_head(self, signer: HeadSigner, *, witness: HeadWitness | None = None) -> SignedTreeHead:
        """Sign the head of the whole log as stored now; returns the previous head if nothing was appended.

        Refuses (AuditIntegrityError) to sign a log that does not extend the last signed head, or whose entries
        since that head do not match their hashes: the signature must never bless tampering. (Entries the last
        head covers are vouched for by its root; the full check is :func:`verify`.) With a ``witness`` the log
        must also extend the largest head ever signed (the database's heads may have been deleted with their
        entries), and the new head is remembered and published there before it is stored.
        """
        with self._lock:
            heads = self._store.heads()
            previous = heads[-1] if heads else None
            hashes = self._store.leaf_hashes()
            if witness is not None:
                witness.check_extends(hashes)
            base = 0
            if previous is not None:
                try:
                    previous.check_signature(signer.public_key)
                except ProofError as exc:
                    raise AuditIntegrityError(f"refusing to sign the audit log: {exc}") from None
                base = previous.size
                if len(hashes) < base or root_from_leaf_hashes(hashes[:base]) != previous.root_hash:
                    raise AuditIntegrityError(
                        f"refusing to sign the audit log: it does not extend the signed head at size {base}; "
                        "run `medhotline audit verify`"
                    )
                if len(hashes) == base:
                    return previous
            expected = base
            for row in self._store.entries(start=base):
                if row.seq >= len(hashes):
                    break  # appended since the hashes were read: the next head covers it
                if row.seq != expected or not row.content_matches() or row.leaf_hash != hashes[row.seq]:
                    raise AuditIntegrityError(
                        f"refusing to sign the audit log: entry {expected} is missing or does not match its hash; "
                        "run `medhotline audit verify`"
                    )
                expected += 1
            if expected != len(hashes):
                raise AuditIntegrityError(f"refusing to sign the audit log: entry {expected} is missing")
            root = root_from_leaf_hashes(hashes)
            timestamp = self._clock()
            signature = signer.sign(signed_head_bytes(len(hashes), root, timestamp))
            head = SignedTreeHead(len(hashes), root, timestamp, signature, key_id(signer.public_key))
            if witness is not None:
                witness.record(head)
            self._store.add_head(head)
            return head


# --- verification ----------------------------------------------------------------------------------------------

ProblemKind: TypeAlias = Literal["altered", "removed", "inserted", "reordered", "forged", "inconsistent"]


@dataclass(frozen=True, slots=True)
class Problem:
    kind: ProblemKind
    message: str
    seq: int | None = None
    head_size: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of :func:`verify`: ``problem`` is the first one found, in log order, or None."""

    size: int
    heads_checked: int
    problem: Problem | None
    unsigned: int = 0
    latest_head: SignedTreeHead | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"audit log BROKEN: {self.problem.message}"
        text = f"audit log OK: {self.size} entries, {self.heads_checked} signed heads verified"
        if self.unsigned:
            text += f"; the last {self.unsigned} entries are not yet covered by a signed head"
        return text


def _diagnose(store: AuditStore, row: StoredEntry, limit: int) -> Problem:
    """Name what happened to entry ``row.seq``, whose content does not match its stored leaf hash.

    If the row holds, unchanged, the content of another position ``j`` (its seq field aside), the entry moved:
    swapped with ``j`` (reordered), later entries renumbered down (removed) or up (inserted before it).
    """
    k = row.seq
    for j in range(max(limit, k + 64)):
        if j == k or leaf_hash(row.canonical(seq=j)) != row.leaf_hash:
            continue
        other = store.entry(j)
        if other is not None and not other.content_matches() and leaf_hash(other.canonical(seq=k)) == other.leaf_hash:
            return Problem("reordered", f"entry {k}: swapped with entry {j} (reordered)", seq=k)
        if j > k:
            span = f"entry {k}" if j == k + 1 else f"entries {k}..{j - 1}"
            return Problem("removed", f"{span} missing (removed): position {k} holds entry {j}, renumbered", seq=k)
        span = f"entry {j}" if j == k - 1 else f"entries {j}..{k - 1}"
        return Problem(
            "inserted",
            f"{span} inserted: not in the log as written; the entries after it were renumbered "
            f"(position {k} holds entry {j})",
            seq=j,
        )
    return Problem("altered", f"entry {k}: content does not match its leaf hash (altered)", seq=k)


def verify(
    store: AuditStore,
    public_key: Ed25519PublicKey,
    *,
    trusted_head: SignedTreeHead | None = None,
) -> VerifyReport:
    """Check the whole log: every leaf, seq continuity, every signed head and the consistency between heads.

    Stops at the first problem in log order. ``trusted_head`` is a head the auditor kept: the log must still
    contain (and agree with) it, which catches removal of the newest entries together with their heads.
    """
    heads = store.heads()
    if trusted_head is not None:
        heads = sorted([*heads, trusted_head], key=lambda h: h.size)
    limit = max([h.size for h in heads], default=0)
    accumulator = TreeAccumulator()
    hashes: list[bytes] = []
    checked = 0
    previous: SignedTreeHead | None = None
    head_index = 0

    def check_head(head: SignedTreeHead) -> Problem | None:
        nonlocal previous, checked
        where = f"head at size {head.size}"
        try:
            head.check_signature(public_key)
        except ProofError:
            return Problem("forged", f"{where}: signature invalid (forged)", head_size=head.size)
        if head.root_hash != accumulator.root():
            since = 0 if previous is None else previous.size
            return Problem(
                "altered",
                f"{where}: root does not match entries 0..{head.size - 1}: an entry in {since}..{head.size - 1} "
                "was altered, inserted, removed or reordered and its leaf hash recomputed",
                head_size=head.size,
            )
        if previous is not None:
            if head.timestamp < previous.timestamp:
                return Problem(
                    "inconsistent", f"{where}: signed before the head at size {previous.size}", head_size=head.size
                )
            try:
                verify_consistency(
                    previous.size, head.size, previous.root_hash, head.root_hash,
                    consistency_proof(previous.size, hashes),
                )  # fmt: skip
            except ProofError as exc:
                return Problem(
                    "inconsistent", f"{where}: not consistent with head at size {previous.size}: {exc}",
                    head_size=head.size,
                )  # fmt: skip
        previous = head
        checked += 1
        return None

    def report(problem: Problem | None) -> VerifyReport:
        return VerifyReport(accumulator.size, checked, problem, accumulator.size - (previous.size if previous else 0),
                            previous)  # fmt: skip

    def check_heads_at(size: int) -> Problem | None:
        nonlocal head_index
        while head_index < len(heads) and heads[head_index].size == size:
            if (problem := check_head(heads[head_index])) is not None:
                return problem
            head_index += 1
        return None

    if (problem := check_heads_at(0)) is not None:
        return report(problem)
    rows = store.entries()
    try:
        return _walk(
            store,
            rows,
            limit=limit,
            heads=heads,
            accumulator=accumulator,
            hashes=hashes,
            check_heads_at=check_heads_at,
            report=report,
        )
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # an unfinished SQL generator would otherwise hold its connection until collected


def _walk(
    store: AuditStore,
    rows: Iterator[StoredEntry],
    *,
    limit: int,
    heads: list[SignedTreeHead],
    accumulator: TreeAccumulator,
    hashes: list[bytes],
    check_heads_at: Callable[[int], Problem | None],
    report: Callable[[Problem | None], VerifyReport],
) -> VerifyReport:
    """The entry pass of :func:`verify`: seq continuity, leaf hashes, and the heads as their size is reached."""
    expected = 0
    for row in rows:
        if row.seq != expected:
            if row.seq < expected:
                return report(Problem("inserted", f"entry {row.seq} appears twice (inserted)", seq=row.seq))
            if store.entry(expected) is not None:
                return report(Problem("reordered", f"entry {expected}: stored out of order (reordered)", seq=expected))
            gap = f"entry {expected}" if row.seq == expected + 1 else f"entries {expected}..{row.seq - 1}"
            return report(Problem("removed", f"{gap} missing (removed)", seq=expected))
        if not row.content_matches():
            return report(_diagnose(store, row, limit))
        accumulator.append(row.leaf_hash)
        hashes.append(row.leaf_hash)
        expected += 1
        if (problem := check_heads_at(expected)) is not None:
            return report(problem)
    head = next((h for h in heads if h.size > expected), None)
    if head is not None:
        span = f"entry {expected}" if head.size == expected + 1 else f"entries {expected}..{head.size - 1}"
        return report(
            Problem(
                "removed",
                f"{span} missing (removed: log truncated at {expected}; the signed head at size {head.size} "
                "covers them)",
                seq=expected,
            )
        )
    return report(None)


# --- inclusion proofs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Entry ``seq`` (its canonical bytes) is leaf ``seq`` of the tree of ``tree_size`` entries.

    ``head`` is the signed head the proof was made against, for convenience: an auditor checks the proof
    against a head they hold (often the same one) with :func:`check_inclusion`.
    """

    seq: int
    tree_size: int
    entry: bytes
    audit_path: tuple[bytes, ...]
    head: SignedTreeHead | None = None

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "seq": self.seq,
            "tree_size": self.tree_size,
            "entry": self.entry.decode(),
            "leaf_hash": leaf_hash(self.entry).hex(),
            "audit_path": [p.hex() for p in self.audit_path],
            "head": None if self.head is None else self.head.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InclusionProof:
        try:
            return cls(
                seq=int(data["seq"]),
                tree_size=int(data["tree_size"]),
                entry=str(data["entry"]).encode(),
                audit_path=tuple(bytes.fromhex(str(p)) for p in data["audit_path"]),
                head=None if data.get("head") is None else SignedTreeHead.from_json(data["head"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProofError(f"malformed inclusion proof: {exc}") from None


def prove(store: AuditStore, seq: int) -> InclusionProof:
    """An inclusion proof of entry ``seq`` against the latest signed head (which must cover it).

    Raises AuditError if the entry does not exist or no signed head covers it yet.
    """
    entry = store.entry(seq)
    if entry is None:
        raise AuditError(f"no audit entry {seq}")
    heads = store.heads()
    if not heads or heads[-1].size <= seq:
        raise AuditError(f"entry {seq} is not yet covered by a signed tree head; sign a head first")
    head = heads[-1]
    hashes = store.leaf_hashes(head.size)
    if len(hashes) != head.size:
        raise AuditIntegrityError(f"the log holds {len(hashes)} of the {head.size} entries its latest head covers")
    path = inclusion_proof(seq, hashes)
    return InclusionProof(seq, head.size, entry.canonical(), tuple(path), head)


def check_inclusion(proof: InclusionProof, head: SignedTreeHead, public_key: Ed25519PublicKey) -> bool:
    """For an auditor: True if ``head`` is signed by ``public_key`` and ``proof.entry`` is leaf ``proof.seq`` of it.

    Raises ProofError saying what is wrong otherwise.
    """
    head.check_signature(public_key)
    if proof.tree_size != head.size:
        raise ProofError(f"proof is for a tree of size {proof.tree_size}, the head is at size {head.size}")
    try:
        claimed = json.loads(proof.entry)
    except ValueError:
        raise ProofError("the proven entry is not JSON") from None
    if not isinstance(claimed, dict) or claimed.get("seq") != proof.seq:
        raise ProofError(f"the proven entry is not entry {proof.seq}")
    verify_inclusion(proof.seq, proof.tree_size, leaf_hash(proof.entry), list(proof.audit_path), head.root_hash)
    return True


def check_consistency(
    old: SignedTreeHead, new: SignedTreeHead, proof: Sequence[bytes], public_key: Ed25519PublicKey
) -> bool:
    """For an auditor: both heads are signed and the log at ``new`` extends the log at ``old``."""
    old.check_signature(public_key)
    new.check_signature(public_key)
    return verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)


def prove_consistency(store: AuditStore, old_size: int, new_size: int) -> list[bytes]:
    hashes = store.leaf_hashes(new_size)
    if len(hashes) != new_size:
        raise AuditError(f"the log holds {len(hashes)} entries, fewer than {new_size}")
    return consistency_proof(old_size, hashes)
