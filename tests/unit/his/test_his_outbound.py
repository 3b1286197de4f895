"""SIU^S12/S13/S15, VXU^V04 and ORU^R01: the builders (sans-I/O, through ER7 and back), then the producer through
the outbox to a fake HIS (our MLLP server on a loopback port), on SQLite and PostgreSQL with a real key service:
the HIS's AA/AR reaches the answer hook, the patient is named by record number, the phone never leaves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from his import PatientInput, PatientRegistry, PatientStore
from his.audit import Hl7Audit
from his.hl7 import Message, Party, parse
from his.messages import Ack, PdqPatient, build_ack
from his.outbound import Appointment, Reading, build_oru, build_siu, build_vxu, read_observations, read_siu
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.producer import HisOutbound
from his.transport import Backoff, MllpClient, MllpServer
from telephony.ports import AppointmentFacts, ReadingFact, VaccinationFacts

HOTLINE = Party("MEDHOTLINE", "HOTLINE")
HIS = Party("HIS", "HOSPITAL")
AT = datetime(2026, 12, 11, 9, 30, tzinfo=UTC)
NAME, PHONE, MRN = "王秀英", "13800138000", "MRN-2024-000417"
PATIENT = PdqPatient(MRN, NAME, "")
SLOT = Appointment("b-1", AT + timedelta(days=1), AT + timedelta(days=1, hours=4), "FLU", "流感疫苗", "EAST")


def test_siu_round_trips_for_each_event() -> None:
    for event, status in (("S12", "Booked"), ("S13", "Booked"), ("S15", "Cancelled")):
        message = build_siu(event, SLOT, PATIENT, sender=HOTLINE, receiver=HIS, at=AT, control_id=f"MHX{event}")  # type: ignore[arg-type]
        summary = read_siu(parse(message.encode()))
        assert (summary.event, summary.booking_id, summary.record_number, summary.status) == (
            event, "b-1", MRN, status,
        )  # fmt: skip
        assert summary.starts_at == "20261212093000+0000"


def test_vxu_reports_a_historical_dose_and_the_reaction() -> None:
    message = parse(build_vxu(PATIENT, vaccine="FLU", vaccine_name="流感疫苗", given_at=AT, reaction=True,
                              sender=HOTLINE, receiver=HIS, at=AT, control_id="MHVXU").encode())  # fmt: skip
    rxa = message.first("RXA")
    assert rxa is not None
    assert (message.type, message.value(rxa, 5), message.value(rxa, 9)) == ("VXU^V04", "FLU", "01")
    assert read_observations(message) == [("31044-1", "Y", "")]
    quiet = build_vxu(PATIENT, vaccine="FLU", vaccine_name="x", given_at=AT, reaction=False, sender=HOTLINE,
                      receiver=HIS, at=AT, control_id="MHVXV")  # fmt: skip
    assert read_observations(quiet) == []


def test_oru_carries_each_reading_with_its_flag() -> None:
    readings = [Reading("systolic", 182.0, True), Reading("diastolic", 95.0, False), Reading("weight", 61.5, False)]
    message = parse(build_oru(PATIENT, readings, taken_at=AT, sender=HOTLINE, receiver=HIS, at=AT,
                              control_id="MHORU").encode())  # fmt: skip
    assert message.type == "ORU^R01"
    assert read_observations(message) == [("8480-6", "182", "A"), ("8462-4", "95", "N"), ("weight", "61.5", "N")]
    with pytest.raises(ValueError, match="at least one"):
        build_oru(PATIENT, [], taken_at=AT, sender=HOTLINE, receiver=HIS, at=AT, control_id="MHORV")


# --- through the outbox to a fake HIS ----------------------------------------------------------------------------


@dataclass
class FakeHis:
    """Acknowledges with the next of ``modes`` (then AA) and keeps what it accepted."""

    modes: list[str] = field(default_factory=list)
    accepted: list[Message] = field(default_factory=list)

    async def handle(self, message: Message) -> Message:
        code = self.modes.pop(0) if self.modes else "AA"
        if code == "AA":
            self.accepted.append(message)
        return build_ack(message, "AA" if code == "AA" else "AR", sender=HIS, at=datetime.now(UTC))


@dataclass
class World:
    fake: FakeHis
    outbox: Outbox
    producer: HisOutbound
    client: MllpClient
    answers: dict[str, Ack]
    patient_id: str

    async def drain(self) -> None:
        for _ in range(10):
            if (await self.outbox.send_next(self.client)).kind == "idle":
                return


@pytest.fixture
async def world(engine: Engine, his_keys: KeyServiceClient) -> AsyncIterator[World]:
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)
    patient_id = await registry.upsert(PatientInput(NAME, PHONE, record_number=MRN), accessor="his", role="system")
    answers: dict[str, Ack] = {}

    async def on_answer(control_id: str, _type: str, ack: Ack) -> None:
        answers[control_id] = ack

    outbox = Outbox(OutboxStore.for_engine(engine), ring, audit=Hl7Audit(audit), node="n1",
                    backoff=Backoff(0.0, 0.0), on_answer=on_answer)  # fmt: skip
    fake = FakeHis()
    server = MllpServer(fake.handle, sender=HIS)
    port = await server.start()
    client = MllpClient("127.0.0.1", port)
    producer = HisOutbound(registry, outbox, sender=HOTLINE, receiver=HIS)
    try:
        yield World(fake, outbox, producer, client, answers, patient_id)
    finally:
        await client.aclose()
        await server.aclose()


def facts(patient_id: str, booking: str = "b-1", changed_from: str | None = None) -> AppointmentFacts:
    return AppointmentFacts(booking, patient_id, SLOT.starts_at, SLOT.ends_at, "FLU", "流感疫苗", "EAST", changed_from)


async def test_bookings_reach_the_his_and_its_answers_come_back(world: World, engine: Engine) -> None:
    world.fake.modes = ["AA", "AR"]
    booked = await world.producer.appointment("book", facts(world.patient_id))
    changed = await world.producer.appointment("change", facts(world.patient_id, "b-2", changed_from="b-1"))
    cancelled = await world.producer.appointment("cancel", facts(world.patient_id, "b-2"))
    await world.drain()
    assert {c: a.code for c, a in world.answers.items()} == {booked: "AA", changed: "AR", cancelled: "AA"}
    summaries = [read_siu(m) for m in world.fake.accepted]
    assert [(s.event, s.booking_id, s.record_number) for s in summaries] == [("S12", "b-1", MRN), ("S15", "b-2", MRN)]
    assert OutboxStore.for_engine(engine).counts() == {"sent": 2, "failed": 1}


async def test_readings_and_vaccinations_go_out_without_the_phone(world: World, engine: Engine) -> None:
    with capture_logs() as logs:
        await world.producer.readings(world.patient_id, [ReadingFact("systolic", 182.0, True)], AT)
        await world.producer.vaccination(VaccinationFacts(world.patient_id, "FLU", "流感疫苗", AT, reaction=True))
        await world.drain()
    assert [m.type for m in world.fake.accepted] == ["ORU^R01", "VXU^V04"]
    assert all(PHONE not in m.encode().decode() for m in world.fake.accepted)  # minimised: the HIS has it
    assert read_observations(world.fake.accepted[0]) == [("8480-6", "182", "A")]
    assert not [s for s in (NAME, PHONE, MRN) if s in repr(logs)]
    with engine.connect() as conn:
        dump = repr([conn.execute(text(f"SELECT * FROM {t}")).all() for t in ("his_outbox", "audit_entries")])
    assert "hl7_send" in dump
    assert not [s for s in (NAME, PHONE, MRN) if s in dump]


async def test_a_patient_without_record_number_goes_by_the_hotline_id(world: World) -> None:
    registry = world.producer._registry  # the test's registry, to register a local-only patient
    local = await registry.upsert(PatientInput("李四", "13911112222"), accessor="t", role="system")
    await world.producer.appointment("book", facts(local, "b-9"))
    await world.drain()
    pid = world.fake.accepted[0].first("PID")
    assert pid is not None
    parts = world.fake.accepted[0].components(pid, 3)
    assert (parts[0], parts[3], parts[4]) == (local, "MEDHOTLINE", "PI")
