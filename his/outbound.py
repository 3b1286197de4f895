"""What the hotline tells the HIS, sans-I/O: appointments (SIU^S12/S13/S15), patient-reported vaccinations
(VXU^V04) and follow-up readings (ORU^R01). Each builder takes values and returns a :class:`his.hl7.Message`;
:mod:`his.producer` reads the patient from the registry and queues the message in the outbox.

- **SIU** (IHE SWF-style scheduling, v2.5): ``SCH-1`` placer appointment id (the hotline's booking id), ``SCH-2``
  the booking it replaced (S13), ``SCH-11`` timing (``^^<minutes>^<start>^<end>``), ``SCH-25`` status
  (``Booked``/``Cancelled``); ``PID``; ``RGS``; ``AIS-3`` the service (vaccine code^name^L); ``AIL-3`` the
  location (clinic code). S12 a new booking, S13 a change (the new slot), S15 a cancellation.
- **VXU^V04**: ``ORC`` (``RE``), ``RXA`` with ``RXA-9`` = ``01^Historical information - source unspecified^NIP001``:
  the hotline only knows what the patient said, never that a dose was given; a reported reaction is an ``OBX``
  ``31044-1`` (LOINC "Reaction") = Y.
- **ORU^R01**: ``OBR-4`` follow-up readings, one ``OBX`` per reading (NM, LOINC where known, ``OBX-8`` ``A``/``N``
  from the plan's limits, ``OBX-11`` ``F``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from his.hl7 import REQUIRED_FIELD_MISSING, Hl7Error, Message, Party, Segment, header, segment
from his.messages import PdqPatient, pid_segment, read_record_number

SiuEvent = Literal["S12", "S13", "S15"]
SIU_EVENTS: Final[dict[str, SiuEvent]] = {"book": "S12", "change": "S13", "cancel": "S15"}
# LOINC codes of the readings the flows collect, with UCUM units; other kinds go as local codes without a unit.
READING_CODES: Final = {
    "systolic": ("8480-6", "Systolic blood pressure", "mm[Hg]"),
    "diastolic": ("8462-4", "Diastolic blood pressure", "mm[Hg]"),
    "glucose": ("2339-0", "Glucose [Mass/volume] in Blood", "mmol/L"),
}


def ts(at: datetime) -> str:
    """An HL7 DTM with its UTC offset (``YYYYMMDDHHMMSS+ZZZZ``)."""
    return at.strftime("%Y%m%d%H%M%S") + at.strftime("%z")


@dataclass(frozen=True, slots=True)
class Appointment:
    """The booking's side of an SIU (the patient comes separately, from the registry)."""

    booking_id: str
    starts_at: datetime
    ends_at: datetime
    service: str
    service_name: str
    location: str
    changed_from: str | None = None


def build_siu(
    event: SiuEvent,
    appointment: Appointment,
    patient: PdqPatient,
    *,
    sender: Party,
    receiver: Party,
    at: datetime,
    control_id: str,
) -> Message:
    """SIU^S12 (booked), S13 (rescheduled) or S15 (cancelled) for ``appointment`` of ``patient``."""
    a = appointment
    head = header(sender=sender, receiver=receiver, at=at, message_type=("SIU", event, "SIU_S12"),
                  control_id=control_id)  # fmt: skip
    minutes = duration_minutes(a)
    status = "Cancelled" if event == "S15" else "Booked"
    previous = a.changed_from if event == "S13" else None
    # SCH-1 placer id, -2 filler id (here: the booking replaced), -6 event reason, -11 timing, -25 status.
    sch = segment(
        "SCH", [a.booking_id, "MEDHOTLINE"], [previous, "MEDHOTLINE"] if previous else None, None, None, None,
        [event, _REASONS[event]], None, None, None, None, ["", "", minutes, ts(a.starts_at), ts(a.ends_at)],
        *([None] * 13), status,
    )  # fmt: skip
    return Message((head, sch, pid_segment(patient), *resource_segments(appointment, new=event == "S12")))


