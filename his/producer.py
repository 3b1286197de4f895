"""``HisMessages`` (telephony.ports) over the registry and the outbox: what the scheduler and the CLI hand to the
HIS is built here (:mod:`his.outbound`) and queued, encrypted, before the method returns.

The patient goes into PID by the HIS's record number and name only (no phone: the HIS has it and a message need
not carry it). A patient the registry knows without a record number (registered on the hotline, never seen by the
HIS) is named by the hotline's own id (``PID-3`` type ``PI``, authority ``MEDHOTLINE``); a merged patient by the
survivor. Reading the patient is an audited registry read (``his``/``system``, "HIS message").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, Literal

from his.hl7 import Message, Party
from his.messages import PdqPatient, new_control_id
from his.outbound import SIU_EVENTS, Appointment, Reading, build_oru, build_siu, build_vxu
from his.outbox import Outbox
from his.registry import PatientRegistry
from his.srm import SRM_EVENTS, build_srm
from telephony.ports import AppointmentEvent, AppointmentFacts, ReadingFact, VaccinationFacts

AppointmentMessages = Literal["siu", "srm"]
ACCESSOR: Final = "his"
ROLE: Final = "system"
REASON: Final = "HIS message"


class HisOutbound:
    """Builds and queues SIU (or SRM, with ``appointment_messages="srm"``), VXU and ORU messages; returns each
    one's control id."""

    def __init__(
        self,
        registry: PatientRegistry,
        outbox: Outbox,
        *,
        sender: Party,
        receiver: Party,
        clock: Callable[[], datetime] | None = None,
        appointment_messages: AppointmentMessages = "siu",
    ) -> None:
        self._registry = registry
        self._outbox = outbox
        self._sender = sender
        self._receiver = receiver
        self._clock = clock or (lambda: datetime.now(UTC))
        self._appointment_messages = appointment_messages

    async def _patient(self, patient_id: str) -> tuple[PdqPatient, str, bool]:
        """The PID values, the blind id, and whether the id is the HIS's record number."""
        current = await self._registry.resolve(patient_id)
        record = await self._registry.get(current, accessor=ACCESSOR, role=ROLE, reason=REASON)
        blind_id = (await self._registry.ref(current)).blind_id
        if record.record_number is None:
            return PdqPatient(current, record.name, ""), blind_id, False
        return PdqPatient(record.record_number, record.name, ""), blind_id, True

    async def _queue(self, message: Message, blind_id: str) -> str:
        await self._outbox.enqueue(message, patient=blind_id)
        return message.control_id

    async def appointment(self, event: AppointmentEvent, appointment: AppointmentFacts) -> str:
        patient, blind_id, known = await self._patient(appointment.patient_id)
        a = appointment
        values = Appointment(a.booking_id, a.starts_at, a.ends_at, a.service, a.service_name, a.location,
                             a.changed_from)  # fmt: skip
        at, control_id = self._clock(), new_control_id()
        if self._appointment_messages == "srm":
            message = build_srm(SRM_EVENTS[event], values, patient, sender=self._sender, receiver=self._receiver,
                                at=at, control_id=control_id)  # fmt: skip
        else:
            message = build_siu(SIU_EVENTS[event], values, patient, sender=self._sender, receiver=self._receiver,
                                at=at, control_id=control_id)  # fmt: skip
        return await self._queue(_own_id(message, known), blind_id)

    async def readings(self, patient_id: str, readings: Sequence[ReadingFact], taken_at: datetime) -> str:
        patient, blind_id, known = await self._patient(patient_id)
        values = [Reading(r.kind, r.value, r.abnormal) for r in readings]
        message = build_oru(patient, values, taken_at=taken_at, sender=self._sender, receiver=self._receiver,
                            at=self._clock(), control_id=new_control_id())  # fmt: skip
        return await self._queue(_own_id(message, known), blind_id)

    async def vaccination(self, facts: VaccinationFacts) -> str:
        patient, blind_id, known = await self._patient(facts.patient_id)
        message = build_vxu(patient, vaccine=facts.vaccine, vaccine_name=facts.vaccine_name, given_at=facts.given_at,
                            reaction=facts.reaction, sender=self._sender, receiver=self._receiver, at=self._clock(),
                            control_id=new_control_id())  # fmt: skip
        return await self._queue(_own_id(message, known), blind_id)


def _own_id(message: Message, known: bool) -> Message:
    """``message`` with PID-3 typed as the hotline's own id (PI, MEDHOTLINE) when the HIS has no record number."""
    if known:
        return message
    segments = []
    for seg in message.segments:
        if seg.id == "PID":
            raw = list(seg.raw)
            raw[3] = raw[3].replace("^HIS^MR", "^MEDHOTLINE^PI")
            seg = type(seg)(seg.id, tuple(raw))  # noqa: PLW2901
        segments.append(seg)
    return Message(tuple(segments), message.encoding)
