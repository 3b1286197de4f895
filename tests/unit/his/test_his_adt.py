"""ADT^A01/A04/A08/A40 from the HIS into the encrypted registry: the sans-I/O reader, then the receiver behind our
own MLLP server on a loopback port, on SQLite and PostgreSQL with a real key service. Asserts on the ACKs, the
registry and the audit log; the privacy test scans logs, tables and the errors for the test patient."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import Engine, text
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from his import PatientRegistry, PatientStore
from his.adt import AdtReceiver, build_adt, read_adt
from his.audit import Hl7Audit
from his.hl7 import Hl7Error, Message, Party, header, parse, segment
from his.messages import Ack, PdqPatient, new_control_id, read_ack
from his.transport import MllpClient, MllpServer

HOTLINE = Party("MEDHOTLINE", "HOTLINE")
HIS = Party("HIS", "HOSPITAL")
AT = datetime(2026, 12, 11, 9, 30, tzinfo=UTC)
NAME, PHONE, NEW_PHONE, MRN = "王秀英", "13800138000", "13900139000", "MRN-2024-000417"
OTHER_NAME, OTHER_MRN = "王秀英乙", "MRN-2024-000999"
PATIENT = PdqPatient(MRN, NAME, PHONE, date(1949, 12, 31))


def adt(trigger: str, patient: PdqPatient = PATIENT, merged: str | None = None) -> Message:
    return build_adt(trigger, patient, sender=HIS, receiver=HOTLINE, at=AT, control_id=new_control_id(),
                     merged_record=merged)  # fmt: skip


# --- the reader (sans-I/O) ---------------------------------------------------------------------------------------


def test_a_registration_reads_back_through_er7() -> None:
    event = read_adt(parse(adt("A04").encode()))
    assert (event.trigger, event.patient, event.merged_record) == ("A04", PATIENT, None)


def test_a_merge_names_survivor_and_merged() -> None:
    event = read_adt(parse(adt("A40", PdqPatient(MRN, "", ""), merged=OTHER_MRN).encode()))
    assert (event.trigger, event.patient.record_number, event.merged_record) == ("A40", MRN, OTHER_MRN)


def _without(message: Message, seg_id: str, number: int) -> Message:
    """``message`` with field ``number`` of its ``seg_id`` segment emptied."""
    out = []
    for seg in message.segments:
        raw = list(seg.raw)
        if seg.id == seg_id:
            raw[number] = ""
        out.append(type(seg)(seg.id, tuple(raw)))
    return Message(tuple(out))


@pytest.mark.parametrize(
    ("message", "location"),
    [
        (_without(adt("A08"), "PID", 3), "PID-3"),
        (_without(adt("A08"), "PID", 13), "PID-13"),
        (_without(adt("A08"), "PID", 5), "PID-5"),
        (_without(adt("A40", merged=OTHER_MRN), "MRG", 1), "MRG-1"),
        (Message(tuple(s for s in adt("A40", merged=OTHER_MRN).segments if s.id != "MRG")), "MRG"),
        (Message(tuple(s for s in adt("A01").segments if s.id != "PID")), "PID"),
    ],
)
def test_missing_fields_are_named(message: Message, location: str) -> None:
    with pytest.raises(Hl7Error) as caught:
        read_adt(parse(message.encode()))
    assert caught.value.location == location
    assert PHONE not in str(caught.value)
    assert NAME not in str(caught.value)


def test_an_unsupported_event_is_refused_naming_msh9() -> None:
    head = header(sender=HIS, receiver=HOTLINE, at=AT, message_type=("ADT", "A03", "ADT_A03"), control_id="X1")
    with pytest.raises(Hl7Error) as caught:
        read_adt(Message((head, segment("PID", "1"))))
    assert (caught.value.location, caught.value.code) == ("MSH-9", "201")


# --- the receiver on a real database and a real socket -----------------------------------------------------------


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


@pytest.fixture
def registry(engine: Engine, his_keys: KeyServiceClient, audit: AuditLog) -> PatientRegistry:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    return PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)


@dataclass
class Hotline:
    """Our ADT receiver behind our MLLP server, and a client that plays the HIS."""

    registry: PatientRegistry
    client: MllpClient

    async def send(self, message: Message) -> Ack:
        return read_ack(await self.client.request(message), message.control_id)

    async def by_phone(self, phone: str) -> list[str]:
        return await self.registry.lookup_by_phone(phone, accessor="t", role="system", reason="t")

    async def by_record(self, record: str) -> str | None:
        return await self.registry.lookup_by_record_number(record, accessor="t", role="system", reason="t")


@pytest.fixture
async def hotline(registry: PatientRegistry, audit: AuditLog) -> AsyncIterator[Hotline]:
    receiver = AdtReceiver(registry, audit=Hl7Audit(audit), sender=HOTLINE)
    server = MllpServer(receiver.handle, sender=HOTLINE, observer=receiver.observe)
    port = await server.start()
    client = MllpClient("127.0.0.1", port)
    try:
        yield Hotline(registry, client)
    finally:
        await client.aclose()
        await server.aclose()


def receives(audit: AuditLog) -> list[tuple[str, str | None, str]]:
    return [(e.outcome, e.patient, e.details) for e in audit.store.entries() if e.action == "hl7_receive"]


async def test_register_then_a_new_phone_number_identifies_the_patient(hotline: Hotline, audit: AuditLog) -> None:
    assert (await hotline.send(adt("A04"))).code == "AA"
    (patient,) = await hotline.by_phone(PHONE)
    moved = PdqPatient(MRN, NAME, NEW_PHONE, PATIENT.birth_date)
    assert (await hotline.send(adt("A08", moved))).code == "AA"
    assert await hotline.by_phone(NEW_PHONE) == [patient]  # the same record, found by its new number
    assert await hotline.by_phone(PHONE) == []
    record = await hotline.registry.get(patient, accessor="t", role="system", reason="t")
    assert (record.phone, record.birth_year) == (NEW_PHONE, 1949)
    blind = (await hotline.registry.ref(patient)).blind_id
    entries = receives(audit)
    assert [(o, p) for o, p, _ in entries] == [("success", blind), ("success", blind)]
    assert '"type":"ADT^A04"' in entries[0][2]
    assert '"ack":"AA"' in entries[0][2]


async def test_a_merge_keeps_both_records_and_resolves_to_the_survivor(hotline: Hotline, audit: AuditLog) -> None:
    await hotline.send(adt("A04"))
    await hotline.send(adt("A04", PdqPatient(OTHER_MRN, OTHER_NAME, NEW_PHONE)))
    survivor, merged = await hotline.by_record(MRN), await hotline.by_record(OTHER_MRN)
    assert survivor is not None
    assert merged is not None
    assert survivor != merged
    merge = adt("A40", PdqPatient(MRN, NAME, PHONE), merged=OTHER_MRN)
    assert (await hotline.send(merge)).code == "AA"
    assert (await hotline.send(merge)).code == "AA"  # the HIS sent it again (a lost AA): nothing more changes
    assert await hotline.by_record(OTHER_MRN) == survivor  # the merged number finds the survivor
    assert await hotline.registry.resolve(merged) == survivor
    assert await hotline.by_phone(NEW_PHONE) == []  # the merged record no longer answers a call
    # Both records and both histories stay: the merged row is read as it was, its audit entries are kept.
    old = await hotline.registry.get(merged, accessor="t", role="system", reason="t")
    assert old.record_number == OTHER_MRN
    merged_blind = (await hotline.registry.ref(merged)).blind_id
    changes = [e for e in audit.store.entries() if e.action == "change" and e.patient == merged_blind]
    assert [('"merge":"merged"' in e.details) for e in changes] == [False, True]
    # An update sent under the merged number lands on the survivor, which keeps its own record number.
    assert (await hotline.send(adt("A08", PdqPatient(OTHER_MRN, NAME, "13700137000")))).code == "AA"
    now = await hotline.registry.get(survivor, accessor="t", role="system", reason="t")
    assert (now.phone, now.record_number) == ("13700137000", MRN)


async def test_invalid_messages_are_refused_naming_the_field_and_change_nothing(
    hotline: Hotline, audit: AuditLog, engine: Engine
) -> None:
    await hotline.send(adt("A04"))
    before = PatientStore.for_engine(engine).count()
    no_mrn = await hotline.send(_without(adt("A08", PdqPatient(MRN, NAME, NEW_PHONE)), "PID", 3))
    assert (no_mrn.code, no_mrn.location, no_mrn.error_code) == ("AR", "PID-3", "101")
    bad_phone = await hotline.send(adt("A08", PdqPatient(MRN, NAME, "call me")))
    assert (bad_phone.code, bad_phone.location) == ("AR", "PID-13")
    unknown = await hotline.send(adt("A40", PdqPatient(MRN, NAME, PHONE), merged="MRN-NOT-HERE"))
    assert (unknown.code, unknown.location, unknown.error_code) == ("AE", "MRG-1", "204")
    unknown_survivor = await hotline.send(adt("A40", PdqPatient("MRN-NOT-HERE", "", ""), merged=MRN))
    assert (unknown_survivor.code, unknown_survivor.location) == ("AE", "PID-3")
    assert PatientStore.for_engine(engine).count() == before
    assert len(await hotline.by_phone(PHONE)) == 1  # the stored record is as it was
    outcomes = [(o, '"ack":"A' in d) for o, _, d in receives(audit)]
    assert outcomes == [("success", True)] + [("error", True)] * 4


async def test_an_unparseable_message_is_audited_and_the_connection_survives(hotline: Hotline, audit: AuditLog) -> None:
    broken = Message((segment("PID", "1", None, [MRN], None, [NAME]),))  # no MSH at all
    reply = await hotline.client.request(broken)
    msa = reply.first("MSA")
    assert msa is not None
    assert reply.value(msa, 1) == "AR"
    assert (await hotline.send(adt("A04"))).code == "AA"  # the same connection goes on
    assert [(o, '"type":"unparsed"' in d) for o, _, d in receives(audit)] == [("error", True), ("success", False)]


async def test_no_identifier_in_logs_tables_or_errors(hotline: Hotline, audit: AuditLog, engine: Engine) -> None:
    acks = []
    with capture_logs() as logs:
        acks.append(await hotline.send(adt("A04")))
        acks.append(await hotline.send(adt("A08", PdqPatient(MRN, NAME, NEW_PHONE))))
        acks.append(await hotline.send(adt("A04", PdqPatient(OTHER_MRN, OTHER_NAME, PHONE))))
        acks.append(await hotline.send(adt("A40", PdqPatient(MRN, NAME, NEW_PHONE), merged=OTHER_MRN)))
        acks.append(await hotline.send(adt("A08", PdqPatient(MRN, NAME, "call " + PHONE))))  # refused
        acks.append(await hotline.send(adt("A40", PdqPatient(MRN, NAME, PHONE), merged="MRN-NOT-HERE")))
    assert [a.code for a in acks] == ["AA", "AA", "AA", "AA", "AR", "AE"]
    secrets = (NAME, OTHER_NAME, PHONE, NEW_PHONE, MRN, OTHER_MRN, "138-0013-8000")
    assert not [s for s in secrets if s in repr(logs)], "an identifier reached a log line"
    assert not [s for s in secrets if s in repr([(a.location, a.text) for a in acks])], "an identifier in an ACK"
    with engine.connect() as conn:
        dump = repr([conn.execute(text(f"SELECT * FROM {t}")).all() for t in ("patients", "audit_entries")])
    assert "hl7_receive" in dump
    assert not [s for s in secrets if s in dump], "an identifier is stored in clear"