def duration_minutes(appointment: Appointment) -> str:
    """The appointment's length in whole minutes (at least 1), as SCH-9/ARQ-9/AIS-7 carry it."""
    return str(max(1, int((appointment.ends_at - appointment.starts_at).total_seconds() // 60)))


def resource_segments(appointment: Appointment, *, new: bool) -> tuple[Segment, Segment, Segment]:
    """The resource group of an SIU or SRM: ``RGS`` (A for a new booking, else U), ``AIS-3`` the service,
    ``AIL-3`` the location."""
    a = appointment
    rgs = segment("RGS", "1", "A" if new else "U")
    ais = segment("AIS", "1", None, [a.service, a.service_name, "L"], ts(a.starts_at), None, None,
                  duration_minutes(a), "min")  # fmt: skip
    ail = segment("AIL", "1", None, [a.location])
    return rgs, ais, ail


_REASONS: Final = {"S12": "booked on the hotline", "S13": "rescheduled on the hotline", "S15": "cancelled"}


@dataclass(frozen=True, slots=True)
class SiuSummary:
    """What a receiver (the simulated HIS, the tests) reads of an SIU."""

    event: str
    booking_id: str
    record_number: str
    starts_at: str
    status: str


def read_siu(message: Message) -> SiuSummary:
    """The event, booking id, patient record number, start and status of an SIU; Hl7Error naming the field."""
    if message.message_code != "SIU" or message.trigger not in SIU_EVENTS.values():
        raise Hl7Error("MSH-9", "not an SIU^S12/S13/S15", "200")
    sch, pid = message.first("SCH"), message.first("PID")
    if sch is None or pid is None:
        raise Hl7Error("SCH" if sch is None else "PID", "segment missing", "100")
    booking = message.value(sch, 1)
    if not booking:
        raise Hl7Error("SCH-1", "placer appointment id is missing", REQUIRED_FIELD_MISSING)
    return SiuSummary(
        message.trigger, booking, read_record_number(message, pid), message.value(sch, 11, 4), message.value(sch, 25)
    )


def build_vxu(
    patient: PdqPatient,
    *,
    vaccine: str,
    vaccine_name: str,
    given_at: datetime,
    reaction: bool,
    sender: Party,
    receiver: Party,
    at: datetime,
    control_id: str,
) -> Message:
    """VXU^V04: a vaccination the patient reported (historical, RXA-9 ``01``), with a reported reaction as OBX."""
    head = header(sender=sender, receiver=receiver, at=at, message_type=("VXU", "V04", "VXU_V04"),
                  control_id=control_id)  # fmt: skip
    orc = segment("ORC", "RE", None, [control_id, "MEDHOTLINE"])
    given = ts(given_at)
    # RXA-3/-4 administered, -5 the vaccine, -6 amount (999: unknown), -9 source of the information.
    rxa = segment(
        "RXA", "0", "1", given, given, [vaccine, vaccine_name, "L"], "999", None, None,
        ["01", "Historical information - source unspecified", "NIP001"],
    )  # fmt: skip
    segments: list[Segment] = [head, pid_segment(patient), orc, rxa]
    if reaction:
        segments.append(segment("OBX", "1", "CE", ["31044-1", "Reaction", "LN"], "1", ["Y", "Yes", "HL70136"],
                                None, None, None, None, None, "F", None, None, ts(at)))  # fmt: skip
    return Message(tuple(segments))


@dataclass(frozen=True, slots=True)
class Reading:
    kind: str
    value: float
    abnormal: bool


def build_oru(
    patient: PdqPatient,
    readings: Sequence[Reading],
    *,
    taken_at: datetime,
    sender: Party,
    receiver: Party,
    at: datetime,
    control_id: str,
) -> Message:
    """ORU^R01: the follow-up readings of one call, one OBX each."""
    if not readings:
        raise ValueError("an ORU^R01 carries at least one reading")
    head = header(sender=sender, receiver=receiver, at=at, message_type=("ORU", "R01", "ORU_R01"),
                  control_id=control_id)  # fmt: skip
    taken = ts(taken_at)
    obr = segment("OBR", "1", [control_id, "MEDHOTLINE"], None, ["FOLLOWUP", "Follow-up readings", "L"],
                  None, None, taken)  # fmt: skip
    segments: list[Segment] = [head, pid_segment(patient), obr]
    for i, r in enumerate(readings, 1):
        code, text, unit = READING_CODES.get(r.kind, (r.kind, r.kind, ""))
        system = "LN" if r.kind in READING_CODES else "L"
        segments.append(segment("OBX", str(i), "NM", [code, text, system], None, _number(r.value), unit or None,
                                None, "A" if r.abnormal else "N", None, None, "F", None, None, taken))  # fmt: skip
    return Message(tuple(segments))


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def read_observations(message: Message) -> list[tuple[str, str, str]]:
    """``(OBX-3 code, OBX-5 value, OBX-8 flag)`` of each OBX (what a receiver reads of an ORU or a VXU)."""
    return [(message.value(o, 3), message.value(o, 5), message.value(o, 8)) for o in message.all("OBX")]
