# ruff: noqa: F811  (the shared fixtures are imported from test_his_registry and requested by name)
"""KEK rotation and rewrap of the data keys with patient data on SQLite and PostgreSQL, through a real key service.

Rows written before a rotation, between rotation and rewrap, and after; reads running while the rewrap runs; a
rewrap interrupted halfway and run again; a rewrap racing another; an altered wrapped key; and the KEKs never
leaving the key service.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from compliance.audit import AuditLog
from compliance.data_keys import DataKeyError, DataKeyRing, DataKeyStore, RewrapReport
from compliance.keyservice_client import KeyServiceClient
from compliance.keyservice_protocol import KeyServiceUnavailable
from compliance.keyservice_server import KeyServiceServer
from compliance.keystore import KeyStore
from his import PatientRegistry, PatientStore
from tests.unit.his.test_his_registry import (  # noqa: F401 (fixtures)
    LI,
    LI_CHILD,
    PEOPLE,
    TOKEN,
    WANG,
    ZHAO,
    CountingKeys,
    Person,
    audit,
    keys,
    keyservice,
    keystore,
    make_registry,
    registry,
    short_dir,
)


def ring_of(engine: Engine, keys: Any, audit: AuditLog | None = None) -> DataKeyRing:
    return DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)


async def register(registry: PatientRegistry, person: Person, **changes: Any) -> str:
    return await registry.upsert(person.input(**changes), accessor="registrar.chen", role="agent")


async def read_all(registry: PatientRegistry, ids: dict[str, Person]) -> None:
    for patient_id, person in ids.items():
        record = await registry.get(patient_id, accessor="nurse.liu", role="nurse", reason="follow-up call")
        assert record.name == person.name


def tokens(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT id, name_enc, phone_enc, national_id_enc, record_number_enc, birth_year_enc, data_key_id "
                    "FROM patients ORDER BY id"
                )
            )
        ]


def kek_versions(engine: Engine) -> dict[int, int]:
    return DataKeyStore.for_engine(engine).counts_by_kek_version()


# --- the whole cycle -------------------------------------------------------------------------------------------


async def test_rotate_and_rewrap_keep_all_patient_data_readable(
    registry: PatientRegistry, engine: Engine, keys: CountingKeys, audit: AuditLog
) -> None:
    ring = ring_of(engine, keys, audit)
    # Before the rotation: two data key versions in use, both wrapped under KEK v1.
    ids = {await register(registry, WANG): WANG}
    await ring.new_data_key("patients", reason="yearly data key", actor="admin.wu", role="admin")
    ids[await register(registry, LI)] = LI
    assert kek_versions(engine) == {1: 2}

    assert await ring.rotate(reason="yearly rotation", actor="admin.wu", role="admin") == 2
    # Between rotation and rewrap: everything reads (KEK v1 is decrypt-only), new rows go on, new data keys are v2.
    await read_all(registry, ids)
    ids[await register(registry, LI_CHILD)] = LI_CHILD
    await ring.new_data_key("patients", reason="after rotation", actor="admin.wu", role="admin")
    ids[await register(registry, ZHAO)] = ZHAO
    assert kek_versions(engine) == {1: 2, 2: 1}
    status = await ring.status()
    assert (status.kek_versions, status.current, status.to_rewrap) == ((1, 2), 2, 2)

    before = tokens(engine)
    # The rewrap runs while reads go on: no downtime.
    reads = asyncio.gather(*(read_all(registry, ids) for _ in range(5)))
    report = await ring.rewrap_all(reason="after yearly rotation", actor="admin.wu", role="admin")
    await reads
    assert report == RewrapReport(kek_version=2, rewrapped=2, skipped=0, failed=(), remaining=0)
    assert report.complete
    assert kek_versions(engine) == {2: 3}
    assert tokens(engine) == before  # not one column value was re-encrypted
    await read_all(registry, ids)
    # After the rewrap: new rows, updates, lookups.
    again = await register(registry, LI, phone="13600000000")
    assert again in ids
    assert await registry.lookup_by_phone("136-0000-0000", accessor="ivr", role="system", reason="t") == [again]
    for key in DataKeyStore.for_engine(engine).list():
        assert key.kek_version == 2
        assert (key.rewrapped_at is not None) == (key.version < 3)

    operations = [e for e in audit.store.entries() if e.action == "key_operation"]
    summary = [(e.actor, e.role, e.details) for e in operations]
    assert summary[0][:2] == ("medhotline", "system")  # the first data key, created on first use
    assert [s[2].split('"operation":"')[1].split('"')[0] for s in summary] == [
        "generate_data_key", "generate_data_key", "rotate", "generate_data_key", "rewrap",
    ]  # fmt: skip
    assert all(s[:2] == ("admin.wu", "admin") for s in summary[1:])
    assert '"rewrapped":2' in operations[-1].details


async def test_a_second_rewrap_has_nothing_to_do(engine: Engine, keys: CountingKeys, registry: PatientRegistry) -> None:
    ring = ring_of(engine, keys)
    await register(registry, WANG)
    assert (await ring.rewrap_all(actor="admin.wu", role="admin")).rewrapped == 0  # nothing under an old KEK yet
    await ring.rotate(actor="admin.wu", role="admin")
    assert (await ring.rewrap_all(actor="admin.wu", role="admin")).rewrapped == 1
    assert await ring.rewrap_all(actor="admin.wu", role="admin") == RewrapReport(2, 0, 0, (), 0)


# --- interrupted, racing, altered ------------------------------------------------------------------------------


@dataclass
class FailingKeys(CountingKeys):
    """The real client, except that the ``fail_at``-th rewrap dies as if the key service went away."""

    fail_at: int = 0
    rewraps: int = 0
    before_return: Any = None
    hooks: list[Any] = field(default_factory=list)

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        self.rewraps += 1
        if self.rewraps == self.fail_at:
            raise KeyServiceUnavailable("connection to the key service failed: simulated crash")
        result = await self.client.rewrap(wrapped, purpose)
        if self.before_return is not None:
            await self.before_return(wrapped, result)
        return result


async def five_data_keys(engine: Engine, keys: CountingKeys, registry: PatientRegistry) -> dict[str, Person]:
    ring = ring_of(engine, keys)
    ids: dict[str, Person] = {}
    for n, person in enumerate([*PEOPLE, WANG]):
        if n:
            await ring.new_data_key("patients", actor="admin.wu", role="admin")
        ids[await register(registry, person, record_number=f"MRN-{n}")] = person
    await ring.rotate(actor="admin.wu", role="admin")
    assert kek_versions(engine) == {1: 5}
    return ids


async def test_rewrap_interrupted_halfway_is_finished_by_running_it_again(
    engine: Engine, keys: CountingKeys, registry: PatientRegistry, audit: AuditLog
) -> None:
    ids = await five_data_keys(engine, keys, registry)
    failing = FailingKeys(keys.client, fail_at=3)
    with pytest.raises(KeyServiceUnavailable):
        await ring_of(engine, failing, audit).rewrap_all(actor="admin.wu", role="admin")
    assert kek_versions(engine) == {1: 3, 2: 2}  # each row its own transaction: the first two stayed done
    await read_all(registry, ids)  # half old, half new KEK: all readable
    report = await ring_of(engine, keys, audit).rewrap_all(actor="admin.wu", role="admin")
    assert (report.rewrapped, report.remaining) == (3, 0)
    assert kek_versions(engine) == {2: 5}
    await read_all(registry, ids)


async def test_rewrap_in_batches(engine: Engine, keys: CountingKeys, registry: PatientRegistry) -> None:
    ids = await five_data_keys(engine, keys, registry)
    ring = ring_of(engine, keys)
    seen: list[int] = []
    reports = []
    while True:
        report = await ring.rewrap_all(
            limit=2, on_progress=lambda key: seen.append(key.id), actor="admin.wu", role="admin"
        )
        reports.append((report.rewrapped, report.remaining))
        await read_all(registry, ids)
        if report.remaining == 0:
            break
    assert reports == [(2, 3), (2, 1), (1, 0)]
    assert sorted(seen) == sorted(k.id for k in DataKeyStore.for_engine(engine).list())
    with pytest.raises(DataKeyError, match="at least 1"):
        await ring.rewrap_all(limit=0, actor="admin.wu", role="admin")


async def test_a_racing_rewrap_is_not_overwritten(
    engine: Engine, keys: CountingKeys, registry: PatientRegistry
) -> None:
    ids = await five_data_keys(engine, keys, registry)
    store = DataKeyStore.for_engine(engine)
    racing = FailingKeys(keys.client)

    async def other_node_got_there_first(old: bytes, new: bytes) -> None:
        # Another node rewraps the same row (its own fresh wrap) between our read and our write.
        theirs = await keys.client.rewrap(old, next(k for k in store.list() if k.wrapped == old).wrap_purpose)
        key_id = next(k.id for k in store.list() if k.wrapped == old)
        assert store.replace_wrapped(key_id, old, theirs, store.get(key_id).created_at)
        racing.before_return = None  # only once

    racing.before_return = other_node_got_there_first
    report = await ring_of(engine, racing).rewrap_all(actor="admin.wu", role="admin")
    assert (report.rewrapped, report.skipped, report.remaining) == (4, 1, 0)
    await read_all(registry, ids)


async def test_an_altered_wrapped_key_is_reported_and_the_others_are_rewrapped(
    engine: Engine, keys: CountingKeys, registry: PatientRegistry, audit: AuditLog
) -> None:
    ids = await five_data_keys(engine, keys, registry)
    store = DataKeyStore.for_engine(engine)
    victim = store.list()[2]
    altered = bytearray(victim.wrapped)
    altered[-1] ^= 0x01
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE data_keys SET wrapped = :w WHERE id = :id"), {"w": bytes(altered), "id": victim.id}
        )
    report = await ring_of(engine, keys, audit).rewrap_all(actor="admin.wu", role="admin")
    assert (report.rewrapped, report.failed, report.remaining, report.complete) == (4, (victim.id,), 1, False)
    assert store.get(victim.id).wrapped == bytes(altered)  # left exactly as it was
    last = list(audit.store.entries())[-1]
    assert (last.action, last.outcome) == ("key_operation", "error")
    unaffected = {
        pid: p for pid, p in ids.items() if PatientStore.for_engine(engine).load(pid).data_key.id != victim.id
    }
    assert len(unaffected) == 4
    await read_all(registry, unaffected)


# --- the KEK never leaves the key service -----------------------------------------------------------------------


class RecordingServer(KeyServiceServer):
    """The real server, keeping a copy of every response it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[dict[str, Any]] = []

    def dispatch(self, message: dict[str, Any], conn_log: Any = None) -> dict[str, Any]:
        response = super().dispatch(message, conn_log)
        self.responses.append(response)
        return response


