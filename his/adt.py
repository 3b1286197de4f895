"""Demographics from the HIS (ADT^A01/A04/A08/A40): read the message (sans-I/O), keep the registry current.

The HIS is the source of truth for who a patient is. :class:`AdtReceiver` is the handler of the hotline's MLLP
server (``his.transport.MllpServer``) for these events:

- ``A01`` (admit), ``A04`` (register) and ``A08`` (update): the patient in PID is registered, or updated when
  the registry knows its record number (found by blind index, as every lookup). PID-3 (record number, type MR),
  PID-5 (name) and PID-13 (phone) are required: the registry cannot hold a patient without them. An A08 of a
  patient the registry does not know registers it (the HIS says it exists).
- ``A40`` (merge): the patient of MRG-1 is merged into the one of PID-3. The merged record stays with its history
  and resolves to the survivor (``PatientRegistry.resolve``, lookups by either record number); it is no longer
  found by phone. An A40 sent again is accepted and changes nothing.

Answers: ``AA`` when stored; ``AR`` when the message itself is not acceptable (a missing or malformed field, an
unsupported event), naming segment and field (``PID-3``, ``MRG-1``); ``AE`` when it could be processed later: a
merge naming a patient the registry does not know yet (code 204, e.g. its A04 is still on its way) or the
database or key service failing (207). Nothing is changed by a message answered AE or AR.

Every message is audited (``hl7_receive``: type, control id, the patient's blind id when known, ACK code and the
location of a refusal); log lines carry the same and never a value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from compliance.audit import AuditOutcome
from ground.errors import MedhotlineError
from ground.logs import get_logger
from his.audit import Hl7Audit
from his.hl7 import (
    APPLICATION_INTERNAL_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    Hl7Error,
    Message,
    Party,
    Segment,
    header,
    segment,
)
from his.messages import AckCode, PdqPatient, build_ack, pid_segment, read_pid, read_record_number
from his.registry import PatientInput, PatientInputError, PatientRegistry, UnknownPatient

log = get_logger("medhotline.his.adt")

ADT_EVENTS: Final = ("A01", "A04", "A08", "A40")
UNKNOWN_KEY: Final = "204"  # HL7 table 0357: unknown key identifier
ADT_ACCESSOR: Final = "his"
ADT_ROLE: Final = "system"
ADT_REASON: Final = "HIS demographics update"
_STRUCTURE: Final = {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A40": "ADT_A39"}


@dataclass(frozen=True, slots=True)
class AdtEvent:
    """What an ADT message says. For A40 only ``patient.record_number`` (the survivor) is read from PID."""

    trigger: str
    patient: PdqPatient = field(repr=False)
    merged_record: str | None = field(default=None, repr=False)


def read_adt(message: Message) -> AdtEvent:
    """The event in an ADT message; Hl7Error naming the segment and field of the first problem."""
    if message.message_code != "ADT":
        raise Hl7Error("MSH-9", "only ADT messages are accepted here", UNSUPPORTED_MESSAGE_TYPE)
    if message.trigger not in ADT_EVENTS:
        raise Hl7Error("MSH-9", f"ADT event must be one of {', '.join(ADT_EVENTS)}", UNSUPPORTED_EVENT_CODE)
    pid = message.first("PID")
    if pid is None:
        raise Hl7Error("PID", f"{message.type} without a PID segment", SEGMENT_SEQUENCE_ERROR)
    if message.trigger != "A40":
        return AdtEvent(message.trigger, read_pid(message, pid))
    survivor = read_record_number(message, pid)
    mrg = message.first("MRG")
    if mrg is None:
        raise Hl7Error("MRG", "ADT^A40 without an MRG segment", SEGMENT_SEQUENCE_ERROR)
    merged = _mrg_record_number(message, mrg)
    return AdtEvent("A40", PdqPatient(survivor, "", ""), merged)


def _mrg_record_number(message: Message, mrg: Segment) -> str:
    for rep in range(message.repetitions(mrg, 1)):
        parts = message.components(mrg, 1, rep)
        if parts and parts[0] and (len(parts) < 5 or parts[4] in ("MR", "")):
            return parts[0]
    raise Hl7Error("MRG-1", "no prior medical record number (identifier type MR)", REQUIRED_FIELD_MISSING)


def build_adt(
    trigger: str,
    patient: PdqPatient,
    *,
    sender: Party,
    receiver: Party,
    at: datetime,
    control_id: str,
    merged_record: str | None = None,
) -> Message:
    """An ADT message as a HIS sends it (the simulated HIS and the tests); A40 needs ``merged_record``."""
    if trigger not in ADT_EVENTS:
        raise ValueError(f"ADT event must be one of {', '.join(ADT_EVENTS)}")
    kind = ("ADT", trigger, _STRUCTURE[trigger])
    head = header(sender=sender, receiver=receiver, at=at, message_type=kind, control_id=control_id)
    evn = segment("EVN", None, at.strftime("%Y%m%d%H%M%S"))
    segments = [head, evn, pid_segment(patient)]
    if trigger == "A40":
        if not merged_record:
            raise ValueError("an A40 names the merged patient's record number")
        segments.append(segment("MRG", [merged_record, "", "", "HIS", "MR"]))
    else:
        segments.append(segment("PV1", "1", "O"))  # an outpatient visit: the hotline reads no PV1 field
    return Message(tuple(segments))


# Which PID field a registry refusal is about (its message names the field in words, never the value).
_INPUT_FIELDS: Final = (("phone", "PID-13"), ("name", "PID-5"), ("record number", "PID-3"), ("birth", "PID-7"))


def input_location(error: PatientInputError, where: str = "PID") -> str:
    """The PID field (``PID-13``…) a registry refusal is about; ``where`` names the segment (``PID(2)``)."""
    text = str(error)
    field_name = next((loc for word, loc in _INPUT_FIELDS if word in text), "PID")
    return where + field_name.removeprefix("PID")


def patient_input(patient: PdqPatient) -> PatientInput:
    """What the registry is given for a patient the HIS sent (PID-7 gives the birth year only)."""
    birth_year = patient.birth_date.year if patient.birth_date else None
    return PatientInput(patient.name, patient.phone, record_number=patient.record_number, birth_year=birth_year)


def check_adt(message: Message, now: datetime) -> AdtEvent:
    """:func:`read_adt` and the registry's value rules (a phone that is no number, a birth year out of range):
    what :class:`AdtReceiver` refuses with AR before storing anything. ``medhotline his check`` uses this too,
    so the check and the listener cannot disagree. Hl7Error names the segment and field."""
    event = read_adt(message)
    if event.trigger != "A40":
        try:
            patient_input(event.patient).checked(now)
        except PatientInputError as exc:
            raise Hl7Error(input_location(exc), str(exc)) from None
    return event


class AdtReceiver:
    """The MLLP server's handler for ADT: stores what the HIS says, answers AA/AE/AR, audits every message."""

    def __init__(
        self,
        registry: PatientRegistry,
        *,
        audit: Hl7Audit,
        sender: Party,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._registry = registry
        self._audit = audit
        self._sender = sender
        self._clock = clock or (lambda: datetime.now(UTC))

    async def handle(self, message: Message) -> Message:
        """The ACK to ``message``, after the registry change it asks for (or none, for an AE/AR)."""
        patient: str | None = None
        try:
            event = check_adt(message, self._clock())
            patient = await self._apply(event)
        except Hl7Error as exc:
            return await self._refuse(message, "AR", exc, patient)
        except PatientInputError as exc:
            return await self._refuse(message, "AR", Hl7Error(input_location(exc), str(exc)), patient)
        except UnknownPatient as exc:
            where = "MRG-1" if exc.role == "merged" else "PID-3"
            return await self._refuse(message, "AE", Hl7Error(where, str(exc), UNKNOWN_KEY), patient)
        except MedhotlineError as exc:
            # Database or key service: nothing was stored (each registry change is one transaction); the HIS
            # sends the message again.
            log.error("his.adt_failed", type=message.type, control_id=message.control_id, error=type(exc).__name__)
            error = Hl7Error("MSH", "application internal error; send again later", APPLICATION_INTERNAL_ERROR)
            return await self._refuse(message, "AE", error, patient)
        await self._record(message, "success", "AA", patient)
        log.info("his.adt_applied", type=message.type, control_id=message.control_id)
        return build_ack(message, "AA", sender=self._sender, at=self._clock())

    async def _apply(self, event: AdtEvent) -> str:
        """Store the event; the blind id of the patient it is about (the survivor for a merge)."""
        if event.trigger == "A40":
            assert event.merged_record is not None  # read_adt requires it
            result = await self._registry.merge(
                event.patient.record_number,
                event.merged_record,
                accessor=ADT_ACCESSOR,
                role=ADT_ROLE,
                reason=ADT_REASON,
            )
            return result.survivor_blind_id
        patient_id = await self._registry.upsert(
            patient_input(event.patient), accessor=ADT_ACCESSOR, role=ADT_ROLE, reason=ADT_REASON
        )
        return (await self._registry.ref(patient_id)).blind_id

    async def _refuse(self, message: Message, code: AckCode, error: Hl7Error, patient: str | None) -> Message:
        log.warning(
            "his.adt_refused", type=message.type, control_id=message.control_id, ack=code, location=error.location
        )
        await self._record(message, "error", code, patient, error)
        return build_ack(message, code, sender=self._sender, at=self._clock(), error=error)

    async def _record(
        self, message: Message, outcome: AuditOutcome, ack: str, patient: str | None, error: Hl7Error | None = None
    ) -> None:
        await self._audit.record(
            "receive",
            message.type[:16],
            message.control_id,
            outcome=outcome,
            patient=patient,
            ack=ack,
            location=error.location if error else "",
            error_code=error.code if error else "",
        )

    async def observe(self, message: Message | None, reply: Message, error: Hl7Error | None) -> None:
        """The server's observer: audits the messages the handler never saw (unparseable, oversize)."""
        if message is not None:
            return  # audited by handle()
        msa = reply.first("MSA")
        control_id = reply.value(msa, 2) if msa is not None else ""
        await self._audit.record(
            "receive",
            "unparsed",
            control_id or "none",
            outcome="error",
            ack="AR",
            location=error.location if error else "",
            error_code=error.code if error else "",
        )
