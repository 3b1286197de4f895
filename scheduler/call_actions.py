"""What outreach flows' nodes do with the stores: readings, medication confirmations, vaccination bookings,
adverse reactions, complaint survey scores (called through :class:`scheduler.outreach.CallOutreach`, the port of
one call)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, timedelta

from ground.errors import MedhotlineError
from ground.logs import get_logger
from scheduler.complaints import ComplaintRules, ComplaintStore, answer_from_survey
from scheduler.medication import MedicationStore
from scheduler.outreach_core import SYSTEM_ACTOR, SYSTEM_ROLE, OutreachCore, OutreachPart
from scheduler.store import PlanRecord
from scheduler.tables import DATA_KEY_PURPOSE, Reading
from scheduler.vaccination import (
    BookingRecord,
    SlotFull,
    VaccinationStore,
    audit_booking_change,
    report_adverse_reaction,
)
from telephony.ports import AppointmentEvent, AppointmentFacts, BookingResult, ReadingFact, VaccinationFacts

log = get_logger("scheduler.outreach")

Speak = Callable[[str], Awaitable[str]]


class CallActions(OutreachPart):
    """The stores' side of the outreach nodes; every change is audited or leaves a task."""

    def __init__(self, core: OutreachCore, *, speak: Speak) -> None:
        super().__init__(core)
        self._speak = speak

    async def save_readings(
        self,
        patient_id: str,
        plan: PlanRecord | None,
        attempt_id: str | None,
        values: Mapping[str, str],
        call_id: str | None,
    ) -> bool:
        ring = self._services().ring
        key = await ring.current_key(DATA_KEY_PURPOSE)
        now = self._clock()
        thresholds = plan.thresholds if plan is not None else {}
        abnormal_any = False
        abnormal_kinds: set[str] = set()
        rows = []
        async with ring.cipher([key]) as cipher:
            for kind, raw in sorted(values.items()):
                value = float(raw)
                limit = thresholds.get(kind)
                abnormal = limit is not None and limit.abnormal(value)
                abnormal_any = abnormal_any or abnormal
                if abnormal:
                    abnormal_kinds.add(kind)
                reading_id = str(uuid.uuid4())
                token = cipher.encrypt(
                    json.dumps({"value": value, "abnormal": abnormal}),
                    table="readings",
                    column="value",
                    row_id=reading_id,
                )
                rows.append(
                    Reading(
                        id=reading_id,
                        patient_id=patient_id,
                        plan_id=plan.id if plan else None,
                        attempt_id=attempt_id,
                        kind=kind,
                        value_token=token,
                        data_key_id=key.id,
                        taken_at=now,
                    )
                )

        def store() -> None:
            with self._sessions.begin() as session:
                session.add_all(rows)

        await asyncio.to_thread(store)
        if self.core.his is not None:
            facts = [ReadingFact(r.kind, float(values[r.kind]), r.kind in abnormal_kinds) for r in rows]
            await self._to_his("readings", self.core.his.readings(patient_id, facts, now))
        if abnormal_any:
            await asyncio.to_thread(
                self.tasks.create,
                "recall",
                patient_id,
                role="physician",
                at=now,
                assignee=plan.responsible if plan else None,
                subject_id=plan.id if plan else None,
                call_id=call_id,
            )
            log.warning("outreach.abnormal_reading", plan_id=plan.id if plan else None)
        return abnormal_any

    async def record_survey(self, complaint_id: str, score: int) -> bool:
        """The complaint answer call's score on the task (see :func:`scheduler.complaints.answer_from_survey`)."""
        recorded = await asyncio.to_thread(
            answer_from_survey,
            ComplaintStore(self._sessions),
            self._audit(),
            ComplaintRules.of(self._config.complaints),
            complaint_id,
            score=score,
            at=self._clock(),
            actor=SYSTEM_ACTOR,
            role=SYSTEM_ROLE,
        )
        if not recorded:
            log.info("outreach.survey_already_answered", complaint_id=complaint_id)
        return recorded

    async def record_confirmation(self, reminder_id: str, attempt_id: str, confirmed: bool, keys: str) -> None:

        await asyncio.to_thread(
            MedicationStore(self._sessions).record_confirmation, reminder_id, attempt_id, confirmed, keys, self._clock()
        )

    async def book_vaccination(self, patient_id: str | None, day: int, slot: str) -> BookingResult:

        if patient_id is None:
            return BookingResult("not_identified")
        local_day = (self._clock().astimezone(self.policy.tz) + timedelta(days=day)).date()
        try:
            booking = await asyncio.to_thread(
                VaccinationStore(self._sessions).book_day_part, patient_id, None, local_day, slot, self._clock()
            )
        except SlotFull:
            return BookingResult("full")
        except MedhotlineError as exc:
            log.warning("outreach.booking_failed", reason=type(exc).__name__)
            return BookingResult("no_slot")
        await asyncio.to_thread(
            audit_booking_change,
            self._audit(),
            actor=SYSTEM_ACTOR,
            role=SYSTEM_ROLE,
            operation="book",
            booking_id=booking.id,
            slot_id=booking.slot_id,
            reason="booked by the patient on the phone",
        )
        starts = booking.starts_at.astimezone(self.policy.tz)
        when = f"{_spoken_date(starts.date())}{starts:%H}点{starts:%M}分"
        if self.core.his is not None and await self._appointment_to_his("book", booking):
            # The HIS decides: the caller hears that the request is in, not that it is confirmed (docs/his.md).
            sound = await self._speak(f"已为您提交{when}的预约申请，医院确认后将短信通知您。")
        else:
            sound = await self._speak(f"已为您预约{when}。")
        return BookingResult("booked", booking_id=booking.id, sound=sound)

    async def cancel_vaccination(self, patient_id: str) -> bool:

        store = VaccinationStore(self._sessions)

        booking = await asyncio.to_thread(store.next_booking, patient_id, self._clock())
        if booking is None:
            return False
        cancelled = await asyncio.to_thread(store.cancel, booking.id, self._clock(), "patient")
        if cancelled:
            await asyncio.to_thread(
                audit_booking_change,
                self._audit(),
                actor=SYSTEM_ACTOR,
                role=SYSTEM_ROLE,
                operation="cancel",
                booking_id=booking.id,
                slot_id=booking.slot_id,
                reason="cancelled by the patient on the phone",
            )
            if self.core.his is not None:
                await self._appointment_to_his("cancel", booking)
        return cancelled

    async def report_adverse_reaction(self, patient_id: str, call_id: str | None) -> None:

        store = VaccinationStore(self._sessions)
        now = self._clock()
        booking = await asyncio.to_thread(store.last_booking, patient_id, now)
        await asyncio.to_thread(report_adverse_reaction, patient_id, booking.id if booking else None, now, self.tasks)
        if self.core.his is not None and booking is not None:
            # Patient-reported: the HIS learns of the dose the patient says they had and of the reaction.
            facts = VaccinationFacts(patient_id, booking.vaccine, booking.vaccine_name, booking.starts_at, True)
            await self._to_his("vaccination", self.core.his.vaccination(facts))
        # A follow-up call by medical staff: the next day, in the allowed hours.
        subject = booking.id if booking else str(uuid.uuid5(uuid.NAMESPACE_OID, patient_id))
        await asyncio.to_thread(
            self.attempts.open_round,
            "adverse_followup",
            subject,
            patient_id,
            now,
            self.policy.next_allowed(now + timedelta(days=1)),
        )

    async def _appointment_to_his(self, event: AppointmentEvent, booking: BookingRecord) -> bool:
        """Queue the SIU for the HIS and mark the booking ``requested``; False (logged) if it could not be queued."""
        assert self.core.his is not None
        facts = AppointmentFacts(
            booking.id, booking.patient_id, booking.starts_at, booking.ends_at, booking.vaccine,
            booking.vaccine_name, booking.clinic, booking.changed_from,
        )  # fmt: skip
        control_id = await self._to_his("appointment", self.core.his.appointment(event, facts))
        if control_id is None:
            return False
        await asyncio.to_thread(VaccinationStore(self._sessions).mark_his_requested, booking.id, control_id)
        return True

    @staticmethod
    async def _to_his(what: str, queued: Awaitable[str]) -> str | None:
        """The control id of a message queued for the HIS; None when the outbox could not take it (logged: the
        hotline's own record stands, and an operator sees the booking without a HIS state)."""
        try:
            return await queued
        except MedhotlineError as exc:
            log.error("outreach.his_queue_failed", what=what, reason=type(exc).__name__)
            return None


def _spoken_date(day: date) -> str:
    return f"{day.month}月{day.day}日"
