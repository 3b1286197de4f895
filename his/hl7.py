"""HL7 v2 messages in ER7 (pipe) encoding: parse, read fields, build, encode. Sans-I/O.

The receiver's rules, in the order it applies them (each failure is an :class:`Hl7Error` naming the segment and
field, e.g. ``MSH-9``, ``PID-13``, and carrying the HL7 error code of table 0357 for the ERR segment of the NAK):

- the bytes are UTF-8 (``MSH-18`` is read as ``UNICODE UTF-8``; the hotline sends nothing else); one leading
  byte order mark is not part of the message (Windows tools write it; the CDC/NIST VXU samples have it);
- the first segment is ``MSH`` with a field separator and 4 (v2.7: 5) distinct encoding characters (``MSH-2``);
- every segment id is three upper-case letters or digits, starting with a letter;
- ``MSH-9`` (message code ^ trigger event), ``MSH-10`` (control id), ``MSH-11`` (processing id ``P``/``D``/``T``)
  and ``MSH-12`` (a 2.x version) are present and well formed: the hotline cannot answer without them.

An error message never includes a field's value: a value may be a phone number or a name.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from ground.errors import MedhotlineError

# HL7 table 0357 (message error condition codes) used in ERR-3 of a NAK.
SEGMENT_SEQUENCE_ERROR: Final = "100"
REQUIRED_FIELD_MISSING: Final = "101"
DATA_TYPE_ERROR: Final = "102"
UNSUPPORTED_MESSAGE_TYPE: Final = "200"
UNSUPPORTED_EVENT_CODE: Final = "201"
UNSUPPORTED_PROCESSING_ID: Final = "202"
UNSUPPORTED_VERSION_ID: Final = "203"
APPLICATION_INTERNAL_ERROR: Final = "207"

_SEGMENT_ID: Final = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MESSAGE_CODE: Final = re.compile(r"^[A-Z]{3}$")
_TRIGGER: Final = re.compile(r"^[A-Z0-9]{3}$")
_VERSION: Final = re.compile(r"^2\.[0-9](\.[0-9]+)?$")
MAX_CONTROL_ID: Final = 199  # v2.7's length; v2.5 says 20 and the hotline's own ids fit that


class Hl7Error(MedhotlineError):
    """A message the receiver must refuse: where (``MSH-9``, ``PID(2)-13``) and why, never a field's value."""

    def __init__(self, location: str, reason: str, code: str = DATA_TYPE_ERROR) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason
        self.code = code

    @property
    def segment(self) -> str:
        return self.location.split("-", 1)[0].split("(", 1)[0]

    @property
    def field(self) -> int | None:
        _, _, number = self.location.partition("-")
        return int(number) if number.isdigit() else None


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters of one message (``MSH-1`` and ``MSH-2``)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


DEFAULT_ENCODING: Final = Encoding()


