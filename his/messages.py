"""The messages of this slice, sans-I/O: acknowledgements (ACK with MSA/ERR) and IHE PDQ (QBP^Q22 / RSP^K22).

Acknowledgements are in original mode: the receiver answers every message with ``MSA-1`` = ``AA`` (accepted),
``AE`` (application error: the message was understood but could not be processed; sending it again may work) or
``AR`` (rejected: the message itself is not acceptable; sending the same bytes again gets the same answer).
``MSA-2`` repeats the control id acknowledged; the reason of an AE/AR is in ``ERR`` (location ``ERR-2``, HL7 error
code ``ERR-3``, text ``ERR-8``) and, for older receivers, ``MSA-3``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Final, Literal

from his.hl7 import (
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    Hl7Error,
    Message,
    Party,
    Segment,
    header,
    segment,
)

AckCode = Literal["AA", "AE", "AR"]
ACK_CODES: Final = ("AA", "AE", "AR")
# Letters only, no digit runs: a control id can go into an audit entry, whose checks refuse number-like text.
_CONTROL_ALPHABET: Final = "ABCDEFGHJKLMNPQRSTUVWXYZ"
PDQ_QUERY_NAME: Final = ("Q22", "Find Candidates", "HL7")
PDQ_PHONE_PARAMETER: Final = "@PID.13.1"


def new_control_id() -> str:
    """A fresh ``MSH-10``: ``MH`` + 18 random letters (about 82 bits), within v2.5's 20 characters."""
    return "MH" + "".join(secrets.choice(_CONTROL_ALPHABET) for _ in range(18))


# --- acknowledgements ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """What a receiver answered: the code, the control id it acknowledges, and the reason of an AE/AR."""

    code: AckCode
    acknowledged: str
    location: str = ""  # e.g. "PID-13" from ERR-2
    error_code: str = ""  # HL7 table 0357, from ERR-3
    text: str = field(default="", repr=False)  # ERR-8 or MSA-3: the peer's words, may quote a value

    @property
    def accepted(self) -> bool:
        return self.code == "AA"


def build_ack(
    received: Message,
    code: AckCode,
    *,
    sender: Party,
    at: datetime,
    error: Hl7Error | None = None,
    control_id: str | None = None,
) -> Message:
    """The ACK to ``received``; an AE/AR names the segment and field and the reason from ``error``."""
    msh = received.msh
    to = Party(received.value(msh, 3), received.value(msh, 4))
    head = header(
        sender=sender,
        receiver=to,
        at=at,
        message_type=("ACK", received.trigger, "ACK"),
        control_id=control_id or new_control_id(),
        version=received.version or "2.5",
        processing_id=received.value(msh, 11) or "P",
    )
    segments: list[Segment] = [head, segment("MSA", code, received.control_id, error.reason if error else None)]
    if error is not None:
        segments.append(_err(error))
    return Message(tuple(segments))


def build_reject(
    raw_control_id: str, error: Hl7Error, *, sender: Party, at: datetime, control_id: str | None = None
) -> Message:
    """The AR to a message too broken to parse (no usable MSH): MSA-2 echoes what could be read of MSH-10."""
    head = header(
        sender=sender,
        receiver=Party("", ""),
        at=at,
        message_type=("ACK", "", "ACK"),
        control_id=control_id or new_control_id(),
    )
    msa = segment("MSA", "AR", raw_control_id[:199], error.reason)
    return Message((head, msa, _err(error)))


def _err(error: Hl7Error) -> Segment:
    seg_id = error.segment if len(error.segment) == 3 else ""
    number = error.field
    location = [seg_id, "1", str(number)] if number is not None and seg_id else [seg_id]
    severity = "E"
    code = [error.code, _ERROR_TEXT.get(error.code, ""), "HL70357"]
    # ERR-2 location, ERR-3 HL7 error code, ERR-4 severity, ERR-8 user message (names where and why, no value).
    return segment("ERR", None, location, code, severity, None, None, None, str(error))


_ERROR_TEXT: Final = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "207": "Application internal error",
}


