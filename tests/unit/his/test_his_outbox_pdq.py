"""The outbox and PDQ against a real key service, a real database (SQLite and PostgreSQL) and a fake HIS that is
our own MLLP server on a loopback port. Outcomes are asserted (what the HIS holds, what the tables say), never
wall-clock durations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground.models import Base
from his import PatientInput, PatientRegistry, PatientStore
from his.audit import Hl7Audit
from his.hl7 import Message, Party, header, segment
from his.messages import PdqPatient, build_ack, build_pdq_answer, new_control_id, read_pdq_query
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.pdq import HisPatientDirectory
from his.transport import Backoff, MllpClient, MllpServer
from ivr.memory_channel import InMemoryCallChannel
from telephony.channel import CallerId, CallInfo

HOTLINE = Party("MEDHOTLINE", "HOTLINE")
HIS = Party("HIS", "HOSPITAL")
NAME, PHONE, MRN = "王秀英", "13800138000", "MRN-2024-000417"
FAST = Backoff(initial=0.01, maximum=0.01)


@dataclass
class FakeHis:
    """The HIS: answers PDQ from ``patients``, acknowledges everything else with ``mode`` and remembers it."""

    patients: dict[str, list[PdqPatient]] = field(default_factory=dict)
    modes: list[Literal["AA", "AE", "AR"]] = field(default_factory=list)  # per delivery, then AA
    deliveries: list[str] = field(default_factory=list)
    stored: dict[str, bytes] = field(default_factory=dict)
    hold: asyncio.Event | None = None  # PDQ answers wait for this (a slow HIS)

    async def handle(self, message: Message) -> Message:
        now = datetime.now(UTC)
        if message.type == "QBP^Q22":
            if self.hold is not None:
                await self.hold.wait()
            _, phone = read_pdq_query(message)
            return build_pdq_answer(message, self.patients.get(phone, []), sender=HIS, at=now)
        self.deliveries.append(message.control_id)
        code = self.modes.pop(0) if self.modes else "AA"
        if code == "AA":
            self.stored.setdefault(message.control_id, message.encode())  # a duplicate control id is dropped
        return build_ack(message, code, sender=HIS, at=now)


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime(2026, 12, 9, 8, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
async def his() -> AsyncIterator[tuple[FakeHis, MllpServer, int]]:
    fake = FakeHis()
    server = MllpServer(fake.handle, sender=HIS)
    port = await server.start()
    try:
        yield fake, server, port
    finally:
        await server.aclose()


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


@pytest.fixture
def ring(engine: Engine, his_keys: KeyServiceClient, audit: AuditLog) -> DataKeyRing:
    return DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)


def make_outbox(engine: Engine, ring: DataKeyRing, audit: AuditLog, clock: Clock, node: str = "n1") -> Outbox:
    return Outbox(OutboxStore.for_engine(engine), ring, audit=Hl7Audit(audit), node=node, backoff=FAST,
                  max_attempts=3, clock=clock)  # fmt: skip


def update_message(n: int) -> Message:
    """An ADT^A08 carrying the test patient's name and phone: what must never be readable at rest."""
    head = header(sender=HOTLINE, receiver=HIS, at=datetime(2026, 12, 9, tzinfo=UTC),
                  message_type=("ADT", "A08", "ADT_A01"), control_id=new_control_id())  # fmt: skip
    pid = segment("PID", str(n), None, [MRN, "", "", "HIS", "MR"], None, [NAME], None, None, *([None] * 5), [PHONE])
    return Message((head, segment("EVN", "A08"), pid))


async def drain(outbox: Outbox, client: MllpClient, clock: Clock, steps: int = 20) -> list[str]:
    kinds: list[str] = []
    for _ in range(steps):
        step = await outbox.send_next(client)
        kinds.append(step.kind)
        if step.kind == "idle":
            break
        clock.advance(max(step.delay, 0.0) + 0.001)
    return kinds