def escape(text: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """``text`` with the delimiters escaped (``\\F\\``, ``\\S\\``…), so a value can never split a field."""
    e = enc.escape
    out = text.replace(e, f"{e}E{e}")
    for char, code in ((enc.field, "F"), (enc.component, "S"), (enc.repetition, "R"), (enc.subcomponent, "T")):
        out = out.replace(char, f"{e}{code}{e}")
    return out.replace("\r", f"{e}X0D{e}").replace("\n", f"{e}X0A{e}")


def unescape(text: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """The value of an escaped field part; unknown escape sequences (highlighting ``\\H\\``…) are dropped."""
    e = enc.escape
    if e not in text:
        return text
    names = {"F": enc.field, "S": enc.component, "R": enc.repetition, "T": enc.subcomponent, "E": e}
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != e:
            out.append(text[i])
            i += 1
            continue
        end = text.find(e, i + 1)
        if end < 0:  # a lone escape character: keep it as text rather than lose the rest
            out.append(text[i:])
            break
        seq = text[i + 1 : end]
        if seq in names:
            out.append(names[seq])
        elif seq.startswith("X") and len(seq) % 2 == 1:
            with contextlib.suppress(ValueError):  # a malformed hex escape is dropped like an unknown one
                out.append(bytes.fromhex(seq[1:]).decode("utf-8"))
        i = end + 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment as received: its id and its raw (still escaped) fields, numbered as HL7 numbers them."""

    id: str
    raw: tuple[str, ...]  # raw[0] is the segment id; for MSH, raw[1] is MSH-2 (MSH-1 is the separator itself)

    def field(self, number: int) -> str:
        """The raw text of field ``number`` (1-based), "" when absent."""
        index = number - 1 if self.id == "MSH" else number
        if number < 1 or index >= len(self.raw):
            return ""
        return self.raw[index]


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message. Values are read with :meth:`value`, which unescapes them."""

    segments: tuple[Segment, ...]
    encoding: Encoding = DEFAULT_ENCODING

    def first(self, segment_id: str) -> Segment | None:
        return next((s for s in self.segments if s.id == segment_id), None)

    def all(self, segment_id: str) -> list[Segment]:
        return [s for s in self.segments if s.id == segment_id]

    def components(self, segment: Segment, number: int, repetition: int = 0) -> list[str]:
        """The unescaped components of one repetition of a field ([] when the field is empty)."""
        raw = segment.field(number)
        if segment.id == "MSH" and number <= 2:
            return [raw] if raw else []
        reps = raw.split(self.encoding.repetition) if raw else []
        if repetition >= len(reps) or not reps[repetition]:
            return []
        return [unescape(c, self.encoding) for c in reps[repetition].split(self.encoding.component)]

    def repetitions(self, segment: Segment, number: int) -> int:
        raw = segment.field(number)
        return len(raw.split(self.encoding.repetition)) if raw else 0

    def value(self, segment: Segment, number: int, component: int = 1, repetition: int = 0) -> str:
        """Component ``component`` (1-based) of field ``number``, unescaped (subcomponents left joined)."""
        parts = self.components(segment, number, repetition)
        return parts[component - 1] if component <= len(parts) else ""

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_code(self) -> str:
        return self.value(self.msh, 9, 1)

    @property
    def trigger(self) -> str:
        return self.value(self.msh, 9, 2)

    @property
    def type(self) -> str:
        """``QBP^Q22``: message code and trigger event (what audit entries and logs name)."""
        return f"{self.message_code}^{self.trigger}" if self.trigger else self.message_code

    @property
    def control_id(self) -> str:
        return self.value(self.msh, 10)

    @property
    def version(self) -> str:
        return self.value(self.msh, 12)

    def encode(self) -> bytes:
        """ER7 bytes, each segment ended by CR (what :func:`parse` reads back to an equal message)."""
        f = self.encoding.field
        lines = [f.join(s.raw) if s.id != "MSH" else "MSH" + f + f.join(s.raw[1:]) for s in self.segments]
        return ("\r".join(lines) + "\r").encode("utf-8")


def parse(data: bytes) -> Message:
    """The message in ``data``, or Hl7Error naming the first problem (see the module docstring for the rules)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Hl7Error("MSH-18", f"message is not UTF-8 (byte {exc.start}); send UNICODE UTF-8") from None
    # A UTF-8 byte order mark is an encoding signature, not text: without this, "\ufeffMSH" is refused as "no MSH".
    text = text.removeprefix("\ufeff")
    # CR is the segment terminator; LF and CRLF are accepted, since files and some senders use them.
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not lines:
        raise Hl7Error("MSH", "empty message: a message starts with an MSH segment", SEGMENT_SEQUENCE_ERROR)
    head = lines[0]
    if not head.startswith("MSH"):
        raise Hl7Error("MSH", "the message does not start with an MSH segment", SEGMENT_SEQUENCE_ERROR)
    if len(head) < 8:
        raise Hl7Error("MSH-2", "MSH is too short to hold the field separator and encoding characters")
    enc = _encoding(head)
    segments = [_segment(line, enc, i) for i, line in enumerate(lines)]
    message = Message(tuple(segments), enc)
    _check_header(message)
    return message


def _encoding(head: str) -> Encoding:
    sep = head[3]
    if sep.isalnum() or sep.isspace():
        raise Hl7Error("MSH-1", "the field separator must be a printable non-alphanumeric character")
    chars = head[4:].split(sep, 1)[0]
    if len(chars) not in (4, 5) or len(set(chars + sep)) != len(chars) + 1:
        raise Hl7Error("MSH-2", "encoding characters must be 4 distinct characters other than the field separator")
    if any(c.isalnum() or c.isspace() for c in chars):
        raise Hl7Error("MSH-2", "encoding characters must not be letters, digits or spaces")
    return Encoding(sep, chars[0], chars[1], chars[2], chars[3])


def _segment(line: str, enc: Encoding, index: int) -> Segment:
    raw = tuple(line.split(enc.field))
    seg_id = raw[0]
    if not _SEGMENT_ID.match(seg_id):
        raise Hl7Error(
            f"segment {index + 1}",
            "segment id must be 3 upper-case letters or digits starting with a letter",
            SEGMENT_SEQUENCE_ERROR,
        )
    if seg_id == "MSH" and index > 0:
        raise Hl7Error(f"MSH({index + 1})", "a second MSH segment inside one message", SEGMENT_SEQUENCE_ERROR)
    return Segment(seg_id, raw)


def _check_header(message: Message) -> None:
    msh = message.msh
    if not msh.field(9):
        raise Hl7Error("MSH-9", "message type is missing", REQUIRED_FIELD_MISSING)
    code, trigger = message.message_code, message.trigger
    # A plain "ACK" without trigger event is common (v2.3 and senders that NAK what they could not parse).
    if not _MESSAGE_CODE.match(code) or not (_TRIGGER.match(trigger) or (code == "ACK" and not trigger)):
        raise Hl7Error("MSH-9", "message type must be a code and trigger event such as QBP^Q22")
    control_id = message.control_id
    if not control_id:
        raise Hl7Error("MSH-10", "message control id is missing", REQUIRED_FIELD_MISSING)
    if len(control_id) > MAX_CONTROL_ID or not control_id.isprintable():
        raise Hl7Error("MSH-10", f"message control id must be 1-{MAX_CONTROL_ID} printable characters")
    processing = message.value(msh, 11)
    if not processing:
        raise Hl7Error("MSH-11", "processing id is missing", REQUIRED_FIELD_MISSING)
    if processing not in ("P", "D", "T"):
        raise Hl7Error("MSH-11", "processing id must be P, D or T", UNSUPPORTED_PROCESSING_ID)
    if not message.version:
        raise Hl7Error("MSH-12", "version id is missing", REQUIRED_FIELD_MISSING)
    if not _VERSION.match(message.version):
        raise Hl7Error("MSH-12", "version id must be an HL7 v2 version such as 2.5", UNSUPPORTED_VERSION_ID)


# --- building --------------------------------------------------------------------------------------------------

FieldValue = str | Sequence[str] | None  # a value (escaped here), its components, or empty


def segment(seg_id: str, *fields: FieldValue, enc: Encoding = DEFAULT_ENCODING) -> Segment:
    """A segment from values: each string is escaped, a sequence becomes components (each escaped)."""
    if not _SEGMENT_ID.match(seg_id) or seg_id == "MSH":
        raise ValueError(f"segment id {seg_id!r}: use header() for MSH, else 3 upper-case letters or digits")
    return Segment(seg_id, (seg_id, *(_field(v, enc) for v in fields)))


def _field(value: FieldValue, enc: Encoding) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return escape(value, enc)
    return enc.component.join(escape(c, enc) for c in value).rstrip(enc.component)


@dataclass(frozen=True, slots=True)
class Party:
    """Sending or receiving application and facility (``MSH-3``/``-4`` and ``MSH-5``/``-6``)."""

    application: str
    facility: str


def header(
    *,
    sender: Party,
    receiver: Party,
    at: datetime,
    message_type: tuple[str, str, str],
    control_id: str,
    version: str = "2.5",
    processing_id: str = "P",
) -> Segment:
    """The MSH segment of a message the hotline sends (UTF-8 declared in MSH-18)."""
    enc = DEFAULT_ENCODING
    if not control_id or len(control_id) > 20 or not control_id.isprintable():
        raise ValueError("a control id the hotline sends is 1-20 printable characters (v2.5 ST 20)")
    fields = [
        "MSH",
        enc.msh2,
        escape(sender.application),
        escape(sender.facility),
        escape(receiver.application),
        escape(receiver.facility),
        at.strftime("%Y%m%d%H%M%S") + at.strftime("%z"),
        "",
        _field(message_type, enc),
        escape(control_id),
        processing_id,
        version,
        "",
        "",
        "",  # MSH-15/16 empty: original acknowledgement mode, the reply is the application ACK (AA/AE/AR)
        "",
        "",
        "UNICODE UTF-8",
    ]
    return Segment("MSH", tuple(fields))