def read_ack(reply: Message, sent_control_id: str) -> Ack:
    """The acknowledgement in ``reply`` to the message sent as ``sent_control_id``; Hl7Error if it is none."""
    msa = reply.first("MSA")
    if msa is None:
        raise Hl7Error("MSA", "the reply has no MSA segment", SEGMENT_SEQUENCE_ERROR)
    code = reply.value(msa, 1)
    # Enhanced mode's commit codes (CA/CE/CR) are read as their application counterparts.
    code = {"CA": "AA", "CE": "AE", "CR": "AR"}.get(code, code)
    if code not in ACK_CODES:
        raise Hl7Error("MSA-1", "acknowledgement code must be AA, AE or AR", REQUIRED_FIELD_MISSING)
    acknowledged = reply.value(msa, 2)
    if acknowledged != sent_control_id:
        raise Hl7Error("MSA-2", "the reply acknowledges another message control id")
    err = reply.first("ERR")
    location = error_code = text = ""
    if err is not None:
        parts = reply.components(err, 2)
        location = f"{parts[0]}-{parts[2]}" if len(parts) >= 3 and parts[2] else (parts[0] if parts else "")
        error_code = reply.value(err, 3)
        text = reply.value(err, 8)
    text = text or reply.value(msa, 3)
    ack_code: AckCode = "AA" if code == "AA" else "AE" if code == "AE" else "AR"
    return Ack(ack_code, acknowledged, location, error_code, text)


# --- IHE PDQ: QBP^Q22 / RSP^K22 --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PdqPatient:
    """A patient as the HIS answered (PID). ``repr`` shows nothing identifying."""

    record_number: str = field(repr=False)
    name: str = field(repr=False)
    phone: str = field(repr=False)
    birth_date: date | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PdqAnswer:
    """``QAK-2``: OK (data found), NF (no data found), AE/AR (the query failed); and the patients found."""

    status: str
    patients: tuple[PdqPatient, ...] = ()


def build_pdq_query(
    phone: str, *, sender: Party, receiver: Party, at: datetime, control_id: str, query_tag: str | None = None
) -> Message:
    """QBP^Q22 asking for the patients with this phone number (QPD-3 ``@PID.13.1^<number>``)."""
    kind = ("QBP", "Q22", "QBP_Q21")
    head = header(sender=sender, receiver=receiver, at=at, message_type=kind, control_id=control_id)
    qpd = segment("QPD", PDQ_QUERY_NAME, query_tag or control_id, [PDQ_PHONE_PARAMETER, phone])
    rcp = segment("RCP", "I", ["10", "RD"])  # immediate priority, at most ten candidates
    return Message((head, qpd, rcp))


def read_pdq_query(query: Message) -> tuple[str, str]:
    """The query tag (QPD-2) and the phone number asked for; Hl7Error naming QPD when it is not one we answer."""
    if query.type != "QBP^Q22":
        raise Hl7Error("MSH-9", "not a PDQ query (QBP^Q22)", "200")
    qpd = query.first("QPD")
    if qpd is None:
        raise Hl7Error("QPD", "QBP^Q22 without a QPD segment", SEGMENT_SEQUENCE_ERROR)
    tag = query.value(qpd, 2)
    if not tag:
        raise Hl7Error("QPD-2", "query tag is missing", REQUIRED_FIELD_MISSING)
    parameter, value = query.value(qpd, 3, 1), query.value(qpd, 3, 2)
    if parameter != PDQ_PHONE_PARAMETER:
        raise Hl7Error("QPD-3", f"only {PDQ_PHONE_PARAMETER} queries are answered here")
    if not value:
        raise Hl7Error("QPD-3", "the phone number to look for is missing", REQUIRED_FIELD_MISSING)
    return tag, value


def build_pdq_answer(
    query: Message, patients: Sequence[PdqPatient], *, sender: Party, at: datetime, control_id: str | None = None
) -> Message:
    """RSP^K22 answering ``query`` with ``patients`` (QAK-2 OK or NF), one PID each."""
    tag, _ = read_pdq_query(query)
    msh = query.msh
    head = header(
        sender=sender,
        receiver=Party(query.value(msh, 3), query.value(msh, 4)),
        at=at,
        message_type=("RSP", "K22", "RSP_K21"),
        control_id=control_id or new_control_id(),
    )
    qpd = query.first("QPD")
    assert qpd is not None  # read_pdq_query checked it
    segments = [
        head,
        segment("MSA", "AA", query.control_id),
        segment("QAK", tag, "OK" if patients else "NF", PDQ_QUERY_NAME, str(len(patients))),
        qpd,
    ]
    segments.extend(pid_segment(p, i) for i, p in enumerate(patients, 1))
    return Message(tuple(segments))


