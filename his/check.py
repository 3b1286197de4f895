"""``medhotline his check``: judge HL7 v2 messages as the hotline's receivers would, without a HIS. Sans-I/O.

Each message goes through the same code that answers it on the link, so the check and the receiver cannot
disagree:

1. :func:`his.hl7.parse`, the receiver's rules (MSH, encoding characters, MSH-9/10/11/12, segment ids, UTF-8);
   a missing or broken MSH is refused naming ``MSH`` or ``MSH-n``.
2. The reader of its type: ``ADT`` → :func:`his.adt.check_adt` (what the ADT listener answers AR: event, PID-3,
   -5, -13, MRG-1, and the registry's value rules); ``QBP^Q22`` → :func:`his.messages.read_pdq_query`;
   ``RSP^K22`` → :func:`his.messages.read_pdq_answer`; ``ACK``/``SRR`` → :func:`his.messages.read_ack`; ``SIU``
   → :func:`his.outbound.read_siu`; ``SRM`` → :func:`his.srm.read_srm`; ``ORU``/``VXU`` are accepted as the
   simulated HIS accepts them. Any other type is refused naming ``MSH-9`` (code 200), as the simulator does.
3. Every ``PID`` of a message the step above does not read strictly: a field the hotline relies on that is
   present but malformed (PID-3 record number, PID-7 birth date, PID-13 phone) is a refusal; one that is
   missing is a warning (the message is accepted, the hotline just cannot use it to identify the patient).

A problem is a location (``PID-7``, ``PID(2)-13``, ``MSH``) and a reason, never a field's value: the receiver's
errors are written that way (``his.hl7.Hl7Error``) and so is everything here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from compliance.fields import FieldCipherError, normalise_phone
from his.adt import check_adt
from his.hl7 import SEGMENT_SEQUENCE_ERROR, UNSUPPORTED_MESSAGE_TYPE, Hl7Error, Message, Segment, parse
from his.messages import read_ack, read_birth_date, read_pdq_answer, read_pdq_query, read_phone, read_record_number
from his.outbound import read_siu
from his.registry import PatientInputError, normalise_record_number
from his.srm import read_srm

Severity = Literal["refusal", "warning"]
# Message codes accepted after parsing with no reader of their own (the simulated HIS's rule).
ACCEPTED_AS_IS: Final = ("ORU", "VXU")
STRICT_PID: Final = ("ADT", "RSP")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a message: where (segment and field) and why; never a value."""

    severity: Severity
    location: str
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judgement of one message: its number in the file (1-based), its type when parsed, its problems."""

    number: int
    message_type: str
    problems: tuple[Problem, ...]

    @property
    def accepted(self) -> bool:
        return all(p.severity == "warning" for p in self.problems)


def split_messages(data: bytes) -> list[bytes]:
    """The messages of a file: a new one starts at an ``MSH`` line or after a blank line; LF, CRLF and CR line
    ends are all read. Each message comes back with CR segment ends, as it would travel in an MLLP frame."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    messages: list[list[bytes]] = []
    current: list[bytes] = []
    for line in _LINE_END.split(data):
        starts = line.startswith(b"MSH")
        if (not line.strip() or starts) and current:
            messages.append(current)
            current = []
        if line.strip():
            current.append(line)
    if current:
        messages.append(current)
    return [b"\r".join(m) + b"\r" for m in messages]


def check_bytes(data: bytes, now: datetime) -> list[Verdict]:
    """The verdict on each message in ``data`` (one refusal naming MSH when there is none)."""
    messages = split_messages(data)
    if not messages:
        return [Verdict(1, "", (Problem("refusal", "MSH", "no message: the file holds no segment"),))]
    return [check_message(raw, now, number) for number, raw in enumerate(messages, 1)]


def check_message(data: bytes, now: datetime, number: int = 1) -> Verdict:
    """The verdict on one message; see the module docstring for the steps."""
    try:
        message = parse(data)
    except Hl7Error as exc:
        return Verdict(number, "", (Problem("refusal", exc.location, exc.reason),))
    problems: list[Problem] = []
    try:
        _read(message, now)
    except Hl7Error as exc:
        problems.append(Problem("refusal", exc.location, exc.reason))
    # ADT and RSP^K22 readers judge every PID themselves (the first problem is the receiver's answer).
    if message.message_code not in STRICT_PID:
        for index, pid in enumerate(message.all("PID"), 1):
            problems.extend(_pid_problems(message, pid, f"PID({index})" if index > 1 else "PID"))
    return Verdict(number, message.type, tuple(dict.fromkeys(problems)))


def _read(message: Message, now: datetime) -> None:
    """Apply the receiver's reader of the message's type; Hl7Error is what the receiver answers AR with."""
    code = message.message_code
    if code == "ADT":
        check_adt(message, now)
    elif message.type == "QBP^Q22":
        read_pdq_query(message)
    elif message.type == "RSP^K22":
        read_pdq_answer(message, _acknowledged(message))
    elif code in ("ACK", "SRR"):
        read_ack(message, _acknowledged(message))
    elif code == "SIU":
        read_siu(message)
    elif code == "SRM":
        read_srm(message)
    elif code not in ACCEPTED_AS_IS:
        accepted = "ADT, QBP^Q22, RSP^K22, ACK, SIU, SRM, SRR, " + ", ".join(ACCEPTED_AS_IS)
        raise Hl7Error("MSH-9", f"message type not handled by the hotline or its HIS link ({accepted})",
                       UNSUPPORTED_MESSAGE_TYPE)  # fmt: skip


def _acknowledged(message: Message) -> str:
    # An answer is checked on its own, so the control id it must acknowledge is the one it names (MSA-2).
    msa = message.first("MSA")
    if msa is None:
        raise Hl7Error("MSA", f"{message.type} without an MSA segment", SEGMENT_SEQUENCE_ERROR)
    return message.value(msa, 2)


def _pid_problems(message: Message, pid: Segment, where: str) -> list[Problem]:
    problems: list[Problem] = []
    try:
        normalise_record_number(read_record_number(message, pid, where))
    except Hl7Error:
        problems.append(Problem("warning", f"{where}-3", "no medical record number (type MR); not matched"))
    except PatientInputError as exc:
        problems.append(Problem("refusal", f"{where}-3", str(exc)))
    if not "".join(message.components(pid, 5)[:2]).strip():
        problems.append(Problem("warning", f"{where}-5", "patient name is missing"))
    try:
        read_birth_date(message, pid, where)
    except Hl7Error as exc:
        problems.append(Problem("refusal", exc.location, exc.reason))
    phone = read_phone(message, pid)
    if not phone:
        problems.append(Problem("warning", f"{where}-13", "no phone number; the patient cannot be found by phone"))
    else:
        try:
            valid = bool(normalise_phone(phone))
        except FieldCipherError:
            valid = False
        if not valid:
            reason = "phone must be 3-20 digits, optionally with a leading + and separators"
            problems.append(Problem("refusal", f"{where}-13", reason))
    return problems
