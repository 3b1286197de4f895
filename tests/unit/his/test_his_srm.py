"""Appointments as requests (``[his] appointment_messages = "srm"``): SRM^S01/S02/S04 and the SRR answer, sans-I/O
through ER7 and back; the simulated HIS answering SRR; the producer through the unchanged outbox to the simulator
over MLLP (SQLite and PostgreSQL, a real key service); and the setting's validation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground.config import ConfigError, HisConfig, load_config
from his import PatientInput, PatientRegistry, PatientStore
from his.audit import Hl7Audit
from his.hl7 import Hl7Error, Message, Party, parse
from his.messages import Ack, PdqPatient, build_ack, read_ack
from his.outbound import Appointment
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.producer import HisOutbound
from his.simulator import SimulatedHis
from his.srm import build_srm, build_srr, read_srm, read_srr
from his.transport import Backoff, MllpClient
from telephony.ports import AppointmentFacts

HOTLINE = Party("MEDHOTLINE", "HOTLINE")
HIS = Party("HIS", "HOSPITAL")
AT = datetime(2026, 12, 11, 9, 30, tzinfo=UTC)
NAME, PHONE, MRN = "王秀英", "13800138000", "MRN-2024-000417"
PATIENT = PdqPatient(MRN, NAME, "")
SLOT = Appointment("b-1", AT + timedelta(days=1), AT + timedelta(days=1, hours=4), "FLU", "流感疫苗", "EAST")


def srm(event: str, slot: Appointment = SLOT, control_id: str = "MHSRM") -> Message:
    return parse(build_srm(event, slot, PATIENT, sender=HOTLINE, receiver=HIS, at=AT,  # type: ignore[arg-type]
                           control_id=control_id).encode())  # fmt: skip


def test_srm_round_trips_for_each_event() -> None:
    moved = Appointment("b-2", SLOT.starts_at, SLOT.ends_at, "FLU", "流感疫苗", "EAST", changed_from="b-1")
    for event, slot, status in (("S01", SLOT, "Booked"), ("S02", moved, "Booked"), ("S04", SLOT, "Cancelled")):
        message = srm(event, slot)
        assert message.type == f"SRM^{event}"
        assert message.value(message.msh, 9, 3) == "SRM_S01"
        summary = read_srm(message)
        assert (summary.event, summary.booking_id, summary.record_number, summary.status) == (
            event, slot.booking_id, MRN, status,
        )  # fmt: skip
        assert summary.starts_at == "20261212093000+0000"
        arq = message.first("ARQ")
        assert arq is not None
        assert message.value(arq, 2) == ("b-1" if event == "S02" else "")
        assert (message.value(arq, 9), message.value(arq, 10), message.value(arq, 15)) == ("240", "min", "MEDHOTLINE")
        # The resource group is the SIU's: RGS, AIS-3 the vaccine, AIL-3 the clinic; no phone anywhere.
        assert [s.id for s in message.segments] == ["MSH", "ARQ", "PID", "RGS", "AIS", "AIL"]
        assert [message.value(message.all(s)[0], 3) for s in ("AIS", "AIL")] == ["FLU", "EAST"]
        assert message.value(message.all("RGS")[0], 2) == ("A" if event == "S01" else "U")
        assert PHONE not in message.encode().decode()


def test_read_srm_names_what_is_missing() -> None:
    good = srm("S01")
    no_arq = Message(tuple(s for s in good.segments if s.id != "ARQ"), good.encoding)
    with pytest.raises(Hl7Error) as missing:
        read_srm(no_arq)
    assert missing.value.location == "ARQ"
    siu_like = parse(good.encode().replace(b"SRM^S01^SRM_S01", b"SRM^S03^SRM_S01"))
    with pytest.raises(Hl7Error, match="MSH-9"):
        read_srm(siu_like)
    no_id = parse(good.encode().replace(b"ARQ|b-1^MEDHOTLINE|", b"ARQ||"))
    with pytest.raises(Hl7Error) as empty:
        read_srm(no_id)
    assert (empty.value.location, empty.value.code) == ("ARQ-1", "101")


def test_srr_answers_with_the_booking_as_the_his_holds_it() -> None:
    request = srm("S01")
    reply = parse(build_srr(request, "AA", sender=HIS, at=AT, filler_id="F-9", status="Booked").encode())
    assert (reply.type, reply.value(reply.msh, 9, 3)) == ("SRR^S01", "SRR_S01")
    answer = read_srr(reply, request)
    assert (answer.ack.code, answer.ack.acknowledged, answer.filler_id, answer.status) == (
        "AA", "MHSRM", "F-9", "Booked",
    )  # fmt: skip
    sch = reply.first("SCH")
    assert sch is not None
    assert reply.value(sch, 1) == "b-1"
    # The outbox's reading of any answer (MSA/ERR) takes an SRR as it takes an ACK.
    assert read_ack(reply, "MHSRM").accepted


def test_srr_refusals_and_wrong_answers() -> None:
    request = srm("S04")
    refused = parse(build_srr(request, "AR", sender=HIS, at=AT, error=Hl7Error("AIS-3", "unknown vaccine")).encode())
    assert refused.type == "SRR^S04"
    assert refused.first("SCH") is None
    answer = read_srr(refused, request)
    assert (answer.ack.code, answer.ack.location, answer.ack.error_code) == ("AR", "AIS-3", "102")
    # Some HIS answer a refusal with a plain ACK: taken as the refusal it is.
    plain = build_ack(request, "AE", sender=HIS, at=AT, error=Hl7Error("ARQ-11", "no free slot", "207"))
    assert read_srr(plain, request).ack.code == "AE"
    # An AA must be the SRR of the same trigger.
    other = parse(build_srr(srm("S01", control_id="MHSRM"), "AA", sender=HIS, at=AT).encode())
    with pytest.raises(Hl7Error, match="SRR\\^S04") as wrong:
        read_srr(other, request)
    assert wrong.value.location == "MSH-9"
    with pytest.raises(Hl7Error) as stranger:
        read_srr(parse(build_srr(srm("S04", control_id="MHOTHER"), "AA", sender=HIS, at=AT).encode()), request)
    assert stranger.value.location == "MSA-2"


async def test_the_simulated_his_answers_an_srm_with_srr() -> None:
    his = SimulatedHis()
    reply = await his.handle(srm("S01"))
    answer = read_srr(reply, srm("S01"))
    assert (answer.ack.code, answer.filler_id, answer.status) == ("AA", "HIS-b-1", "Booked")
    assert his.appointments["b-1"].status == "Booked"
    again = await his.handle(srm("S01"))  # the same control id: acknowledged, not stored twice
    assert read_srr(again, srm("S01")).ack.accepted
    assert his.received == {"MHSRM": "SRM^S01"}
    cancelled = await his.handle(srm("S04", control_id="MHCAN"))
    assert read_srr(cancelled, srm("S04", control_id="MHCAN")).status == "Cancelled"
    assert his.appointments["b-1"].status == "Cancelled"
    his.refuse("SRM", "AR", "AIS-3", "unknown vaccine")
    refused = await his.handle(srm("S01", control_id="MHREF"))
    assert refused.type == "SRR^S01"
    assert read_srr(refused, srm("S01", control_id="MHREF")).ack.location == "AIS-3"


# --- the producer through the outbox to the simulated HIS --------------------------------------------------------


@dataclass
class World:
    his: SimulatedHis
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
    his = SimulatedHis()
    port = await his.start()
    client = MllpClient("127.0.0.1", port)
    producer = HisOutbound(registry, outbox, sender=HOTLINE, receiver=HIS, appointment_messages="srm")
    try:
        yield World(his, outbox, producer, client, answers, patient_id)
    finally:
        await client.aclose()
        await his.aclose()


def facts(patient_id: str, booking: str = "b-1", changed_from: str | None = None) -> AppointmentFacts:
    return AppointmentFacts(booking, patient_id, SLOT.starts_at, SLOT.ends_at, "FLU", "流感疫苗", "EAST", changed_from)


async def test_srm_bookings_reach_the_his_and_its_srr_answers_come_back(world: World, engine: Engine) -> None:
    world.his.refuse("SRM", "AR", "AIS-3", "unknown vaccine")
    refused = await world.producer.appointment("book", facts(world.patient_id, "b-0"))
    booked = await world.producer.appointment("book", facts(world.patient_id))
    changed = await world.producer.appointment("change", facts(world.patient_id, "b-2", changed_from="b-1"))
    cancelled = await world.producer.appointment("cancel", facts(world.patient_id, "b-2"))
    await world.drain()
    answers = {c: (a.code, a.location) for c, a in world.answers.items()}
    assert answers == {refused: ("AR", "AIS-3"), booked: ("AA", ""), changed: ("AA", ""), cancelled: ("AA", "")}
    assert [world.his.received[c] for c in (booked, changed, cancelled)] == ["SRM^S01", "SRM^S02", "SRM^S04"]
    book = {b: (e.event, e.status, e.record_number) for b, e in world.his.appointments.items()}
    assert book == {"b-1": ("S01", "Booked", MRN), "b-2": ("S04", "Cancelled", MRN)}
    assert OutboxStore.for_engine(engine).counts() == {"sent": 3, "failed": 1}


# --- the setting ---------------------------------------------------------------------------------------------------


def test_appointment_messages_defaults_to_siu_and_takes_srm() -> None:
    assert HisConfig().appointment_messages == "siu"
    assert HisConfig.model_validate({"appointment_messages": "srm"}).appointment_messages == "srm"


def test_a_bad_appointment_messages_value_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="appointment_messages"):
        HisConfig.model_validate({"appointment_messages": "SRR"})
    toml = tmp_path / "medhotline.toml"
    toml.write_text('[his]\nappointment_messages = "hl7"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as from_file:
        load_config(toml, environ={})
    assert "his.appointment_messages" in str(from_file.value)
    assert "'siu' or 'srm'" in str(from_file.value)
    with pytest.raises(ConfigError) as from_env:
        load_config(toml, environ={"MEDHOTLINE__HIS__APPOINTMENT_MESSAGES": "sru"})
    assert "MEDHOTLINE__HIS__APPOINTMENT_MESSAGES" in str(from_env.value)
