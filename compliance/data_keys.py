"""Data keys (DEKs) at rest, wrapped only, and the per-operation key ring that turns them into a ``FieldCipher``.

Envelope encryption: column values are encrypted with a data key; the data key is stored only *wrapped* by a
key-encryption key (KEK) that never leaves the key service. The ``data_keys`` table holds, per purpose (the kind
of record the key protects, e.g. ``patients``), a short list of wrapped data keys with the KEK version that wraps
each. Rotating the KEK and rewrapping every row here re-protects all data without touching a single ciphertext.

Versions. ``FieldCipher`` tokens carry a one-byte data key *version* (1-255) bound into their associated data.
Each data key row therefore has a per-purpose ``version`` (unique with its purpose), and ``FieldCipher.keys``
maps that version to the unwrapped key. Records point at their data key by ``data_key_id`` (a foreign key), so
the key a row needs is found without parsing tokens; the token's version byte must agree with the row's key or
decryption fails. A purpose uses its newest unretired key for new records; older keys stay for the records
written under them (``retired_at`` set by :meth:`DataKeyRing.new_data_key`).

Nothing is cached. The issue's rule is that the key service's clients keep nothing longer than a call needs:
:meth:`DataKeyRing.cipher` unwraps the keys one operation needs, builds a ``FieldCipher``, zeroes the unwrapped
``bytearray`` at once and hands the cipher to the ``async with`` block only. The price is one key-service round
trip (tens of microseconds over the Unix socket, see ``benchmarks/crypto.py``) per registry operation; the gain
is that a memory dump of an idle application node holds no data key, and a key service that stops answering (or
a KEK that is withdrawn) stops decryption on the very next operation. The ``AESGCM`` object inside the cipher
keeps its own copy of the key until it is garbage collected: the zeroing is best effort, as in
``compliance.keyservice_client``.

The wrap is bound to the row: the key service is asked to wrap for ``dek:<purpose>:v<version>``, so a wrapped
key copied onto another ``data_keys`` row (or another purpose) fails to unwrap instead of silently decrypting the
wrong records.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from sqlalchemy import CheckConstraint, Index, Integer, LargeBinary, String, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from compliance.audit import AuditLog, AuditOutcome, JsonValue
from compliance.fields import FieldCipher
from compliance.keyservice_client import (
    GeneratedDataKey,
    KeyServiceClient,
    KeyServiceStatus,
    TrustAnchors,
    mutual_tls_client_context,
    wipe,
)
from compliance.keyservice_protocol import KeyServiceRefused, KeyServiceUnavailable
from compliance.keystore import KeyStoreError, UnwrapError, read_token_file, wrapped_version
from ground.config import Config, parse_host_port
from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from ground.logs import get_logger
from ground.models import Base, UTCDateTime

log = get_logger("medhotline.data_keys")

MAX_VERSION: Final = 255  # the version byte of a FieldCipher token
_PURPOSE: Final = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_CREATE_ATTEMPTS: Final = 5
SYSTEM_ACTOR: Final = "medhotline"
SYSTEM_ROLE: Final = "system"


class DataKeyError(MedhotlineError):
    """A data key could not be created, found or used; the message names the key (purpose, version), never a key."""


class DataKeyConflict(DataKeyError):
    """Another process stored the same data key version first (two nodes creating a purpose's key at once)."""


class DataKey(Base):
    """One wrapped data key. The plain key is never stored; ``wrapped`` is only useful to the key service."""

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    purpose: Mapped[str] = mapped_column(String(48))
    version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary(128))
    kek_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rewrapped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint(f"version >= 1 AND version <= {MAX_VERSION}", name="version"),
        CheckConstraint("kek_version >= 1", name="kek_version"),
        Index("uq_data_keys_purpose_version", "purpose", "version", unique=True),
        Index("ix_data_keys_kek_version", "kek_version"),
    )


@dataclass(frozen=True, slots=True)
class DataKeyRecord:
    """A snapshot of one ``data_keys`` row."""

    id: int
    purpose: str
    version: int
    wrapped: bytes = field(repr=False)
    kek_version: int
    created_at: datetime
    retired_at: datetime | None
    rewrapped_at: datetime | None

    @property
    def wrap_purpose(self) -> str:
        return wrap_purpose(self.purpose, self.version)


def wrap_purpose(purpose: str, version: int) -> str:
    """The purpose the key service binds into this data key's wrap (see the module docstring)."""
    return f"dek:{purpose}:v{version}"


