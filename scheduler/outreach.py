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
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit import AuditLog
from compliance.keystore import read_token_file
from ground.config import Config
from ground.errors import MedhotlineError
from scheduler.medication import MedicationStore, next_due
from scheduler.notify import HttpSmsGateway, Outbox, deliver_pending
from scheduler.policy import DialPolicy, Window, failure_outcome
from scheduler.ports import OutreachPatients
from scheduler.rounds import open_followup_round
from scheduler.runner import MEDICATION_GRACE
from scheduler.store import AttemptRecord, AttemptStore, PlanRecord, PlanStore
from scheduler.tables import DATA_KEY_PURPOSE, DoNotCall, FollowupPlan, MedicationReminder, Reading
from scheduler.tasks import TaskStore
from scheduler.vaccination import (
    SlotFull,
    VaccinationStore,
    audit_booking_change,
    report_adverse_reaction,
    send_day_before_reminders,
)
from telephony.ari_channel import AriCallChannel, AriDispatcher
from telephony.ari_client import AriClient, AriError
from telephony.channel import CallInfo, ChannelError
from telephony.ports import BookingResult, OutreachUnavailable, ReadingsVerdict

log = structlog.get_logger(__name__)

OUTBOUND_ARG: Final = "outbound"
CHANNEL_PREFIX: Final = "outreach-"
DIAL_EVERY: Final = 1.0
SYSTEM_ACTOR: Final = "scheduler"
SYSTEM_ROLE: Final = "system"
# Outcomes of an answered call after which the round is over (nothing to retry).
_DONE: Final = frozenset({"completed", "identity_failed", "confirmed"})
FLOW_OF_KIND: Final = {
    "medication": "medication",
    "vaccination_reminder": "vaccination",
    "adverse_followup": "adverse_followup",
}

RunCall = Callable[[AriCallChannel, str, "CallOutreach"], Awaitable[tuple[str, str]]]
Speak = Callable[[str], Awaitable[str]]


@dataclass
class CallContext:
    attempt: AttemptRecord
    plan: PlanRecord | None = None
    reminder_id: str | None = None
    medication_sound: str | None = None
    outcome: str | None = None
    confirmed_keys: str | None = None


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


