"""Appointments from the CLI go to the HIS and what it prints follows the HIS's answer (``medhotline.his_booking``):
AA confirmed, AR refused with segment-field and code, HIS down left ``requested`` in the outbox. Real key service
(in process, reached through the configured socket and token file), real MLLP to the simulated HIS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import TOKEN_FILE, DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground.config import Config
from his import PatientInput, PatientRegistry, PatientStore
from his.messages import PdqPatient
from his.outbox_store import OutboxStore
from his.simulator import SimulatedHis
from his.transport import HisUnavailable
from medhotline import maintenance
from medhotline.his_booking import send_appointment
from scheduler.vaccination import VaccinationStore
from tests.unit.his.conftest import KEYSERVICE_TOKEN
from tests.unit.his.test_his_simulator import assert_nothing_in_clear

NAME, PHONE, MRN = "测试患者丁", "13800138104", "SIM-000104"
T0 = datetime.now(UTC)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedHis]:
    his = SimulatedHis()
    await his.start()
    try:
        yield his
    finally:
        await his.aclose()


def config_for(tmp_path: Path, his_short_dir: Path, database_url: str, port: int) -> Config:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / TOKEN_FILE).write_text(KEYSERVICE_TOKEN, encoding="utf-8")
    (state / TOKEN_FILE).chmod(0o600)
    return Config.model_validate({
        "service": {"state_dir": str(state)}, "database": {"url": database_url},
        "keyservice": {"socket": str(his_short_dir / "ks.sock")},
        "his": {"enabled": True, "port": port, "reply_timeout": 5.0, "backoff_initial": 0.05, "backoff_max": 0.05},
    })  # fmt: skip


async def test_the_cli_booking_follows_the_his_answer(
    engine: Engine, his_keys: KeyServiceClient, sim: SimulatedHis, tmp_path: Path, his_short_dir: Path,
    database_url: str,
) -> None:  # fmt: skip
    assert sim.port is not None
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)
    patient = await registry.upsert(PatientInput(NAME, PHONE, record_number=MRN), accessor="t", role="system")
    store = VaccinationStore.for_engine(engine)
    store.add_vaccine("influenza", "流感疫苗", at=T0)
    store.add_clinic("east", "东区门诊", "vaccination", at=T0)
    start = (T0 + timedelta(days=3)).replace(hour=1, minute=0, second=0, microsecond=0)
    slots = store.add_slots("east", "influenza", start, minutes=30, capacity=5, count=3, at=T0)
    config = config_for(tmp_path, his_short_dir, database_url, sim.port)

    with capture_logs() as logs:
        booked = store.book(patient, slots[0].id, T0)
        answer = await send_appointment(config, "book", booked)
        assert answer.outcome == "confirmed"
        assert store.his_state(booked.id) == ("confirmed", None)
        assert sim.appointments[booked.id].status == "Booked"

        sim.refuse("SIU", "AR", "AIS-3", "service not offered at this clinic")
        changed = store.change(booked.id, slots[1].id, T0, "t")
        refused = await send_appointment(config, "change", changed)
        assert (refused.outcome, refused.ack) == ("refused", "AR")
        assert "AIS-3" in refused.reason
        assert "NOT booked" in refused.describe()
        assert store.his_state(changed.id)[0] == "refused"

        await sim.aclose()  # the HIS goes down: the cancellation waits in the outbox
        assert store.cancel(changed.id, T0, "t")
        waiting = await send_appointment(config, "cancel", store.booking(changed.id))
        assert waiting.outcome == "requested"
        assert store.his_state(changed.id)[0] == "requested"
        entry = OutboxStore.for_engine(engine).get(waiting.control_id)
        assert entry is not None
        assert entry.status == "pending"
    texts = [repr(logs), answer.describe(), refused.describe(), waiting.describe()]
    assert_nothing_in_clear(engine, texts, [NAME, PHONE, MRN])


async def test_the_service_starts_the_listener_from_config_and_closes_it_at_stop(
    engine: Engine, his_keys: KeyServiceClient, sim: SimulatedHis, tmp_path: Path, his_short_dir: Path,
    database_url: str,
) -> None:  # fmt: skip
    assert sim.port is not None
    config = config_for(tmp_path, his_short_dir, database_url, sim.port)
    config = config.model_copy(update={"his": config.his.model_copy(update={"listen_port": 0})})
    installed: list[object] = []
    ready = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(
            maintenance.connect_patient_directory(config, installed.append, ready=lambda _: ready.set())
        )
        async with asyncio.timeout(15):
            await ready.wait()  # the listener is up before the directory is reported ready
        port = next(e["port"] for e in logs if e["event"] == "his.listener_started")
        ack = await sim.send_adt("127.0.0.1", port, PdqPatient(MRN, NAME, PHONE))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ack.code == "AA"
    assert len(installed) == 1
    assert [e["event"] for e in logs if e["event"].startswith("his.listener")] == [
        "his.listener_started", "his.listener_stopped"
    ]  # fmt: skip
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)
    assert len(await registry.lookup_by_phone(PHONE, accessor="t", role="system", reason="t")) == 1
    with pytest.raises(HisUnavailable):  # stopped means the port is closed
        await sim.send_adt("127.0.0.1", port, PdqPatient(MRN, NAME, PHONE))
    assert_nothing_in_clear(engine, [repr(logs)], [NAME, PHONE, MRN])