def check_purpose(purpose: str) -> str:
    if not isinstance(purpose, str) or not _PURPOSE.match(purpose):
        raise DataKeyError(f"data key purpose {purpose!r} must match {_PURPOSE.pattern}")
    return purpose


def data_key_record(row: DataKey) -> DataKeyRecord:
    """The snapshot of an ORM row (for repositories that join ``data_keys``)."""
    return DataKeyRecord(
        id=row.id,
        purpose=row.purpose,
        version=row.version,
        wrapped=bytes(row.wrapped),
        kek_version=row.kek_version,
        created_at=row.created_at,
        retired_at=row.retired_at,
        rewrapped_at=row.rewrapped_at,
    )


class DataKeyStore(Repository):
    """The ``data_keys`` table (synchronous; :class:`DataKeyRing` calls it through ``asyncio.to_thread``)."""

    def current(self, purpose: str) -> DataKeyRecord | None:
        """The newest unretired key of ``purpose``, or None before its first use."""
        with self._transaction(f"reading the current data key of {purpose}") as session:
            row = session.scalars(
                select(DataKey)
                .where(DataKey.purpose == purpose, DataKey.retired_at.is_(None))
                .order_by(DataKey.version.desc())
                .limit(1)
            ).first()
            return None if row is None else data_key_record(row)

    def get(self, key_id: int) -> DataKeyRecord:
        with self._transaction(f"reading data key {key_id}") as session:
            row = session.get(DataKey, key_id)
            if row is None:
                raise DataKeyError(f"no data key {key_id}")
            return data_key_record(row)

    def get_many(self, key_ids: Collection[int]) -> list[DataKeyRecord]:
        wanted = sorted(set(key_ids))
        with self._transaction("reading data keys") as session:
            rows = [data_key_record(r) for r in session.scalars(select(DataKey).where(DataKey.id.in_(wanted)))]
        missing = sorted(set(wanted) - {r.id for r in rows})
        if missing:
            raise DataKeyError(f"no data key {', '.join(map(str, missing))}")
        return sorted(rows, key=lambda r: r.id)

    def add(self, purpose: str, wrapped: bytes, at: datetime, *, version: int) -> DataKeyRecord:
        """Store a wrapped key as ``version`` of ``purpose``; DataKeyConflict if that version exists already."""
        if not 1 <= version <= MAX_VERSION:
            raise DataKeyError(f"purpose {purpose} has used all {MAX_VERSION} data key versions")
        with self._transaction(f"storing data key {purpose} v{version}") as session:
            row = DataKey(
                purpose=purpose, version=version, wrapped=wrapped, kek_version=wrapped_version(wrapped), created_at=at
            )
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                # The unique (purpose, version) index: another node stored this version first.
                raise DataKeyConflict(f"data key {purpose} v{version} was created concurrently") from None
            return data_key_record(row)

    def current_and_next_version(self, purpose: str) -> tuple[DataKeyRecord | None, int]:
        """The current key of ``purpose`` and the version a new key would take, read in one statement.

        One statement, so both come from the same snapshot: a key created by another node is either seen as
        current or collides with the version chosen here (the unique index), never slips between two reads.
        """
        with self._transaction(f"reading the data keys of {purpose}") as session:
            rows = [data_key_record(r) for r in session.scalars(select(DataKey).where(DataKey.purpose == purpose))]
        live = [r for r in rows if r.retired_at is None]
        current = max(live, key=lambda r: r.version) if live else None
        return current, max((r.version for r in rows), default=0) + 1

    def retire(self, key_id: int, at: datetime) -> None:
        """New records stop using this key; records already under it keep reading with it."""
        with self._transaction(f"retiring data key {key_id}") as session:
            session.execute(
                update(DataKey).where(DataKey.id == key_id, DataKey.retired_at.is_(None)).values(retired_at=at)
            )

    def ids_not_under(self, kek_version: int, purpose: str | None = None) -> list[int]:
        """Ids of keys wrapped under any KEK version other than ``kek_version``: what a rewrap still has to do."""
        query = select(DataKey.id).where(DataKey.kek_version != kek_version).order_by(DataKey.id)
        if purpose is not None:
            query = query.where(DataKey.purpose == purpose)
        with self._transaction("listing data keys to rewrap") as session:
            return [int(i) for i in session.scalars(query)]

    def replace_wrapped(self, key_id: int, old: bytes, new: bytes, at: datetime) -> bool:
        """Store ``new`` in place of ``old`` in one transaction; False if the row no longer holds ``old``.

        Compare-and-set: two rewraps running at once (or a rewrap racing a restore) never overwrite each other's
        result with a stale one.
        """
        with self._transaction(f"storing the rewrapped data key {key_id}") as session:
            result = session.execute(
                update(DataKey)
                .where(DataKey.id == key_id, DataKey.wrapped == old)
                .values(wrapped=new, kek_version=wrapped_version(new), rewrapped_at=at)
            )
            return rowcount(result) == 1

    def list(self, purpose: str | None = None) -> list[DataKeyRecord]:
        query = select(DataKey).order_by(DataKey.purpose, DataKey.version)
        if purpose is not None:
            query = query.where(DataKey.purpose == purpose)
        with self._transaction("listing data keys") as session:
            return [data_key_record(r) for r in session.scalars(query)]

    def counts_by_kek_version(self) -> dict[int, int]:
        with self._transaction("counting data keys per KEK version") as session:
            rows = session.execute(select(DataKey.kek_version, func.count()).group_by(DataKey.kek_version)).all()
            return {int(version): int(count) for version, count in rows}


