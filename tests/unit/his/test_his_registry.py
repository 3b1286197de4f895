"""The patient registry against a real key service (Unix socket) and a real database (SQLite and PostgreSQL).

Covers field encryption bound to table/column/row, blind-index lookup by phone in any spelling, the IVR
directory, the access hook and the audit entries, bad input, and the absence of every test identifier from the
database files, a PostgreSQL dump, the logs and exception messages.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore, StoredEntry
from compliance.data_keys import DataKeyError, DataKeyRing, DataKeyStore
from compliance.fields import FieldDecryptError
from compliance.keyservice_client import GeneratedDataKey, KeyServiceClient, KeyServiceStatus
from compliance.keyservice_protocol import KeyServiceUnavailable
from compliance.keyservice_server import KeyServiceServer
from compliance.keystore import KeyStore
from ground import db
from ground.config import load_config
from his import (
    PatientInput,
    PatientInputError,
    PatientRegistry,
    PatientStore,
    RegistryError,
    RegistryPatientDirectory,
    open_patient_directory,
)
from ivr.memory_channel import InMemoryCallChannel
from telephony.channel import CallerId, CallInfo

TOKEN = "registry-test-token-0123456789abcdef"


@dataclass(frozen=True)
class Person:
    """A test patient and every spelling of its identifiers that must never be found in clear anywhere."""

    name: str
    phone: str
    national_id: str | None = None
    record_number: str | None = None
    birth_year: int | None = None
    department: str | None = None
    spellings: tuple[str, ...] = field(default=())

    def input(self, **changes: Any) -> PatientInput:
        base = PatientInput(
            self.name, self.phone, self.national_id, self.record_number, self.birth_year, self.department
        )
        return replace(base, **changes)

    def secrets(self) -> list[str]:
        digits = "".join(ch for ch in self.phone if ch.isdigit())
        values = [self.name, self.phone, digits, digits[-11:], *self.spellings]
        values += [v for v in (self.national_id, self.record_number) if v]
        return values


WANG = Person("王秀英", "+86 138 0013 8000", "110105194912310021", "MRN-2024-000417", 1949, "cardiology",
              ("13800138000", "138-0013-8000"))  # fmt: skip
LI = Person("李建国", "139 1234 5678", "310104198002023456", "MRN-2024-000988", 1980, "pediatrics",
            ("13912345678",))  # fmt: skip
# Li's daughter shares her father's phone (no record number: not yet in the HIS).
LI_CHILD = Person("李小雨", "13912345678", birth_year=2016, department="pediatrics")
ZHAO = Person("赵敏 Zhao Min", "021-6543-2109", "A12345678", None, None, None, ("02165432109",))
PEOPLE = (WANG, LI, LI_CHILD, ZHAO)


def all_secrets() -> list[str]:
    return sorted({s for person in PEOPLE for s in person.secrets()})


def assert_no_secret(blob: bytes | str, where: str) -> None:
    data = blob if isinstance(blob, bytes) else blob.encode("utf-8")
    found = [s for s in all_secrets() if s.encode("utf-8") in data]
    assert not found, f"{where} holds patient identifiers in clear: {found}"


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory: a Unix socket path must stay under ~100 bytes, which tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="mhpt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    return KeyStore.create(tmp_path / "keys")


@pytest.fixture
async def keyservice(keystore: KeyStore, short_dir: Path) -> AsyncIterator[Path]:
    """The key service, in process, on a real Unix socket (peer uid and token checked as in production)."""
    socket_path = short_dir / "run" / "ks.sock"
    server = KeyServiceServer(keystore, TOKEN.encode())
    await server.start_unix_server(socket_path)
    try:
        yield socket_path
    finally:
        await server.aclose()


@dataclass
class CountingKeys:
    """The real client, counting what is asked of it (to prove what happens before decryption)."""

    client: KeyServiceClient
    calls: list[str] = field(default_factory=list)

    async def generate_data_key(self, purpose: str) -> GeneratedDataKey:
        self.calls.append("generate_data_key")
        return await self.client.generate_data_key(purpose)

    async def unwrap(self, wrapped: bytes, purpose: str) -> bytearray:
        self.calls.append("unwrap")
        return await self.client.unwrap(wrapped, purpose)

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        self.calls.append("rewrap")
        return await self.client.rewrap(wrapped, purpose)

    async def rotate(self) -> int:
        self.calls.append("rotate")
        return await self.client.rotate()

    async def status(self) -> KeyServiceStatus:
        self.calls.append("status")
        return await self.client.status()

    async def blind_index(self, value: str, purpose: str) -> str:
        self.calls.append("blind_index")
        return await self.client.blind_index(value, purpose)


@pytest.fixture
async def keys(keyservice: Path) -> AsyncIterator[CountingKeys]:
    async with KeyServiceClient.unix(keyservice, TOKEN) as client:
        yield CountingKeys(client)


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


def make_registry(engine: Engine, keys: CountingKeys, audit: AuditLog | None, **kwargs: Any) -> PatientRegistry:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)
    return PatientRegistry(PatientStore.for_engine(engine), ring, keys, audit=audit, **kwargs)


@pytest.fixture
def registry(engine: Engine, keys: CountingKeys, audit: AuditLog) -> PatientRegistry:
    return make_registry(engine, keys, audit)


def entries(audit: AuditLog) -> list[StoredEntry]:
    """The audit entries about patients (key operations, such as creating the first data key, left out)."""
    return [e for e in audit.store.entries() if e.action != "key_operation"]


async def register(registry: PatientRegistry, person: Person) -> str:
    return await registry.upsert(person.input(), accessor="registrar.chen", role="agent")


def patient_events(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith("patient.")]


def channel_from(number: str) -> InMemoryCallChannel:
    info = CallInfo("mem-1", "PJSIP/trunk-00000001", "ari", "hotline", "12320", CallerId(number))
    return InMemoryCallChannel(info=info)


# --- round trips -------------------------------------------------------------------------------------------------


async def test_register_and_read_back_with_audit(registry: PatientRegistry, audit: AuditLog) -> None:
    patient_id = await register(registry, WANG)
    assert uuid.UUID(patient_id).version == 4
    record = await registry.get(patient_id, accessor="nurse.liu", role="nurse", reason="callback about results")
    assert (record.name, record.phone, record.national_id, record.record_number) == (
        WANG.name, "13800138000", WANG.national_id, WANG.record_number,
    )  # fmt: skip
    assert (record.birth_year, record.department) == (1949, "cardiology")
    assert WANG.name not in repr(record)
    assert "13800138000" not in repr(record)

    change, read = entries(audit)
    ref = await registry.ref(patient_id)
    assert len(ref.blind_id) == 64
    assert ref.blind_id != patient_id.replace("-", "")
    assert (change.action, change.actor, change.role, change.patient, change.outcome) == (
        "change", "registrar.chen", "agent", ref.blind_id, "success",
    )  # fmt: skip
    assert '"created":true' in change.details
    assert (read.action, read.actor, read.role, read.patient, read.reason) == (
        "read", "nurse.liu", "nurse", ref.blind_id, "callback about results",
    )  # fmt: skip
    for entry in (change, read):
        assert_no_secret(entry.canonical(), "an audit entry")


async def test_optional_fields_may_be_absent(registry: PatientRegistry) -> None:
    patient_id = await registry.upsert(PatientInput("刘洋", "13700000001"), accessor="registrar.chen", role="agent")
    record = await registry.get(patient_id, accessor="nurse.liu", role="nurse", reason="check")
    assert (record.national_id, record.record_number, record.birth_year, record.department) == (None,) * 4


async def test_upsert_by_record_number_updates_the_same_patient(
    registry: PatientRegistry, engine: Engine, audit: AuditLog
) -> None:
    first = await register(registry, LI)
    # The HIS sends the same record number in another spelling, with a new phone and department.
    again = await registry.upsert(
        LI.input(phone="+86 186 0000 1111", national_id=None, record_number=" mrn-2024-000988 ", department="surgery"),
        accessor="his", role="system", reason="HIS update",
    )  # fmt: skip
    assert again == first
    assert PatientStore.for_engine(engine).count() == 1
    record = await registry.get(first, accessor="nurse.liu", role="nurse", reason="check")
    assert (record.phone, record.department) == ("18600001111", "surgery")
    assert record.national_id == LI.national_id  # not given: kept
    assert await registry.lookup_by_phone(LI.phone, accessor="ivr", role="system", reason="test") == []
    assert await registry.lookup_by_phone("186-0000-1111", accessor="ivr", role="system", reason="test") == [first]
    update = entries(audit)[1]
    assert update.action == "change"
    assert '"created":false' in update.details
    assert '"department"' in update.details
    assert '"phone"' in update.details


async def test_lookup_by_phone_in_any_spelling(registry: PatientRegistry) -> None:
    wang = await register(registry, WANG)
    li = await register(registry, LI)
    child = await register(registry, LI_CHILD)
    for spelling in ("+86 138 0013 8000", "138-0013-8000", "008613800138000", "13800138000", "(138) 0013.8000"):
        assert await registry.lookup_by_phone(spelling, accessor="ivr", role="system", reason="t") == [wang]
    # A family shares one phone: both, in registration order.
    assert await registry.lookup_by_phone("+8613912345678", accessor="ivr", role="system", reason="t") == [li, child]
    assert await registry.lookup_by_phone("13999999999", accessor="ivr", role="system", reason="t") == []
    found = await registry.lookup_by_record_number("mrn-2024-000417", accessor="his", role="system", reason="t")
    assert found == wang
    assert await registry.lookup_by_record_number("MRN-0", accessor="his", role="system", reason="t") is None


async def test_concurrent_registrations_share_one_data_key_and_one_record(
    registry: PatientRegistry, engine: Engine
) -> None:
    results = await asyncio.gather(*(register(registry, WANG) for _ in range(4)), register(registry, ZHAO))
    assert len(set(results[:4])) == 1  # same record number: one patient
    assert PatientStore.for_engine(engine).count() == 2
    assert [(k.purpose, k.version) for k in DataKeyStore.for_engine(engine).list()] == [("patients", 1)]


# --- encryption bound to its place --------------------------------------------------------------------------------


async def test_ciphertext_moved_to_another_row_fails(
    registry: PatientRegistry, engine: Engine, audit: AuditLog
) -> None:
    wang, li = await register(registry, WANG), await register(registry, LI)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE patients SET name_enc = (SELECT name_enc FROM patients WHERE id = :src) WHERE id = :dst"),
            {"src": wang, "dst": li},
        )
    with pytest.raises(FieldDecryptError) as info:
        await registry.get(li, accessor="nurse.liu", role="nurse", reason="check")
    assert f"patients.name_enc of row {li}" in str(info.value)
    assert_no_secret(str(info.value), "the error message")
    assert entries(audit)[-1].outcome == "error"  # the failed read is audited too
    # Wang's own record still reads.
    assert (await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")).name == WANG.name


async def test_ciphertext_moved_to_another_column_fails(registry: PatientRegistry, engine: Engine) -> None:
    wang = await register(registry, WANG)
    with engine.begin() as connection:
        connection.execute(text("UPDATE patients SET name_enc = phone_enc WHERE id = :id"), {"id": wang})
    with pytest.raises(FieldDecryptError, match=r"patients\.name_enc"):
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")


async def test_wrong_data_key_fails(registry: PatientRegistry, engine: Engine, keys: CountingKeys) -> None:
    wang = await register(registry, WANG)
    # A genuine wrapped key for the same purpose, but not the one the data was encrypted under.
    other = await keys.client.generate_data_key("dek:patients:v1")
    other.wipe()
    with engine.begin() as connection:
        connection.execute(text("UPDATE data_keys SET wrapped = :w"), {"w": other.wrapped})
    with pytest.raises(FieldDecryptError, match="authentication failed"):
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")
    # A wrapped key of another purpose (or altered) is refused by the key service itself.
    foreign = await keys.client.generate_data_key("dek:calls:v1")
    with engine.begin() as connection:
        connection.execute(text("UPDATE data_keys SET wrapped = :w"), {"w": foreign.wrapped})
    with pytest.raises(DataKeyError, match="does not unwrap"):
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")


async def test_rows_keep_their_data_key_version_when_a_new_one_starts(
    registry: PatientRegistry, engine: Engine, keys: CountingKeys
) -> None:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), keys)
    wang = await register(registry, WANG)
    second = await ring.new_data_key("patients", actor="admin.wu", role="admin", reason="yearly key change")
    assert second.version == 2
    li = await register(registry, LI)
    records = [await registry.get(p, accessor="nurse.liu", role="nurse", reason="check") for p in (wang, li)]
    assert [r.name for r in records] == [WANG.name, LI.name]
    stored = {p: PatientStore.for_engine(engine).load(p).data_key.version for p in (wang, li)}
    assert stored == {wang: 1, li: 2}
    # The token's version byte must agree with the row's key: pointing Wang at key v2 fails to decrypt.
    with engine.begin() as connection:
        connection.execute(text("UPDATE patients SET data_key_id = :k WHERE id = :id"), {"k": second.id, "id": wang})
    with pytest.raises(FieldDecryptError, match="data key version 1 is not loaded"):
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")


# --- access hook and audit rules -----------------------------------------------------------------------------------


class Denied(Exception):
    pass


async def test_denied_access_happens_before_any_decryption(engine: Engine, keys: CountingKeys, audit: AuditLog) -> None:
    asked: list[tuple[str, str, str]] = []

    async def authorize(accessor: str, action: str, patient_id: str) -> None:
        asked.append((accessor, action, patient_id))
        if accessor == "intruder":
            raise Denied("not in scope")

    registry = make_registry(engine, keys, audit, authorize=authorize)
    wang = await register(registry, WANG)
    await registry.upsert(WANG.input(), accessor="his", role="system")
    assert [(a, act) for a, act, _ in asked] == [("registrar.chen", "create"), ("his", "change")]
    before_calls, before_entries = len(keys.calls), len(entries(audit))
    with pytest.raises(Denied):
        await registry.get(wang, accessor="intruder", role="agent", reason="curious")
    assert keys.calls[before_calls:] == []  # no unwrap: nothing was decrypted
    assert len(entries(audit)) == before_entries  # the policy layer audits its own denials
    assert asked[-1] == ("intruder", "read", wang)


async def test_read_needs_an_auditable_reason(registry: PatientRegistry, keys: CountingKeys) -> None:
    wang = await register(registry, WANG)
    before = len(keys.calls)
    with pytest.raises(RegistryError, match="needs a reason"):
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="  ")
    with pytest.raises(RegistryError, match="cannot audit") as info:
        await registry.get(wang, accessor="nurse.liu", role="nurse", reason="patient called from 13800138000")
    assert "13800138000" not in str(info.value)
    with pytest.raises(RegistryError, match="cannot audit"):
        await registry.get(wang, accessor="王秀英", role="nurse", reason="check")
    assert keys.calls[before:] == []


@pytest.mark.parametrize(
    ("changes", "field_named"),
    [
        ({"phone": "call me maybe"}, "phone"),
        ({"phone": "12"}, "phone"),
        ({"name": "   "}, "name"),
        ({"name": "王\x00秀英"}, "name"),
        ({"birth_year": 1700}, "birth year"),
        ({"birth_year": 3000}, "birth year"),
        ({"national_id": "11-01"}, "national id"),
        ({"record_number": "MRN 2024 000417"}, "record number"),
        ({"department": "Cardiology Ward"}, "department"),
    ],
)
async def test_bad_input_is_refused_naming_the_field_not_the_value(
    registry: PatientRegistry, engine: Engine, keys: CountingKeys, changes: dict[str, Any], field_named: str
) -> None:
    with pytest.raises(PatientInputError) as info:
        await registry.upsert(WANG.input(**changes), accessor="registrar.chen", role="agent")
    message = str(info.value)
    assert field_named in message
    assert_no_secret(message, "the error message")
    for value in changes.values():
        if isinstance(value, str) and value.strip():
            assert value not in message
    assert PatientStore.for_engine(engine).count() == 0
    assert keys.calls == []  # refused before the key service was asked anything


async def test_bad_input_leaves_stored_patients_untouched(registry: PatientRegistry) -> None:
    wang = await register(registry, WANG)
    with pytest.raises(PatientInputError):
        await registry.upsert(WANG.input(phone="x"), accessor="his", role="system")
    assert (await registry.get(wang, accessor="nurse.liu", role="nurse", reason="check")).phone == "13800138000"


async def test_a_patient_id_that_is_not_a_uuid_is_not_echoed(registry: PatientRegistry) -> None:
    with pytest.raises(PatientInputError) as info:
        await registry.get("13800138000", accessor="nurse.liu", role="nurse", reason="check")
    assert "13800138000" not in str(info.value)
    with pytest.raises(db.DatabaseError, match="no patient"):
        await registry.get(str(uuid.uuid4()), accessor="nurse.liu", role="nurse", reason="check")


def test_inputs_do_not_show_their_values() -> None:
    shown = repr(WANG.input())
    assert_no_secret(shown, "repr(PatientInput)")
    assert "cardiology" in shown


# --- the IVR directory -----------------------------------------------------------------------------------------------


async def test_directory_identifies_a_single_caller_and_audits_it(registry: PatientRegistry, audit: AuditLog) -> None:
    wang = await register(registry, WANG)
    directory = RegistryPatientDirectory(registry)
    with capture_logs() as logs:
        match = await directory.lookup_caller(channel_from("+86 138-0013-8000"))
    assert match is not None
    assert match.patient_ref == wang
    entry = entries(audit)[-1]
    assert (entry.actor, entry.role, entry.action, entry.reason) == ("ivr", "system", "read", "caller identification")
    assert entry.patient == (await registry.ref(wang)).blind_id
    assert patient_events(logs) == ["patient.identified"]
    assert_no_secret(repr(logs), "the logs")


async def test_directory_refuses_to_guess_between_relatives(registry: PatientRegistry, audit: AuditLog) -> None:
    await register(registry, LI)
    await register(registry, LI_CHILD)
    with capture_logs() as logs:
        assert await RegistryPatientDirectory(registry).lookup_caller(channel_from("13912345678")) is None
    ambiguous = [e for e in logs if e["event"] == "patient.lookup_ambiguous"]
    assert ambiguous == [{"event": "patient.lookup_ambiguous", "matches": 2, "log_level": "warning"}]
    entry = entries(audit)[-1]
    assert entry.patient is None
    assert '"matches":2' in entry.details


@pytest.mark.parametrize(("number", "event"), [("", "patient.lookup_no_caller_id"),
                                                ("anonymous", "patient.lookup_unusable_number"),
                                                ("13700000000", "patient.lookup_not_found")])  # fmt: skip
async def test_directory_unknown_callers(registry: PatientRegistry, number: str, event: str) -> None:
    await register(registry, WANG)
    with capture_logs() as logs:
        assert await RegistryPatientDirectory(registry).lookup_caller(channel_from(number)) is None
    assert patient_events(logs) == [event]


async def test_directory_survives_a_key_service_outage(engine: Engine, audit: AuditLog, short_dir: Path) -> None:
    async with KeyServiceClient.unix(short_dir / "nothing.sock", TOKEN, timeout=1) as client:
        registry = make_registry(engine, CountingKeys(client), audit)
        with capture_logs() as logs:
            assert await RegistryPatientDirectory(registry).lookup_caller(channel_from("13800138000")) is None
    assert patient_events(logs) == ["patient.lookup_failed"]
    assert logs[-1]["error"] == "KeyServiceUnavailable"
    assert_no_secret(repr(logs), "the logs")


async def test_open_patient_directory_from_config(tmp_path: Path, short_dir: Path, keystore: KeyStore) -> None:
    state = tmp_path / "state"
    socket_path = short_dir / "run" / "ks.sock"
    config_path = tmp_path / "medhotline.toml"
    config_path.write_text(
        f'[service]\nstate_dir = "{state}"\n[keyservice]\nsocket = "{socket_path}"\ndirectory = "{tmp_path / "k"}"\n',
        encoding="utf-8",
    )
    config = load_config(config_path, environ={})
    db.upgrade(config.database_url)
    with pytest.raises(KeyServiceUnavailable, match="not running: no socket at"):
        await open_patient_directory(config)
    state.mkdir(mode=0o700, exist_ok=True)
    token_path = state / "keyservice.token"
    token_path.write_text(TOKEN, encoding="utf-8")
    os.chmod(token_path, 0o600)
    server = KeyServiceServer(keystore, TOKEN.encode())
    await server.start_unix_server(socket_path)
    try:
        async with await open_patient_directory(config) as services:
            wang = await services.registry.upsert(WANG.input(), accessor="registrar.chen", role="agent")
            match = await services.directory.lookup_caller(channel_from("138 0013 8000"))
            assert match is not None
            assert match.patient_ref == wang
            assert [e.action for e in services.audit.store.entries()] == ["key_operation", "change", "read"]
    finally:
        await server.aclose()


# --- nothing in clear ---------------------------------------------------------------------------------------------


async def exercise(registry: PatientRegistry) -> list[str]:
    """Register, look up, read and fail in every way the tests know; returns the error messages seen."""
    ids = [await register(registry, person) for person in PEOPLE]
    directory = RegistryPatientDirectory(registry)
    for person in PEOPLE:
        for spelling in (person.phone, *person.spellings):
            await directory.lookup_caller(channel_from(spelling))
    for patient_id in ids:
        await registry.get(patient_id, accessor="nurse.liu", role="nurse", reason="follow-up call")
    messages = []
    for person in PEOPLE:
        for bad in ({"phone": person.name}, {"birth_year": 1}, {"national_id": person.name}):
            with pytest.raises(PatientInputError) as info:
                await registry.upsert(person.input(**bad), accessor="registrar.chen", role="agent")
            messages.append(str(info.value))
        with pytest.raises(RegistryError) as reg_info:
            await registry.get(ids[0], accessor="nurse.liu", role="nurse", reason=f"asked by {person.phone}")
        messages.append(str(reg_info.value))
    return messages


async def test_sqlite_file_logs_and_errors_hold_no_identifier(
    tmp_path: Path, keys: CountingKeys, short_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        registry = make_registry(engine, keys, AuditLog(SqlAuditStore(engine)))
        with capture_logs() as logs:
            messages = await exercise(registry)
    finally:
        engine.dispose()
    files = sorted(p for p in (tmp_path / "state").iterdir() if p.is_file())
    assert files
    assert files[0].name == "medhotline.db"
    for path in files:  # the database, its WAL and shared-memory files
        assert_no_secret(path.read_bytes(), str(path))
    assert logs, "the operations logged nothing: the log check would prove nothing"
    assert_no_secret(repr(logs), "the captured logs")
    assert_no_secret("\n".join(messages), "the exception messages")


def _pg_dump() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))
    return found[-1] if found else shutil.which("pg_dump")


@pytest.mark.postgres
async def test_postgres_dump_holds_no_identifier(postgres_url: str, keys: CountingKeys) -> None:
    db.upgrade(postgres_url)
    engine = db.make_engine(postgres_url)
    try:
        registry = make_registry(engine, keys, AuditLog(SqlAuditStore(engine)))
        await exercise(registry)
        # Every column of every table, as text: the check does not depend on pg_dump being installed.
        with engine.connect() as connection:
            tables = connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
            as_text = [
                str(row) for table in list(tables) for row in connection.execute(text(f'SELECT * FROM "{table}"'))
            ]
    finally:
        engine.dispose()
    assert any("patients" in t or len(t) > 100 for t in as_text)
    assert_no_secret("\n".join(as_text), "the PostgreSQL tables")
    pg_dump = _pg_dump()
    if pg_dump is None:
        pytest.skip("pg_dump is not installed; the SELECT scan above ran")
    url = make_url(postgres_url)
    dump = subprocess.run(  # noqa: ASYNC221 (a test: blocking the loop for pg_dump is fine)
        [pg_dump, "--host", str(url.host), "--port", str(url.port), "--username", str(url.username),
         "--no-password", "--format", "plain", "--inserts", str(url.database)],
        capture_output=True, check=True, timeout=60, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    ).stdout  # fmt: skip
    assert b"INSERT INTO public.patients" in dump
    assert b"INSERT INTO public.data_keys" in dump
    assert_no_secret(dump, "the pg_dump output")