async def test_the_outbox_sends_in_order_and_marks_sent_only_on_aa(
    engine: Engine, ring: DataKeyRing, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, _, port = his
    clock = Clock()
    outbox = make_outbox(engine, ring, audit, clock)
    messages = [update_message(n) for n in range(3)]
    for m in messages:
        assert await outbox.enqueue(m, patient="ab" * 32)
    assert not await outbox.enqueue(messages[0])  # the same control id again: stored once
    fake.modes = ["AE"]  # the first delivery meets an application error, the retry gets AA
    client = MllpClient("127.0.0.1", port, backoff=FAST)
    try:
        await drain(outbox, client, clock)
    finally:
        await client.aclose()
    ids = [m.control_id for m in messages]
    assert fake.deliveries == [ids[0], ids[0], ids[1], ids[2]]
    assert list(fake.stored) == ids
    assert fake.stored[ids[1]] == messages[1].encode()  # decrypted back to the exact bytes
    assert OutboxStore.for_engine(engine).counts() == {"sent": 3}
    first = OutboxStore.for_engine(engine).get(ids[0])
    assert first is not None
    assert (first.attempts, first.ack_code) == (2, "AA")
    sends = [e for e in audit.store.entries() if e.action == "hl7_send"]
    assert [(e.outcome, e.patient) for e in sends] == [("error", "ab" * 32)] + [("success", "ab" * 32)] * 3
    assert f'"control_id":"{ids[0]}"' in sends[0].details


async def test_nothing_is_lost_while_the_his_is_down(
    engine: Engine, ring: DataKeyRing, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, server, port = his
    await server.aclose()  # the HIS goes down; its port stays ours to reopen
    clock = Clock()
    outbox = make_outbox(engine, ring, audit, clock)
    messages = [update_message(n) for n in range(2)]
    for m in messages:
        await outbox.enqueue(m)
    client = MllpClient("127.0.0.1", port, backoff=FAST, connect_timeout=1)
    try:
        for _ in range(3):
            step = await outbox.send_next(client)
            assert step.kind == "retry"
            clock.advance(step.delay + 0.001)
            await asyncio.sleep(0.02)  # past the client's own reconnect backoff
        assert OutboxStore.for_engine(engine).counts() == {"pending": 2}
        back = MllpServer(fake.handle, sender=HIS)
        await back.start("127.0.0.1", port)
        try:
            await drain(outbox, client, clock)
        finally:
            await back.aclose()
    finally:
        await client.aclose()
    assert list(fake.stored) == [m.control_id for m in messages]
    pending = OutboxStore.for_engine(engine).list()
    assert [(e.status, e.attempts) for e in pending] == [("sent", 1), ("sent", 1)]  # outages cost no attempt


class Crash(Exception):
    """The node dies after the HIS got the message and before the AA was recorded."""


@dataclass
class CrashAfterSending:
    client: MllpClient

    async def request(self, message: Message) -> Message:
        await self.client.request(message)
        raise Crash


async def test_a_restart_mid_send_resends_the_same_control_id_once(
    engine: Engine, ring: DataKeyRing, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, _, port = his
    clock = Clock()
    message = update_message(0)
    await make_outbox(engine, ring, audit, clock).enqueue(message)
    client = MllpClient("127.0.0.1", port, backoff=FAST)
    try:
        with pytest.raises(Crash):
            await make_outbox(engine, ring, audit, clock).send_next(CrashAfterSending(client))
        # Another node sees the lease and leaves the head alone until it expires.
        assert (await make_outbox(engine, ring, audit, clock, node="n2").send_next(client)).kind == "busy"
        restarted = make_outbox(engine, ring, audit, clock)  # the same node, started again
        assert (await restarted.send_next(client)).kind == "sent"
        assert (await restarted.send_next(client)).kind == "idle"
    finally:
        await client.aclose()
    assert fake.deliveries == [message.control_id, message.control_id]
    assert list(fake.stored) == [message.control_id]


async def test_a_refused_message_is_set_aside_and_the_next_one_goes(
    engine: Engine, ring: DataKeyRing, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, _, port = his
    clock = Clock()
    outbox = make_outbox(engine, ring, audit, clock)
    refused, accepted = update_message(0), update_message(1)
    await outbox.enqueue(refused)
    await outbox.enqueue(accepted)
    fake.modes = ["AR"]
    client = MllpClient("127.0.0.1", port, backoff=FAST)
    try:
        assert await drain(outbox, client, clock) == ["failed", "sent", "idle"]
    finally:
        await client.aclose()
    entry = OutboxStore.for_engine(engine).get(refused.control_id)
    assert entry is not None
    assert (entry.status, entry.ack_code) == ("failed", "AR")
    assert list(fake.stored) == [accepted.control_id]


# --- PDQ -------------------------------------------------------------------------------------------------------


def caller(number: str) -> InMemoryCallChannel:
    return InMemoryCallChannel(info=CallInfo("mem-1", "PJSIP/trunk-1", "ari", "hotline", "12320", CallerId(number)))


def directory(client: MllpClient, registry: PatientRegistry, audit: AuditLog, budget: float) -> HisPatientDirectory:
    return HisPatientDirectory(client, registry, audit=Hl7Audit(audit), sender=HOTLINE, receiver=HIS, budget=budget)


@pytest.fixture
def registry(engine: Engine, ring: DataKeyRing, his_keys: KeyServiceClient, audit: AuditLog) -> PatientRegistry:
    return PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)


async def test_the_his_identifies_the_caller_and_the_registry_caches_it(
    registry: PatientRegistry, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, _, port = his
    fake.patients[PHONE] = [PdqPatient(MRN, NAME, PHONE, date(1949, 12, 31))]
    client = MllpClient("127.0.0.1", port)
    try:
        match = await directory(client, registry, audit, budget=10).lookup_caller(caller(PHONE))
    finally:
        await client.aclose()
    assert match is not None
    assert await registry.lookup_by_record_number(MRN, accessor="t", role="system", reason="t") == match.patient_ref
    record = await registry.get(match.patient_ref, accessor="t", role="system", reason="t")
    assert (record.name, record.birth_year) == (NAME, 1949)
    (query,) = [e for e in audit.store.entries() if e.action == "hl7_send"]
    assert (query.outcome, '"ack":"OK"' in query.details) == ("success", True)


async def test_a_late_his_is_not_waited_for_and_the_registry_answers(
    registry: PatientRegistry, audit: AuditLog, his: tuple[FakeHis, MllpServer, int]
) -> None:
    fake, _, port = his
    local = await registry.upsert(PatientInput(NAME, PHONE), accessor="registrar.chen", role="agent")
    fake.patients[PHONE] = [PdqPatient("MRN-OTHER", "其他人", PHONE)]  # what the HIS would say, too late
    fake.hold = asyncio.Event()  # the HIS answers only when released, long after the budget
    client = MllpClient("127.0.0.1", port)
    try:
        match = await directory(client, registry, audit, budget=0.05).lookup_caller(caller(PHONE))
        assert match is not None
        assert match.patient_ref == local  # the registry's answer, not the HIS's late one
        fake.hold.set()
        assert not client.connected  # the abandoned request's connection was closed, its late reply unread
    finally:
        await client.aclose()
    assert await registry.lookup_by_record_number("MRN-OTHER", accessor="t", role="system", reason="t") is None
    (query,) = [e for e in audit.store.entries() if e.action == "hl7_send"]
    assert (query.outcome, '"ack":"timeout"' in query.details) == ("error", True)


async def test_a_down_his_falls_back_to_the_registry(registry: PatientRegistry, audit: AuditLog) -> None:
    local = await registry.upsert(PatientInput(NAME, PHONE), accessor="registrar.chen", role="agent")
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = MllpClient("127.0.0.1", port)
    try:
        match = await directory(client, registry, audit, budget=5).lookup_caller(caller(PHONE))
    finally:
        await client.aclose()
    assert match is not None
    assert match.patient_ref == local


# --- privacy ---------------------------------------------------------------------------------------------------


async def test_no_identifier_in_logs_tables_or_audit(
    engine: Engine,
    ring: DataKeyRing,
    registry: PatientRegistry,
    audit: AuditLog,
    his: tuple[FakeHis, MllpServer, int],
) -> None:
    fake, _, port = his
    fake.patients[PHONE] = [PdqPatient(MRN, NAME, PHONE, date(1949, 12, 31))]
    fake.modes = ["AE", "AR"]
    clock = Clock()
    client = MllpClient("127.0.0.1", port, backoff=FAST)
    with capture_logs() as logs:
        try:
            await directory(client, registry, audit, budget=10).lookup_caller(caller(PHONE))
            outbox = make_outbox(engine, ring, audit, clock)
            await outbox.enqueue(update_message(0))
            await outbox.enqueue(update_message(1))
            await drain(outbox, client, clock)
        finally:
            await client.aclose()
    assert len(fake.stored) == 1
    secrets = (NAME, PHONE, MRN, "138-0013-8000")
    assert not [s for s in secrets if s in repr(logs)], "an identifier reached a log line"
    with engine.connect() as conn:
        tables = ["his_outbox", "patients", "audit_entries"]
        dump = repr([conn.execute(text(f"SELECT * FROM {t}")).all() for t in tables])
    assert "hl7_send" in dump  # the dump holds what was written
    assert not [s for s in secrets if s in dump], "an identifier is stored in clear"


def test_the_outbox_migration_matches_its_model(engine: Engine) -> None:
    def ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table == "his_outbox"

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
