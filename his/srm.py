"""Appointments as requests (``[his] appointment_messages = "srm"``), sans-I/O: the hotline asks the HIS with
``SRM`` and the HIS answers ``SRR`` (HL7 v2.5 chapter 10, the placer/filler request model), instead of telling it
with ``SIU`` (the default, :mod:`his.outbound`).

- **SRM** ``S01`` request a booking, ``S02`` a rescheduling, ``S04`` a cancellation (structure ``SRM_S01``):
  ``ARQ`` in place of SIU's ``SCH`` (``ARQ-1`` placer appointment id = the hotline's booking id, ``ARQ-2`` the
  booking it replaces on S02, as SIU's ``SCH-2``; ``ARQ-6`` request event reason; ``ARQ-9``/``-10`` duration;
  ``ARQ-11`` requested start^end; ``ARQ-15`` placer contact = the sending application), then the same ``PID``
  (record number and name, no phone) and resource group as SIU (``RGS``, ``AIS-3`` the vaccine, ``AIL-3`` the clinic).
- **SRR** (structure ``SRR_S01``, same trigger as the request): ``MSA`` (AA/AE/AR, ``ERR`` as in any ACK), and
  with an AA the booking as the HIS holds it: ``SCH-1`` our placer id, ``SCH-2`` the HIS's filler id, ``SCH-25``
  filler status (``Booked``/``Cancelled``).

The outbox needs nothing new: it reads ``MSA``/``ERR`` of whatever answers (:func:`his.messages.read_ack`), so an
SRR's AA confirms the booking and its AR refuses it exactly as an ACK to an SIU does. :func:`read_srr` is the
stricter reading (the answer's type and the HIS's SCH) for callers that want the filler's id and status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from his.hl7 import REQUIRED_FIELD_MISSING, SEGMENT_SEQUENCE_ERROR, Hl7Error, Message, Party, Segment, header, segment
from his.messages import Ack, AckCode, PdqPatient, build_ack, pid_segment, read_ack, read_record_number
from his.outbound import Appointment, SiuSummary, duration_minutes, resource_segments, ts

SrmEvent = Literal["S01", "S02", "S04"]
SRM_EVENTS: Final[dict[str, SrmEvent]] = {"book": "S01", "change": "S02", "cancel": "S04"}
_REASONS: Final = {"S01": "booking requested on the hotline", "S02": "rescheduling requested", "S04": "cancellation"}


def build_srm(
    event: SrmEvent,
    appointment: Appointment,
    patient: PdqPatient,
    *,
    sender: Party,
    receiver: Party,
    at: datetime,
    control_id: str,
) -> Message:
    """SRM^S01 (request a booking), S02 (rescheduling) or S04 (cancellation) of ``appointment``."""
    a = appointment
    head = header(sender=sender, receiver=receiver, at=at, message_type=("SRM", event, "SRM_S01"),
                  control_id=control_id)  # fmt: skip
    previous = a.changed_from if event == "S02" else None
    arq = segment(
        "ARQ", [a.booking_id, "MEDHOTLINE"], [previous, "MEDHOTLINE"] if previous else None, None, None, None,
        [event, _REASONS[event]], None, None, duration_minutes(a), "min", [ts(a.starts_at), ts(a.ends_at)],
        None, None, None, [sender.application],
    )  # fmt: skip
    return Message((head, arq, pid_segment(patient), *resource_segments(a, new=event == "S01")))


def read_srm(message: Message) -> SiuSummary:
    """What a receiver (the simulated HIS) reads of an SRM: the event, ``ARQ-1``, the patient's record number, the
    requested start and the status it asks for; Hl7Error naming the segment and field."""
    if message.message_code != "SRM" or message.trigger not in SRM_EVENTS.values():
        raise Hl7Error("MSH-9", "not an SRM^S01/S02/S04", "200")
    arq, pid = message.first("ARQ"), message.first("PID")
    if arq is None or pid is None:
        raise Hl7Error("ARQ" if arq is None else "PID", "segment missing", SEGMENT_SEQUENCE_ERROR)
    booking = message.value(arq, 1)
    if not booking:
        raise Hl7Error("ARQ-1", "placer appointment id is missing", REQUIRED_FIELD_MISSING)
    status = "Cancelled" if message.trigger == "S04" else "Booked"
    return SiuSummary(message.trigger, booking, read_record_number(message, pid), message.value(arq, 11), status)


def build_srr(
    request: Message,
    code: AckCode,
    *,
    sender: Party,
    at: datetime,
    filler_id: str = "",
    status: str = "",
    error: Hl7Error | None = None,
) -> Message:
    """The SRR answering ``request`` (an SRM): MSA/ERR as :func:`his.messages.build_ack`, then with an AA the
    ``SCH`` of the booking as the HIS holds it (placer id from ``ARQ-1``, ``filler_id``, ``status``)."""
    ack = build_ack(request, code, sender=sender, at=at, error=error)
    msh = list(ack.msh.raw)
    msh[8] = "^".join(("SRR", request.trigger, "SRR_S01"))  # raw[8] is MSH-9 (raw[0] "MSH", raw[1] MSH-2)
    segments: list[Segment] = [Segment("MSH", tuple(msh)), *ack.segments[1:]]
    arq = request.first("ARQ")
    if code == "AA" and arq is not None:
        placer = request.components(arq, 1)
        segments.append(segment("SCH", placer, [filler_id, sender.application] if filler_id else None,
                                *([None] * 22), status or None))  # fmt: skip
    return Message(tuple(segments))


@dataclass(frozen=True, slots=True)
class SrrAnswer:
    """The HIS's answer to an SRM: its acknowledgement, and with an AA its filler id and status (SCH-2, SCH-25)."""

    ack: Ack
    filler_id: str = ""
    status: str = ""


def read_srr(reply: Message, request: Message) -> SrrAnswer:
    """The answer to ``request`` (an SRM we sent): Hl7Error naming MSH-9 when it is not the SRR of the same
    trigger, MSA as :func:`his.messages.read_ack`; a plain ACK (some HIS send one for an AE/AR) is accepted."""
    ack = read_ack(reply, request.control_id)
    if reply.message_code == "ACK" and not ack.accepted:
        return SrrAnswer(ack)
    if reply.message_code != "SRR" or reply.trigger != request.trigger:
        raise Hl7Error("MSH-9", f"the answer to SRM^{request.trigger} must be SRR^{request.trigger}", "200")
    sch = reply.first("SCH")
    if sch is None:
        return SrrAnswer(ack)
    return SrrAnswer(ack, reply.value(sch, 2), reply.value(sch, 25))
