"""The simulated HIS and the service-side HIS pieces over real MLLP on loopback (no Asterisk): PDQ against
``SimulatedHis``, an ADT^A08 from it reaching the listener the service starts from ``[his] listen_*`` and
changing the encrypted registry, the outbox's answers reaching bookings, and ``medhotline his status|outbox|retry``
on the same database. Real key service, SQLite and PostgreSQL. Privacy: logs, tables, CLI output scanned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground.config import Config, HisConfig
from his import PatientRegistry, PatientStore
from his.audit import Hl7Audit
from his.directory import PatientServices, RegistryPatientDirectory
from his.link import probe_his, start_adt_listener
from his.messages import PdqPatient, build_pdq_query, new_control_id, read_pdq_answer
from his.outbound import Appointment, build_siu
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.pdq import HisPatientDirectory
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY, SYNTHETIC_PATIENTS, SimulatedHis
from his.transport import Backoff, MllpClient
from ivr.memory_channel import InMemoryCallChannel
from medhotline.cli import main
from telephony.channel import CallerId, CallInfo

FAST = Backoff(initial=0.01, maximum=0.01)
PATIENT = SYNTHETIC_PATIENTS[0]
NEW_PHONE = "13800138177"


def caller(number: str) -> InMemoryCallChannel:
    return InMemoryCallChannel(info=CallInfo("mem-1", "PJSIP/trunk-1", "ari", "hotline", "12320", CallerId(number)))


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


@pytest.fixture
def services(engine: Engine, his_keys: KeyServiceClient, audit: AuditLog) -> PatientServices:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)
    return PatientServices(registry, RegistryPatientDirectory(registry), ring, his_keys, audit, engine)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedHis]:
    his = SimulatedHis()
    await his.start()
    try:
        yield his
    finally:
        await his.aclose()


def identifiers(*patients: PdqPatient) -> list[str]:
    return [v for p in patients for v in (p.name, p.phone, p.record_number)]


def assert_nothing_in_clear(engine: Engine, texts: list[str], secrets: list[str]) -> None:
    with engine.connect() as conn:
        for table in ("patients", "his_outbox", "audit_entries"):
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                texts.append(repr(tuple(row)))
    blob = "\n".join(texts)
    for secret in secrets:
        assert secret not in blob


async def test_pdq_against_the_simulator_identifies_and_caches(
    services: PatientServices, sim: SimulatedHis, engine: Engine
) -> None:
    assert sim.port is not None
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    directory = HisPatientDirectory(client, services.registry, audit=Hl7Audit(services.audit),
                                    sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, budget=5.0)  # fmt: skip
    try:
        with capture_logs() as logs:
            match = await directory.lookup_caller(caller(PATIENT.phone))
            unknown = await directory.lookup_caller(caller("13800138999"))
    finally:
        await client.aclose()
    assert match is not None
    assert unknown is None
    assert sim.pdq_queries == 2
    cached = await services.registry.lookup_by_record_number(PATIENT.record_number, accessor="t", role="system",
                                                            reason="t")  # fmt: skip
    assert cached is not None
    assert_nothing_in_clear(engine, [repr(logs)], identifiers(PATIENT))


async def test_an_a08_from_the_simulator_reaches_the_configured_listener(
    services: PatientServices, sim: SimulatedHis, engine: Engine
) -> None:
    config = Config(his=HisConfig(enabled=True, listen_port=0))
    started = await start_adt_listener(config, services)
    assert started is not None
    listener, port = started
    registry = services.registry
    try:
        with capture_logs() as logs:
            first = await sim.send_adt("127.0.0.1", port, PATIENT, trigger="A04")
            moved = await sim.send_adt("127.0.0.1", port, replace(PATIENT, phone=NEW_PHONE))
            broken = await sim.send_adt("127.0.0.1", port, replace(PATIENT, phone="not-a-phone"))
    finally:
        await listener.aclose()
    assert (first.code, moved.code) == ("AA", "AA")
    assert (broken.code, broken.location) == ("AR", "PID-13")
    by_new = await registry.lookup_by_phone(NEW_PHONE, accessor="t", role="system", reason="t")
    by_old = await registry.lookup_by_phone(PATIENT.phone, accessor="t", role="system", reason="t")
    assert len(by_new) == 1
    assert by_old == []
    # The listener is closed: a further ADT finds nobody (clean shutdown, the port released).
    with pytest.raises(Exception, match=r"cannot connect|lost"):
        await sim.send_adt("127.0.0.1", port, PATIENT)
    assert_nothing_in_clear(engine, [repr(logs)], [*identifiers(PATIENT), NEW_PHONE])


def test_listen_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="listen_cert_file and listen_key_file"):
        HisConfig(listen_port=0, listen_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="listen_client_ca_file needs"):
        HisConfig(listen_port=0, listen_client_ca_file=tmp_path / "ca.pem")
    assert HisConfig.model_validate({"listen_port": ""}).listen_port is None  # an env var left empty


async def test_the_simulator_answers_appointments_and_refuses_on_request(sim: SimulatedHis) -> None:
    assert sim.port is not None
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    start = datetime(2026, 12, 10, 1, 0, tzinfo=UTC)
    appointment = Appointment("bk-1", start, start + timedelta(minutes=15), "FLU", "influenza", "clinic-1")

    def siu(event: str) -> object:
        return build_siu(event, appointment, PATIENT, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY,  # type: ignore[arg-type]
                         at=start, control_id=new_control_id())  # fmt: skip

    try:
        booked = await client.request(siu("S12"))  # type: ignore[arg-type]
        sim.refuse("SIU", "AR", "AIS-3", "service not offered at this clinic")
        refused = await client.request(siu("S15"))  # type: ignore[arg-type]
        cancelled = await client.request(siu("S15"))  # type: ignore[arg-type]
        query = build_pdq_query(PATIENT.phone, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=start,
                                control_id=new_control_id())  # fmt: skip
        answer = read_pdq_answer(await client.request(query), query.control_id)
    finally:
        await client.aclose()
    assert booked.value(booked.first("MSA"), 1) == "AA"  # type: ignore[arg-type]
    assert refused.value(refused.first("MSA"), 1) == "AR"  # type: ignore[arg-type]
    assert cancelled.value(cancelled.first("MSA"), 1) == "AA"  # type: ignore[arg-type]
    assert sim.appointments["bk-1"].status == "Cancelled"
    assert answer.status == "OK"
    assert [p.record_number for p in answer.patients] == [PATIENT.record_number]


async def test_probe_says_up_and_down(sim: SimulatedHis) -> None:
    assert sim.port is not None
    assert await probe_his(HisConfig(port=sim.port)) == "up"
    await sim.aclose()
    assert (await probe_his(HisConfig(port=sim.port))).startswith("down: ")


async def test_cli_status_outbox_retry(
    services: PatientServices, sim: SimulatedHis, engine: Engine, database_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert sim.port is not None
    outbox = Outbox(OutboxStore.for_engine(engine), services.ring, audit=Hl7Audit(services.audit), node="n1",
                    backoff=FAST, max_attempts=1)  # fmt: skip
    start = datetime(2026, 12, 10, 1, 0, tzinfo=UTC)
    appointment = Appointment("bk-2", start, start + timedelta(minutes=15), "FLU", "influenza", "clinic-1")
    messages = [build_siu("S12", appointment, PATIENT, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=start,
                          control_id=new_control_id()) for _ in range(2)]  # fmt: skip
    for m in messages:
        await outbox.enqueue(m)
    sim.refuse("SIU", "AR", "AIS-3", "service not offered")
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    try:
        assert (await outbox.send_next(client)).kind == "failed"
    finally:
        await client.aclose()
    failed, pending = (m.control_id for m in messages)
    config = tmp_path / "medhotline.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n[database]\nurl = "{database_url}"\n'
                      f'[his]\nenabled = true\nport = {sim.port}\n', encoding="utf-8")  # fmt: skip

    def cli(*argv: str) -> tuple[int, str]:
        code = main(["--config", str(config), "his", *argv])
        return code, capsys.readouterr().out

    code, status = await asyncio.to_thread(cli, "status")
    assert code == 0
    assert "link: up" in status
    assert "1 pending, 1 failed" in status
    assert f"oldest pending: {pending} SIU^S12" in status
    assert f"last ACK: AR to {failed}" in status
    code, listing = await asyncio.to_thread(cli, "outbox")
    assert [line.split()[0] for line in listing.splitlines()] == [failed, pending]
    assert "AR AIS-3" in listing
    code, _ = await asyncio.to_thread(cli, "retry", failed)
    assert code == 0
    assert OutboxStore.for_engine(engine).counts() == {"pending": 2}
    assert await asyncio.to_thread(cli, "retry", "MHNOSUCHCONTROLIDXX") == (1, "")
    assert_nothing_in_clear(engine, [status, listing], identifiers(PATIENT))
