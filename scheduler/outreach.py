"""Outreach in the running service: due plans become rounds of calls, the dialer places them over ARI, and each
answered call runs its flow with an :class:`~telephony.ports.OutreachPort` that reaches the stores.

Only the leader (see :mod:`scheduler.leader`) fires jobs and dials. The dialer, every second: takes the due
attempts, moves each into the allowed hours (plan window, quiet hours) or skips a number on the do-not-call
list, keeps each trunk under its cap, claims the attempt (a conditional UPDATE, so two dialers never place one
call), reads the patient's number from the encrypted registry (audited, never stored or logged), and
originates the call into the Stasis app with ``appArgs`` ``outbound,<attempt id>``. An answered call runs the
flow; a call that fails (no answer, busy, unreachable) is retried after the backoff, and after the last attempt a
nurse gets an *unreachable* task. A medication reminder not confirmed is retried the same way and then escalated
to the responsible physician.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ground.config import Config
from ground.db import rowcount
from ground.logs import get_logger
from scheduler.call_actions import CallActions
from scheduler.complaints import SURVEY_KIND
from scheduler.dialer import CHANNEL_PREFIX, DIAL_EVERY, FLOW_OF_KIND, OUTBOUND_ARG, CallContext, Dialer, RunCall, Speak
from scheduler.medication import next_due
from scheduler.notifications import Notifications
from scheduler.outreach_core import SYSTEM_ACTOR, SYSTEM_ROLE, OutreachCore
from scheduler.policy import DialPolicy
from scheduler.ports import OutreachPatients
from scheduler.rounds import open_followup_round
from scheduler.runner import MEDICATION_GRACE
from scheduler.store import AttemptStore, PlanRecord, PlanStore
from scheduler.tables import MedicationReminder
from scheduler.tasks import TaskStore
from telephony.ari_channel import AriDispatcher
from telephony.ari_client import AriClient
from telephony.ports import BookingResult, OutreachUnavailable, ReadingsVerdict

__all__ = [
    "CHANNEL_PREFIX",
    "DIAL_EVERY",
    "FLOW_OF_KIND",
    "OUTBOUND_ARG",
    "SYSTEM_ACTOR",
    "SYSTEM_ROLE",
    "CallContext",
    "CallOutreach",
    "Outreach",
    "RunCall",
    "Speak",
]

log = get_logger(__name__)


class CallOutreach:
    """The :class:`~telephony.ports.OutreachPort` of one call (outbound: the attempt's patient; inbound: the caller the
    IVR identified, found through ``patient_of``)."""

    def __init__(
        self,
        outreach: Outreach,
        *,
        patient_of: Callable[[], str | None],
        context: CallContext | None = None,
        call_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._outreach = outreach
        self._patient_of = patient_of
        self.context = context
        self._call_id = call_id

    def _patient(self) -> str:
        patient = self._patient_of()
        if patient is None:
            raise OutreachUnavailable("the caller is not identified")
        return patient

    async def verify_identity(self, values: Mapping[str, str]) -> bool:
        patient = self._patient_of()
        if patient is None:
            return False  # a caller the IVR did not find by number can't be verified (the flow says so)
        record = await self._outreach.patient_record(patient, "identity check on an outreach call")
        given = values.get("birth_year", "")
        ok = record.birth_year is not None and given.isdigit() and int(given) == record.birth_year
        if not ok and self.context is not None:
            self.context.outcome = "identity_failed"
        return ok

    async def save_readings(self, values: Mapping[str, str]) -> ReadingsVerdict:
        plan = self.context.plan if self.context is not None else None
        abnormal = await self._outreach.save_readings(
            self._patient(), plan, self.context.attempt.id if self.context else None, values, self._call_id()
        )
        if self.context is not None:
            self.context.outcome = "completed"
        return ReadingsVerdict(abnormal=abnormal)

    async def medication_sound(self) -> str:
        if self.context is None or self.context.medication_sound is None:
            raise OutreachUnavailable("this call has no medication to remind of")
        return self.context.medication_sound

    async def medication_result(self, confirmed: bool, keys: str) -> None:
        if self.context is None or self.context.reminder_id is None:
            raise OutreachUnavailable("this call has no medication reminder")
        self.context.outcome = "confirmed" if confirmed else "not_confirmed"
        self.context.confirmed_keys = keys
        await self._outreach.record_confirmation(self.context.reminder_id, self.context.attempt.id, confirmed, keys)

    async def book_vaccination(self, day: int, slot: str) -> BookingResult:
        return await self._outreach.book_vaccination(self._patient_of(), day, slot)

    async def cancel_vaccination(self) -> bool:
        return await self._outreach.cancel_vaccination(self._patient())

    async def report_adverse_reaction(self) -> None:
        await self._outreach.report_adverse_reaction(self._patient(), self._call_id())

    async def record_survey(self, score: int) -> None:
        # Only a complaint's answer call knows the task it is about (the attempt's subject); elsewhere it's an error.
        if self.context is None or self.context.attempt.kind != SURVEY_KIND:
            raise OutreachUnavailable("this call is no complaint answer call: there is no task to record a score on")
        await self._outreach.actions.record_survey(self.context.attempt.subject_id, score)


class Outreach:
    """One per service node: the scheduler's hooks here; the dialer (:class:`~scheduler.dialer.Dialer`), what the
    nodes do (:class:`~scheduler.call_actions.CallActions`) and the SMS outbox
    (:class:`~scheduler.notifications.Notifications`) are parts it is composed of, over one shared core."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        ari: AriClient,
        dispatcher: AriDispatcher,
        *,
        run_call: RunCall,
        speak: Speak,
        policy: DialPolicy,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.core = OutreachCore(
            config,
            sessions,
            policy,
            clock or (lambda: datetime.now(UTC)),
            PlanStore(sessions),
            AttemptStore(sessions),
            TaskStore(sessions),
        )
        self._sessions = sessions
        self._clock = self.core.clock
        self.policy = policy
        self.plans = self.core.plans
        self.attempts = self.core.attempts
        self.tasks = self.core.tasks
        self.actions = CallActions(self.core, speak=speak)
        self.notifications = Notifications(self.core)
        self.dialer = Dialer(
            self.core,
            ari,
            dispatcher,
            run_call=run_call,
            speak=speak,
            make_port=lambda attempt, context: CallOutreach(
                self, patient_of=lambda: attempt.patient_id, context=context
            ),
        )

    def patients_ready(self, services: OutreachPatients) -> None:
        self.core.patients = services

    def _services(self) -> OutreachPatients:
        return self.actions._services()

    async def patient_record(self, patient_id: str, reason: str) -> Any:
        return await self.actions.patient_record(patient_id, reason)

    # --- the scheduler's hooks ---------------------------------------------------------------------------------

    def due_items(self) -> list[tuple[str, str, datetime]]:
        """What should have a job: active plans and call/SMS medication reminders at their next due time. A
        follow-up long overdue is due now (still worth calling); a medication reminder late beyond its grace is
        skipped to its next dose (see :mod:`scheduler.runner`)."""

        now = self._clock()
        items: list[tuple[str, str, datetime]] = []
        for plan in self.plans.active():
            items.append(("followup", plan.id, max(plan.next_due_at, now - timedelta(minutes=1))))
        with self._sessions() as session:
            reminders = session.scalars(select(MedicationReminder).where(MedicationReminder.active.is_(True))).all()
            late = [r.id for r in reminders if r.next_due_at < now - MEDICATION_GRACE]
            items += [("medication", r.id, r.next_due_at) for r in reminders if r.id not in late]
        for reminder_id in late:
            self._skip_reminder(reminder_id, now)
        return items

    def _skip_reminder(self, reminder_id: str, now: datetime) -> None:

        with self._sessions.begin() as session:
            row = session.get(MedicationReminder, reminder_id)
            if row is None:
                return
            log.warning("scheduler.medication_reminder_skipped", reminder_id=reminder_id, reason="missed its time")
            row.next_due_at = next_due(row.at_time, now, self.policy.tz)

    async def on_fire(self, kind: str, subject_id: str) -> None:
        now = self._clock()
        if kind == "followup":
            await asyncio.to_thread(self._fire_followup, subject_id, now)
        elif kind == "medication":
            await self._fire_medication(subject_id, now)

    def _fire_followup(self, plan_id: str, now: datetime) -> None:
        opened = open_followup_round(self._sessions, self.attempts, self.policy, plan_id, now)
        log.info("outreach.round_opened", kind="followup", plan_id=plan_id, opened=opened is not None)

    async def _fire_medication(self, reminder_id: str, now: datetime) -> None:

        def advance() -> tuple[str, str, datetime] | None:
            with self._sessions.begin() as session:
                row = session.get(MedicationReminder, reminder_id)
                if row is None or not row.active:
                    return None
                due = row.next_due_at
                won = rowcount(
                    session.execute(
                        update(MedicationReminder)
                        .where(MedicationReminder.id == reminder_id, MedicationReminder.next_due_at == due)
                        .values(next_due_at=next_due(row.at_time, max(due, now), self.policy.tz))
                    )
                )
                return (row.patient_id, row.channel, due) if won else None

        fired = await asyncio.to_thread(advance)
        if fired is None:
            return
        patient, channel, due = fired
        if channel == "call":
            await asyncio.to_thread(
                self.attempts.open_round, "medication", reminder_id, patient, due, self.policy.next_allowed(now)
            )
        else:
            await self.enqueue_sms(
                patient, "medication_reminder", reminder_id, await self._medication_text(reminder_id)
            )

    async def _medication_text(self, reminder_id: str) -> str:
        return await self.notifications._medication_text(reminder_id)

    # --- the parts' public API, kept here for callers ----------------------------------------------------------

    async def enqueue_sms(self, patient_id: str, kind: str, subject_id: str | None, text: str) -> str:
        return await self.notifications.enqueue_sms(patient_id, kind, subject_id, text)

    async def dialer_loop(self, leading: asyncio.Event) -> None:
        await self.dialer.dialer_loop(leading)

    async def dial_due(self) -> int:
        return await self.dialer.dial_due()

    async def close_lost_attempts(self) -> int:
        return await self.dialer.close_lost_attempts()

    async def drain(self, timeout: float) -> None:
        await self.dialer.drain(timeout)

    async def save_readings(
        self,
        patient_id: str,
        plan: PlanRecord | None,
        attempt_id: str | None,
        values: Mapping[str, str],
        call_id: str | None,
    ) -> bool:
        return await self.actions.save_readings(patient_id, plan, attempt_id, values, call_id)

    async def record_confirmation(self, reminder_id: str, attempt_id: str, confirmed: bool, keys: str) -> None:
        await self.actions.record_confirmation(reminder_id, attempt_id, confirmed, keys)

    async def book_vaccination(self, patient_id: str | None, day: int, slot: str) -> BookingResult:
        return await self.actions.book_vaccination(patient_id, day, slot)

    async def cancel_vaccination(self, patient_id: str) -> bool:
        return await self.actions.cancel_vaccination(patient_id)

    async def report_adverse_reaction(self, patient_id: str, call_id: str | None) -> None:
        await self.actions.report_adverse_reaction(patient_id, call_id)

    def periodic_jobs(self) -> dict[str, tuple[float, Callable[[], Awaitable[None]]]]:
        """The leader's recurring jobs: deliver the notification outbox, send tomorrow's vaccination reminders."""
        return {"outbox": (30.0, self.deliver_outbox), "vaccination_reminders": (3600.0, self.vaccination_reminders)}

    async def deliver_outbox(self) -> None:
        await self.notifications.deliver_outbox()

    async def vaccination_reminders(self) -> None:
        await self.notifications.vaccination_reminders()