@pytest.fixture
async def recording(keystore: KeyStore, short_dir: Path) -> AsyncIterator[tuple[RecordingServer, Path]]:
    server = RecordingServer(keystore, TOKEN.encode())
    socket_path = short_dir / "rec" / "ks.sock"
    await server.start_unix_server(socket_path)
    try:
        yield server, socket_path
    finally:
        await server.aclose()


def kek_forms(keydir: Path) -> list[bytes]:
    forms = []
    for path in sorted(keydir.glob("*.key")):
        key = path.read_bytes()
        forms += [
            key,
            key.hex().encode(),
            base64.b64encode(key).rstrip(b"="),
            base64.urlsafe_b64encode(key).rstrip(b"="),
        ]
    return forms


async def test_kek_never_leaves_the_key_service(
    recording: tuple[RecordingServer, Path], engine: Engine, audit: AuditLog, keystore: KeyStore, database_url: str
) -> None:
    server, socket_path = recording
    async with KeyServiceClient.unix(socket_path, TOKEN) as client:
        wrapped = CountingKeys(client)
        registry = make_registry(engine, wrapped, audit)
        ring = ring_of(engine, wrapped, audit)
        ids = {await register(registry, person): person for person in PEOPLE}
        await ring.rotate(actor="admin.wu", role="admin")
        await ring.new_data_key("patients", actor="admin.wu", role="admin")
        await ring.rewrap_all(actor="admin.wu", role="admin")
        await read_all(registry, ids)
    forms = kek_forms(keystore.directory)
    assert len(forms) == 4 * 3  # two KEKs and the blind-index key
    ops = set(wrapped.calls)
    assert ops >= {"generate_data_key", "unwrap", "rewrap", "rotate", "status", "blind_index"}
    responses = "\n".join(repr(r) for r in server.responses).encode()
    assert all(form not in responses for form in forms)
    with engine.connect() as connection:
        rows = [
            repr(tuple(r)) for t in ("data_keys", "patients") for r in connection.execute(text(f"SELECT * FROM {t}"))
        ]
    dump = "\n".join(rows).encode()
    assert all(form not in dump for form in forms)
    if database_url.startswith("sqlite"):
        engine.dispose()
        db_file = Path(database_url.removeprefix("sqlite:///"))
        for path in db_file.parent.iterdir():
            content = path.read_bytes()
            assert all(form not in content for form in forms), path


async def test_a_new_data_key_version_is_wrapped_under_the_current_kek(
    engine: Engine, keys: CountingKeys, registry: PatientRegistry
) -> None:
    ring = ring_of(engine, keys)
    await register(registry, WANG)
    await ring.rotate(actor="admin.wu", role="admin")
    new = await ring.new_data_key("patients", actor="admin.wu", role="admin")
    assert (new.version, new.kek_version) == (2, 2)
    old, current = DataKeyStore.for_engine(engine).list()
    assert (old.version, old.kek_version, current.id) == (1, 1, new.id)
    assert old.retired_at is not None
    assert (await ring.current_key("patients")).id == new.id
    with pytest.raises(DataKeyError, match="purpose"):
        await ring.new_data_key("Patients; DROP", actor="admin.wu", role="admin")
