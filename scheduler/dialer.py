"""The outreach dialer: places due attempts over ARI and settles each round (retry, escalate)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import structlog

from ground.logs import get_logger
from scheduler.medication import MedicationStore
from scheduler.outreach_core import OutreachCore, OutreachPart
from scheduler.policy import Window, failure_outcome
from scheduler.store import AttemptRecord, PlanRecord
from scheduler.tables import DoNotCall, FollowupPlan, MedicationReminder
from telephony.ari_channel import AriCallChannel, AriDispatcher, await_answer
from telephony.ari_client import AriClient, AriError
from telephony.channel import CallInfo, ChannelError

log = get_logger("scheduler.outreach")

OUTBOUND_ARG: Final = "outbound"
CHANNEL_PREFIX: Final = "outreach-"
DIAL_EVERY: Final = 1.0
# Outcomes of an answered call after which the round is over (nothing to retry).
_DONE: Final = frozenset({"completed", "identity_failed", "confirmed"})
FLOW_OF_KIND: Final = {
    "medication": "medication",
    "vaccination_reminder": "vaccination",
    "adverse_followup": "adverse_followup",
    # 12320 complaint answered: the callback asks the patient to rate the handling 1-5 (docs/complaints.md).
    "complaint_survey": "complaint_survey",
}


@dataclass
class CallContext:
    attempt: AttemptRecord
    plan: PlanRecord | None = None
    reminder_id: str | None = None
    medication_sound: str | None = None
    outcome: str | None = None
    confirmed_keys: str | None = None


RunCall = Callable[[AriCallChannel, str, Any], Awaitable[tuple[str, str]]]
Speak = Callable[[str], Awaitable[str]]
MakePort = Callable[[AttemptRecord, CallContext], Any]


class Dialer(OutreachPart):
    """Every second on the leader: due attempts into allowed hours, under the trunk cap, claimed, dialled; an
    answered call runs its flow with the port ``make_port`` gives (see :mod:`scheduler.outreach`)."""

    def __init__(
        self,
        core: OutreachCore,
        ari: AriClient,
        dispatcher: AriDispatcher,
        *,
        run_call: RunCall,
        speak: Speak,
        make_port: MakePort,
    ) -> None:
        super().__init__(core)
        self._ari = ari
        self._dispatcher = dispatcher
        self._run_call = run_call
        self._speak = speak
        self._make_port = make_port
        self._calls: set[asyncio.Task[None]] = set()
        self._node = core.config.service.node_name

    async def dialer_loop(self, leading: asyncio.Event) -> None:
        await self._recover()
        while True:
            await leading.wait()
            try:
                if self._config.cluster.enabled:
                    await self.close_lost_attempts()
                await self.dial_due()
            except Exception:
                log.exception("outreach.dialer_failed")
            await asyncio.sleep(DIAL_EVERY)

    async def _recover(self) -> None:
        """Attempts this node was on when it stopped: their end was never seen; count them as failed."""
        for attempt in await asyncio.to_thread(self.attempts.stale_dialing, self._node):
            await self._failed(attempt, "interrupted")

    async def close_lost_attempts(self) -> int:
        """On the leader: close the attempts of nodes whose lease another node took over (``ground.leases``) as
        ``node_lost`` and settle their rounds (retry or escalate), as their own restart would. Waits ``ring_seconds``
        after the takeover, the originate's own timeout on the dead node's Asterisk, so a call still ringing there
        has ended and the trunk is really free (docs/decisions.md). Returns how many this leader closed."""
        settle = timedelta(seconds=self._config.outreach.ring_seconds)
        closed = 0
        for lost in await asyncio.to_thread(
            self.attempts.on_lost_nodes, self._clock(), settle=settle, besides=self._node
        ):
            if not await asyncio.to_thread(self.attempts.close_lost, lost):
                continue  # another leader, or the node's own restart, closed it first
            closed += 1
            log.warning(
                "outreach.node_lost",
                attempt_id=lost.attempt.id,
                node=lost.node,
                lease_epoch=lost.epoch,
                lost_at=lost.lost_at.isoformat(),
                state=lost.attempt.state,
            )
            await self._retry_or_escalate(lost.attempt, self._task_kind(lost.attempt))
        return closed

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
                cause = await await_answer(leg, oc.ring_seconds + 10)
                if cause is not None:
                    await self._failed(attempt, failure_outcome(cause))
                    return
                port = self._make_port(attempt, context)
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

    async def _answered(self, context: CallContext, outcome: str) -> None:
        attempt = context.attempt
        now = self._clock()
        result = context.outcome or ("completed" if outcome in ("completed", "routed") else outcome)
        if attempt.kind == "medication" and result != "confirmed":
            # finish is False when the attempt was closed already (its node taken over): that closer settled it.
            if await asyncio.to_thread(
                self.attempts.finish, attempt.id, state="failed", outcome=result or "not_confirmed", at=now
            ):
                await self._retry_or_escalate(attempt, "medication_not_confirmed")
            return
        if result in _DONE or outcome == "completed":
            await asyncio.to_thread(self.attempts.finish, attempt.id, state="completed", outcome=result, at=now)
            return
        # Answered but the call ended before its purpose (the patient hung up early): try again later.
        if await asyncio.to_thread(
            self.attempts.finish, attempt.id, state="failed", outcome=result or "incomplete", at=now
        ):
            await self._retry_or_escalate(attempt, "unreachable")

    async def _failed(self, attempt: AttemptRecord, outcome: str) -> None:
        now = self._clock()
        if not await asyncio.to_thread(self.attempts.finish, attempt.id, state="failed", outcome=outcome, at=now):
            # Closed already (e.g. as node_lost by the leader while this node was taken over): settled once there.
            log.info("outreach.closed_elsewhere", attempt=attempt.attempt, outcome=outcome)
            return
        log.info("outreach.not_answered", attempt=attempt.attempt, outcome=outcome)
        await self._retry_or_escalate(attempt, self._task_kind(attempt))

    @staticmethod
    def _task_kind(attempt: AttemptRecord) -> str:
        return "medication_not_confirmed" if attempt.kind == "medication" else "unreachable"

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

    async def drain(self, timeout: float) -> None:
        if self._calls:
            _, pending = await asyncio.wait(set(self._calls), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