def pid_segment(patient: PdqPatient, set_id: int = 1, *, authority: str = "HIS", id_type: str = "MR") -> Segment:
    """The PID of ``patient``: PID-1 set id, -3 record number (type MR), -5 name, -7 birth date, -13 phone (each
    left empty when the value is)."""
    birth = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else None
    mrn = [patient.record_number, "", "", authority, id_type]
    phone = [patient.phone] if patient.phone else None
    return segment("PID", str(set_id), None, mrn, None, [patient.name], None, birth, *([None] * 5), phone)


def read_pdq_answer(reply: Message, sent_control_id: str) -> PdqAnswer:
    """The patients in an RSP^K22 answering our query; Hl7Error naming the segment and field if malformed."""
    ack = read_ack(reply, sent_control_id)
    if not ack.accepted:
        return PdqAnswer(ack.code)
    if reply.type != "RSP^K22":
        raise Hl7Error("MSH-9", "the answer to QBP^Q22 must be RSP^K22", "200")
    qak = reply.first("QAK")
    if qak is None:
        raise Hl7Error("QAK", "RSP^K22 without a QAK segment", SEGMENT_SEQUENCE_ERROR)
    status = reply.value(qak, 2)
    if status not in ("OK", "NF", "AE", "AR"):
        raise Hl7Error("QAK-2", "query response status must be OK, NF, AE or AR")
    patients = [read_pid(reply, pid, f"PID({i})" if i > 1 else "PID") for i, pid in enumerate(reply.all("PID"), 1)]
    return PdqAnswer(status, tuple(patients))


def read_record_number(reply: Message, pid: Segment, where: str = "PID") -> str:
    """The medical record number in PID-3 (the repetition of type MR, or untyped); Hl7Error naming PID-3."""
    for rep in range(reply.repetitions(pid, 3)):
        parts = reply.components(pid, 3, rep)
        if parts and parts[0] and (len(parts) < 5 or parts[4] in ("MR", "")):
            return parts[0]
    raise Hl7Error(f"{where}-3", "no medical record number (identifier type MR)", REQUIRED_FIELD_MISSING)


def read_pid(reply: Message, pid: Segment, where: str = "PID") -> PdqPatient:
    """Record number (PID-3), name (PID-5), birth date (PID-7) and phone (PID-13) of one PID; Hl7Error names
    the field that is missing or malformed (``where`` is how the segment is named, e.g. ``PID(2)``)."""
    record = read_record_number(reply, pid, where)
    name_parts = reply.components(pid, 5)
    name = "".join(name_parts[:2]) if name_parts else ""  # Chinese names: family then given, no space
    if not name.strip():
        raise Hl7Error(f"{where}-5", "patient name is missing", REQUIRED_FIELD_MISSING)
    birth = read_birth_date(reply, pid, where)
    phone = read_phone(reply, pid)
    if not phone:
        raise Hl7Error(f"{where}-13", "home phone number is missing", REQUIRED_FIELD_MISSING)
    return PdqPatient(record, name, phone, birth)


def read_birth_date(message: Message, pid: Segment, where: str = "PID") -> date | None:
    """PID-7 (the date part of a DTM; None when empty); Hl7Error naming PID-7 when it is not YYYYMMDD."""
    raw = message.value(pid, 7)
    if not raw:
        return None
    try:
        return datetime.strptime(raw[:8], "%Y%m%d").date()
    except ValueError:
        raise Hl7Error(f"{where}-7", "date of birth must be YYYYMMDD") from None


def read_phone(message: Message, pid: Segment) -> str:
    """PID-13's first number: XTN-1, or XTN-12 (the unformatted number of v2.5 senders); "" when absent."""
    return message.value(pid, 13, 1) or message.value(pid, 13, 12)