class Outreach:
    """One per service node: the scheduler's hooks, the dialer and the stores (see the module docstring)."""

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
        self._config = config
        self._sessions = sessions
        self._ari = ari
        self._dispatcher = dispatcher
        self._run_call = run_call
        self._speak = speak
        self.policy = policy
        self._clock = clock or (lambda: datetime.now(UTC))
        self.plans = PlanStore(sessions)
        self.attempts = AttemptStore(sessions)
        self.tasks = TaskStore(sessions)
        self._patients: OutreachPatients | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._node = config.service.node_name
        self._warned_no_gateway = False

    def patients_ready(self, services: OutreachPatients) -> None:
        self._patients = services

    def _services(self) -> OutreachPatients:
        if self._patients is None:
            raise OutreachUnavailable("the patient registry is not connected yet (key service)")
        return self._patients

    def _audit(self) -> AuditLog:
        return self._services().audit

    async def patient_record(self, patient_id: str, reason: str) -> Any:
        return await self._services().registry.get(patient_id, accessor=SYSTEM_ACTOR, role=SYSTEM_ROLE, reason=reason)

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
                won = session.execute(
                    update(MedicationReminder)
                    .where(MedicationReminder.id == reminder_id, MedicationReminder.next_due_at == due)
                    .values(next_due_at=next_due(row.at_time, max(due, now), self.policy.tz))
                ).rowcount  # type: ignore[attr-defined]
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

        medication, dose = await MedicationStore(self._sessions).text(self._services().ring, reminder_id)
        return f"用药提醒：请按时服用{medication}，{dose}。"

    async def enqueue_sms(self, patient_id: str, kind: str, subject_id: str | None, text: str) -> str:

        return await Outbox(self._sessions).enqueue(
            self._services().ring, patient_id=patient_id, kind=kind, text=text, subject_id=subject_id, at=self._clock()
        )

    # --- the dialer ----------------------------------------------------------------------------------------------

    async def dialer_loop(self, leading: asyncio.Event) -> None:
        await self._recover()
        while True:
            await leading.wait()
            try:
                await self.dial_due()
            except Exception:
                log.exception("outreach.dialer_failed")
            await asyncio.sleep(DIAL_EVERY)

    async def _recover(self) -> None:
        """Attempts this node was on when it stopped: their end was never seen; count them as failed."""
        for attempt in await asyncio.to_thread(self.attempts.stale_dialing, self._node):
            await self._failed(attempt, "interrupted")

    async def dial_due(self) -> int:
        now = self._clock()
        placed = 0
        trunk = self._config.outreach.trunk
        for attempt in await asyncio.to_thread(self.attempts.due, now):
            window = await asyncio.to_thread(self._window_of, attempt)
            allowed = self.policy.next_allowed(now, window)
            if allowed > now:
                await asyncio.to_thread(self.attempts.defer, attempt.id, allowed)
                continue
            if not self.policy.has_capacity(await asyncio.to_thread(self.attempts.in_flight, trunk)):
                break
            if self._patients is None:
                log.warning("outreach.waiting_for_registry")
                break
            record = await self.patient_record(attempt.patient_id, "placing an outreach call")
            if await self._on_dnc(record.phone):
                await asyncio.to_thread(
                    self.attempts.finish, attempt.id, state="cancelled", outcome="do_not_call", at=now
                )
                log.info("outreach.do_not_call", attempt_id=attempt.id)
                continue
            channel_id = f"{CHANNEL_PREFIX}{attempt.id}"
            if not await asyncio.to_thread(self.attempts.claim, attempt.id, self._node, trunk, channel_id, now):
                continue
            task = asyncio.ensure_future(self._call(attempt, record.phone, channel_id))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            placed += 1
        return placed

    def _window_of(self, attempt: AttemptRecord) -> Window | None:
        if attempt.kind != "followup":
            return None
        plan = self.plans.get(attempt.subject_id)
        return Window.parse(plan.window)

    async def _on_dnc(self, phone: str) -> bool:
        index = await self._services().registry.phone_index(phone)

        def listed() -> bool:
            with self._sessions() as session:
                return session.get(DoNotCall, index) is not None

        return await asyncio.to_thread(listed)

    async def _call(self, attempt: AttemptRecord, phone: str, channel_id: str) -> None:
        oc = self._config.outreach
        context = CallContext(attempt)
        try:
            await self._prepare(context)
        except Exception:
            log.exception("outreach.prepare_failed", attempt_id=attempt.id)
            await self._failed(attempt, "failed")
            return
        leg = AriCallChannel(self._ari, CallInfo(channel_id, "outbound", "ari", "", ""))
        self._dispatcher.register(leg)
        try:
            with structlog.contextvars.bound_contextvars(attempt_id=attempt.id, outreach=attempt.kind):
                try:
                    await self._ari.request(
                        "POST",
                        "/channels",
                        {
                            "endpoint": oc.dial_string.format(number=phone, trunk=oc.trunk),
                            "app": self._ari.app,
                            "appArgs": f"{OUTBOUND_ARG},{attempt.id}",
                            "channelId": channel_id,
                            "timeout": str(oc.ring_seconds),
                            "callerId": f'"{oc.caller_id}" <{oc.caller_id}>',
                        },
                    )
                except AriError as exc:
                    log.warning("outreach.dial_failed", reason=str(exc))
                    await self._failed(attempt, "unreachable")
                    return
                log.info("outreach.dialling")
                cause = await self._await_answer(leg, oc.ring_seconds + 10)
                if cause is not None:
                    await self._failed(attempt, failure_outcome(cause))
                    return
                port = CallOutreach(self, patient_of=lambda: attempt.patient_id, context=context)
                call_id, outcome = await self._run_call(leg, self._flow_of(context), port)
                await asyncio.to_thread(self.attempts.answered, attempt.id, call_id)
                await self._answered(context, outcome)
        finally:
            if not leg.gone:
                with contextlib.suppress(ChannelError):
                    await leg.hangup()
            self._dispatcher.unregister(channel_id)

    def _flow_of(self, context: CallContext) -> str:
        if context.plan is not None:
            return context.plan.flow
        return FLOW_OF_KIND[context.attempt.kind]

    async def _prepare(self, context: CallContext) -> None:
        attempt = context.attempt
        if attempt.kind == "followup":
            context.plan = await asyncio.to_thread(self.plans.get, attempt.subject_id)
        elif attempt.kind == "medication":
            context.reminder_id = attempt.subject_id
            medication, dose = await self._medication_parts(attempt.subject_id)
            # Rendered now, for this call: a medication name is data, not a flow text built in advance.
            context.medication_sound = await self._speak(f"{medication}，{dose}。")

    async def _medication_parts(self, reminder_id: str) -> tuple[str, str]:

        return await MedicationStore(self._sessions).text(self._services().ring, reminder_id)

    async def _await_answer(self, leg: AriCallChannel, timeout: float) -> int | None:
        """None when the patient answered (the channel entered Stasis); else the hang-up cause."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return 19
            event = await leg.next_event(timeout=remaining)
            if event is None:
                continue
            if event["type"] == "StasisStart":
                return None
            if leg.gone:
                return int(event.get("cause") or 0)

    async def _answered(self, context: CallContext, outcome: str) -> None:
        attempt = context.attempt
        now = self._clock()
        result = context.outcome or ("completed" if outcome in ("completed", "routed") else outcome)
        if attempt.kind == "medication" and result != "confirmed":
            await asyncio.to_thread(
                self.attempts.finish, attempt.id, state="failed", outcome=result or "not_confirmed", at=now
            )
            await self._retry_or_escalate(attempt, "medication_not_confirmed")
            return
        if result in _DONE or outcome == "completed":
            await asyncio.to_thread(self.attempts.finish, attempt.id, state="completed", outcome=result, at=now)
            return
        # Answered but the call ended before its purpose (the patient hung up early): try again later.
        await asyncio.to_thread(
            self.attempts.finish, attempt.id, state="failed", outcome=result or "incomplete", at=now
        )
        await self._retry_or_escalate(attempt, "unreachable")

    async def _failed(self, attempt: AttemptRecord, outcome: str) -> None:
        now = self._clock()
        await asyncio.to_thread(self.attempts.finish, attempt.id, state="failed", outcome=outcome, at=now)
        log.info("outreach.not_answered", attempt=attempt.attempt, outcome=outcome)
        await self._retry_or_escalate(
            attempt, "medication_not_confirmed" if attempt.kind == "medication" else "unreachable"
        )

    async def _retry_or_escalate(self, attempt: AttemptRecord, task_kind: str) -> None:
        now = self._clock()
        window = await asyncio.to_thread(self._window_of, attempt)
        retry = self.policy.retry_at(attempt.attempt, now, window)
        if retry is not None:
            await asyncio.to_thread(self.attempts.next_attempt, attempt, retry)
            return
        responsible = await asyncio.to_thread(self._responsible_of, attempt)
        role = "physician" if task_kind == "medication_not_confirmed" and responsible else "nurse"
        task = await asyncio.to_thread(
            self.tasks.create,
            task_kind,
            attempt.patient_id,
            role=role,
            at=now,
            assignee=responsible if role == "physician" else None,
            subject_id=attempt.subject_id,
        )
        log.warning("outreach.escalated", task=task.kind, attempts=attempt.attempt)

    def _responsible_of(self, attempt: AttemptRecord) -> str | None:
        with self._sessions() as session:
            if attempt.kind == "followup":
                plan = session.get(FollowupPlan, attempt.subject_id)
                return plan.responsible if plan else None
            if attempt.kind == "medication":
                reminder = session.get(MedicationReminder, attempt.subject_id)
                return reminder.responsible if reminder else None
        return None

    # --- what the flows' nodes do ----------------------------------------------------------------------------

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
        rows = []
        async with ring.cipher([key]) as cipher:
            for kind, raw in sorted(values.items()):
                value = float(raw)
                limit = thresholds.get(kind)
                abnormal = limit is not None and limit.abnormal(value)
                abnormal_any = abnormal_any or abnormal
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
        sound = await self._speak(f"已为您预约{_spoken_date(starts.date())}{starts:%H}点{starts:%M}分。")
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
        return cancelled

    async def report_adverse_reaction(self, patient_id: str, call_id: str | None) -> None:

        store = VaccinationStore(self._sessions)
        now = self._clock()
        booking = await asyncio.to_thread(store.last_booking, patient_id, now)
        await asyncio.to_thread(report_adverse_reaction, patient_id, booking.id if booking else None, now, self.tasks)
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

    def periodic_jobs(self) -> dict[str, tuple[float, Callable[[], Awaitable[None]]]]:
        """The leader's recurring jobs: deliver the notification outbox, send tomorrow's vaccination reminders."""
        return {"outbox": (30.0, self.deliver_outbox), "vaccination_reminders": (3600.0, self.vaccination_reminders)}

    async def deliver_outbox(self) -> None:

        gateway = self._gateway()
        if gateway is None:
            if not self._warned_no_gateway:
                self._warned_no_gateway = True
                log.warning(
                    "outreach.no_sms_gateway", hint="set [outreach] sms_gateway_url; messages wait in the outbox"
                )
            return
        if self._patients is None:
            return

        async def phone_of(patient_id: str) -> str:
            record = await self.patient_record(patient_id, "sending a notification")
            return str(record.phone)

        await deliver_pending(Outbox(self._sessions), self._services().ring, gateway, phone_of, self._clock())

    def _gateway(self) -> Any:

        oc = self._config.outreach
        if not oc.sms_gateway_url:
            return None

        assert oc.sms_token_file is not None  # guaranteed by config validation
        token = read_token_file(oc.sms_token_file).decode("utf-8").strip()  # refuses a token others can read
        return HttpSmsGateway(oc.sms_gateway_url, token)

    async def vaccination_reminders(self) -> None:
        """Once a day in effect: every booking of tomorrow without a reminder gets one (idempotent per booking)."""

        if self._patients is None:
            return
        now = self._clock()
        tomorrow = (now.astimezone(self.policy.tz) + timedelta(days=1)).date()

        async def enqueue(*, patient_id: str, kind: str, text: str, subject_id: str | None) -> str:
            return await self.enqueue_sms(patient_id, kind, subject_id, text)

        sent = await send_day_before_reminders(VaccinationStore(self._sessions), enqueue, tomorrow, now)
        if sent:
            log.info("outreach.vaccination_reminders", count=sent)

    async def drain(self, timeout: float) -> None:
        if self._calls:
            _, pending = await asyncio.wait(set(self._calls), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _spoken_date(day: date) -> str:
    return f"{day.month}月{day.day}日"