class KeyServicePort(Protocol):
    """What the key ring needs from the key service; ``KeyServiceClient`` implements it (tests wrap it)."""

    async def generate_data_key(self, purpose: str) -> GeneratedDataKey: ...

    async def unwrap(self, wrapped: bytes, purpose: str) -> bytearray: ...

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes: ...

    async def rotate(self) -> int: ...

    async def status(self) -> KeyServiceStatus: ...


@dataclass(frozen=True, slots=True)
class RewrapReport:
    """What one rewrap run did. ``remaining`` counts keys still not under ``kek_version`` after the run."""

    kek_version: int
    rewrapped: int
    skipped: int
    failed: tuple[int, ...]
    remaining: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and not self.failed


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """``medhotline keys status``: the KEK versions the service holds and how many data keys each wraps."""

    kek_versions: tuple[int, ...]
    current: int
    data_keys_per_kek: dict[int, int]

    @property
    def to_rewrap(self) -> int:
        return sum(n for version, n in self.data_keys_per_kek.items() if version != self.current)


class DataKeyRing:
    """Data keys of every purpose: created on first use, unwrapped per operation, rewrapped after a rotation.

    ``audit`` (optional) receives a ``key_operation`` entry for every data key created, KEK rotation, and rewrap
    run. The actor of a key created on first use is the service itself (``medhotline``/``system``).
    """

    def __init__(
        self,
        store: DataKeyStore,
        keys: KeyServicePort,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def store(self) -> DataKeyStore:
        return self._store

    # --- keys for an operation --------------------------------------------------------------------------------

    async def current_key(self, purpose: str) -> DataKeyRecord:
        """The key new records of ``purpose`` are encrypted under, generated (and stored wrapped) on first use."""
        check_purpose(purpose)
        existing = await asyncio.to_thread(self._store.current, purpose)
        if existing is not None:
            return existing
        return await self._create(purpose, actor=SYSTEM_ACTOR, role=SYSTEM_ROLE, reason="first use", first_use=True)

    async def keys(self, key_ids: Collection[int]) -> list[DataKeyRecord]:
        return await asyncio.to_thread(self._store.get_many, key_ids)

    @asynccontextmanager
    async def cipher(
        self, keys: Sequence[DataKeyRecord], *, encrypt_with: DataKeyRecord | None = None
    ) -> AsyncIterator[FieldCipher]:
        """A ``FieldCipher`` over ``keys`` (one purpose), for the ``async with`` block only.

        It encrypts with ``encrypt_with`` (default: the first of ``keys``) and decrypts tokens of any of them.
        Each key is unwrapped by the key service now and its plain bytes zeroed as soon as the cipher is built.
        """
        chosen = list({k.id: k for k in [*keys, *([encrypt_with] if encrypt_with else [])]}.values())
        if not chosen:
            raise DataKeyError("a cipher needs at least one data key")
        purposes = {k.purpose for k in chosen}
        if len(purposes) != 1:
            raise DataKeyError(f"one cipher serves one purpose, got {', '.join(sorted(purposes))}")
        plain: dict[int, bytearray] = {}
        try:
            for key in chosen:
                plain[key.version] = await self._unwrap(key)
            cipher = FieldCipher(plain, (encrypt_with or chosen[0]).version)
        finally:
            for buffer in plain.values():
                wipe(buffer)
        yield cipher

    async def _unwrap(self, key: DataKeyRecord) -> bytearray:
        try:
            return await self._keys.unwrap(key.wrapped, key.wrap_purpose)
        except KeyServiceRefused as exc:
            if exc.code == "unwrap_failed":
                raise DataKeyError(
                    f"data key {key.purpose} v{key.version} (id {key.id}) does not unwrap: "
                    "its wrapped bytes were altered or moved from another row"
                ) from None
            raise

    # --- creating keys ---------------------------------------------------------------------------------------

    async def new_data_key(self, purpose: str, *, actor: str, role: str, reason: str = "") -> DataKeyRecord:
        """Start a new data key version for ``purpose`` and retire the previous one (which keeps decrypting)."""
        check_purpose(purpose)
        previous = await asyncio.to_thread(self._store.current, purpose)
        created = await self._create(purpose, actor=actor, role=role, reason=reason, first_use=False)
        if previous is not None and previous.id != created.id:
            await asyncio.to_thread(self._store.retire, previous.id, self._clock())
        return created

    async def _create(self, purpose: str, *, actor: str, role: str, reason: str, first_use: bool) -> DataKeyRecord:
        for _ in range(_CREATE_ATTEMPTS):
            current, version = await asyncio.to_thread(self._store.current_and_next_version, purpose)
            if first_use and current is not None:
                return current  # created by someone else since the caller looked
            if version > MAX_VERSION:
                raise DataKeyError(f"purpose {purpose} has used all {MAX_VERSION} data key versions")
            generated = await self._keys.generate_data_key(wrap_purpose(purpose, version))
            generated.wipe()  # only the wrapped form is kept; operations unwrap it when they need it
            try:
                record = await asyncio.to_thread(
                    self._store.add, purpose, generated.wrapped, self._clock(), version=version
                )
            except DataKeyConflict:
                if not first_use:
                    raise
                # Another node created the purpose's first key at the same moment: the next round uses theirs.
                continue
            log.info("data_key.created", purpose=purpose, version=version, kek_version=record.kek_version)
            details: dict[str, JsonValue] = {
                "operation": "generate_data_key",
                "purpose": purpose,
                "version": version,
                "kek_version": record.kek_version,
            }
            await self._record(actor, role, reason, details)
            return record
        raise DataKeyError(f"could not create a data key for {purpose}: {_CREATE_ATTEMPTS} concurrent attempts lost")

    # --- KEK rotation and rewrap -----------------------------------------------------------------------------

    async def status(self) -> KeyStatus:
        service = await self._keys.status()
        counts = await asyncio.to_thread(self._store.counts_by_kek_version)
        return KeyStatus(kek_versions=service.versions, current=service.current, data_keys_per_kek=counts)

    async def rotate(self, *, actor: str, role: str, reason: str = "") -> int:
        """A new KEK version in the key service; older versions stay for unwrapping (and rewrapping) only."""
        try:
            version = await self._keys.rotate()
        except MedhotlineError:
            await self._record(actor, role, reason, {"operation": "rotate"}, outcome="error")
            raise
        log.info("kek.rotated", kek_version=version)
        await self._record(actor, role, reason, {"operation": "rotate", "kek_version": version})
        return version

    async def rewrap_all(
        self,
        *,
        actor: str,
        role: str,
        reason: str = "",
        purpose: str | None = None,
        limit: int | None = None,
        on_progress: Callable[[DataKeyRecord], None] | None = None,
    ) -> RewrapReport:
        """Rewrap every data key not under the current KEK version, one row per transaction.

        Idempotent and resumable: a row already under the current version is not touched, so an interrupted run
        is finished by running it again. Readers keep working throughout, because the old KEK versions still
        unwrap: a reader sees either the old or the new wrapped key and both give the same data key. No column
        value is re-encrypted. ``limit`` stops after that many rows (a rewrap in small batches).
        """
        if limit is not None and limit < 1:
            raise DataKeyError(f"rewrap limit must be at least 1, got {limit}")
        current = (await self._keys.status()).current
        pending = await asyncio.to_thread(self._store.ids_not_under, current, purpose)
        rewrapped = skipped = 0
        failed: list[int] = []
        for key_id in pending if limit is None else pending[:limit]:
            key = await asyncio.to_thread(self._store.get, key_id)
            if key.kek_version == current:
                skipped += 1  # done by a concurrent run since the list was read
                continue
            try:
                new = await self._keys.rewrap(key.wrapped, key.wrap_purpose)
            except KeyServiceRefused as exc:
                if exc.code != "unwrap_failed":
                    raise
                # An altered wrapped key: report it and go on, the other keys must not wait for it.
                log.error("data_key.rewrap_failed", data_key_id=key.id, purpose=key.purpose, version=key.version)
                failed.append(key.id)
                continue
            try:
                new_version = wrapped_version(new)
            except UnwrapError as exc:
                raise DataKeyError(
                    f"key service returned a malformed wrapped key for data key {key.id}: {exc}"
                ) from None
            if await asyncio.to_thread(self._store.replace_wrapped, key.id, key.wrapped, new, self._clock()):
                rewrapped += 1
                log.info("data_key.rewrapped", data_key_id=key.id, kek_version=new_version)
                if on_progress is not None:
                    on_progress(key)
            else:
                skipped += 1
        remaining = len(await asyncio.to_thread(self._store.ids_not_under, current, purpose))
        report = RewrapReport(current, rewrapped, skipped, tuple(failed), remaining)
        details: dict[str, JsonValue] = {
            "operation": "rewrap",
            "kek_version": current,
            "rewrapped": rewrapped,
            "skipped": skipped,
            "failed": list(failed),
            "remaining": remaining,
        }
        await self._record(actor, role, reason, details, outcome="success" if not failed else "error")
        return report

    async def _record(
        self,
        actor: str,
        role: str,
        reason: str,
        details: dict[str, JsonValue],
        *,
        outcome: AuditOutcome = "success",
    ) -> None:
        if self._audit is None:
            return
        audit = self._audit
        await asyncio.to_thread(
            lambda: audit.append(
                actor=actor,
                role=role,
                action="key_operation",
                outcome=outcome,
                reason=reason,
                details=details,
            )
        )


TOKEN_FILE: Final = "keyservice.token"  # noqa: S105 (a file name, not a secret)


def key_service_for(config: Config) -> KeyServiceClient:
    """A client of the key service ``config`` names: its Unix socket, or with ``keyservice.address`` mutual TLS
    to a key service on another host; the token in ``<state_dir>`` either way.

    Refuses at once, with what to do, when the service is not running (no socket), the token file is missing
    or readable by others, or the TLS files are not a certificate, its key and a CA; the connection itself is
    opened on the first call.
    """
    ks = config.keyservice
    socket_path = config.keyservice_socket
    token_path = config.service.state_dir / TOKEN_FILE
    files = ks.tls_files()
    if not ks.address and not socket_path.exists():
        raise KeyServiceUnavailable(
            f"the key service is not running: no socket at {socket_path}; start it with `medhotline keyservice`"
        )
    if not token_path.exists():
        todo = (
            "copy it there (mode 0600) from the key service's host"
            if ks.address
            else "`medhotline keyservice` creates it on its first start"
        )
        raise KeyServiceUnavailable(f"no key service token at {token_path}: {todo}")
    try:
        token = read_token_file(token_path).decode("utf-8", errors="strict")
    except KeyStoreError as exc:
        raise KeyServiceUnavailable(f"cannot use the key service token: {exc}") from None
    if not ks.address or files is None:
        return KeyServiceClient.unix(socket_path, token)
    # Over TCP the token still has to be presented: the client certificate says which machine this is, the
    # token that it runs the hotline (the server requires both, as it requires peer uid and token locally).
    context = mutual_tls_client_context(*files)
    host, port = parse_host_port(ks.address)
    return KeyServiceClient.tls(host, port, context, token, server_hostname=ks.server_name or host)


class LazyKeyService:
    """The configured key service, connected on first use (and again after it was unreachable).

    For long-running components that must start before the key service does: the service records calls from
    its first second, and their ingest waits for the keys instead of the start-up failing.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._client: KeyServiceClient | None = None
        files = config.keyservice.tls_files()
        if config.keyservice.address and files is not None:
            # A certificate that is not one is a configuration error: refuse at start (KeyServiceError naming
            # the file), not at the first recording. Only reaching the key service waits for first use.
            mutual_tls_client_context(*files)

    def _get(self) -> KeyServiceClient:
        if self._client is None:
            self._client = key_service_for(self._config)
        return self._client

    async def generate_data_key(self, purpose: str) -> GeneratedDataKey:
        return await self._get().generate_data_key(purpose)

    async def unwrap(self, wrapped: bytes, purpose: str) -> bytearray:
        return await self._get().unwrap(wrapped, purpose)

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        return await self._get().rewrap(wrapped, purpose)

    async def rotate(self) -> int:
        return await self._get().rotate()

    async def status(self) -> KeyServiceStatus:
        return await self._get().status()

    async def sign(self, message: bytes, purpose: str) -> bytes:
        return await self._get().sign(message, purpose)

    async def trust_anchors(self) -> TrustAnchors:
        return await self._get().trust_anchors()

    async def timestamp(self, request_der: bytes) -> bytes:
        return await self._get().timestamp(request_der)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
