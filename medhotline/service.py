"""``medhotline serve``: the hotline service wired together.

One asyncio process per node. ARI is the primary path (Stasis app ``medhotline``), FastAGI serves legacy
dialplans, AMI watches Asterisk itself. Every call runs as its own task with ``call_id`` bound in the log
context; a call's failure is recorded and logged, never allowed to take other calls or the service down.
When Asterisk goes away the service keeps running and reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from sqlalchemy.orm import Session, sessionmaker

from ivr.ari_channel import (
    MEDIA_CHANNEL_PREFIX,
    SNOOP_ARG,
    SNOOP_CHANNEL_PREFIX,
    AriCallChannel,
    AriDispatcher,
    event_channel_id,
)
from ivr.ari_client import AriClient, AriError
from ivr.channel import CallChannel, CallerId, CallInfo, ChannelError, ConnectionLost, tell_unavailable_and_hang_up
from ivr.fastagi import FastAgiCallChannel
from ivr.fastagi import start_server as start_fastagi
from ivr.flow_loader import FlowError
from ivr.flow_model import ROUTE_CATEGORIES, RouteCategory
from ivr.flow_registry import FlowRegistry
from ivr.flow_source import LoadedFlow
from ivr.interpreter import FlowResult, FlowRunner, Outcome, Step
from ivr.ports import CallRecorder, ConsentExchange, NoPatientDirectory, NoRecognizer, PatientDirectory, Recognizer
from ivr.prompts import Voice, sound_name
from keywords.registry import LexiconRegistry
from medhotline import db, maintenance
from medhotline.ami import AmiMonitor
from medhotline.asterisk_config import AsteriskCredentials
from medhotline.config import Config
from medhotline.ids import is_uuid
from routing.ari_queue import AGENT_LEG_ARG, CallerQueue, EscalationTransfer, QueueResult, QueueSettings, QueueStep
from routing.callbacks import CALLBACK_ACCEPTED, CALLBACK_DUPLICATE, CALLBACK_GREETING, CallbackPolicy
from routing.engine import RoutingEngine

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.access_store import AccessControl
    from compliance.audit import AuditLog
    from his.directory import PatientServices
    from medhotline.callbacks import CallbackService
    from medhotline.surge import SurgeState
    from recordings.capture import CallRecordings, ChannelRecorder
    from routing.agent_endpoints import ContactView
    from routing.callback_store import CallbackRecord
    from routing.engine import Offer, Ticket
    from scheduler.outreach import CallOutreach, Outreach
    from scheduler.runner import OutreachScheduler
from medhotline.prompts import sounds_dir
from routing.model import CallPriority, CallRequest
from scheduler.outreach import OUTBOUND_ARG

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 20.0
# Seconds a caller turned away by a full queue has to press the callback key after the offer.
OVERFLOW_KEY_WAIT = 5.0
# The dialplan context (and Stasis argument) through which FastAGI calls join the ARI queue.
QUEUE_CONTEXT = "medhotline-queue"
QUEUE_ARG = "queue"
# How a call's record ends after its time in the queue.
QUEUE_OUTCOMES: dict[str, Outcome] = {
    "answered": "routed",
    "transferred": "transferred",
    "caller_hangup": "caller_hangup",
    # Routed, but nobody could take it: the caller was told where to turn; the path says "unavailable".
    "unavailable": "routed",
    # The caller chose to be called back; the path says "callback", the callbacks table has the rest.
    "callback": "routed",
    "failed": "error",
}


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so several nodes don't reconnect in lockstep."""

    initial: float = 0.5
    cap: float = 10.0
    _current: float = 0.0

    def next(self) -> float:
        self._current = self.initial if self._current == 0 else min(self.cap, self._current * 2)
        return self._current * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self._current = 0.0


def callback_policy(config: Config) -> CallbackPolicy:
    """``[routing]``'s callback settings (key "" : callbacks off)."""
    rc = config.routing
    return CallbackPolicy(
        threshold=rc.callback_threshold,
        handle_seconds=rc.callback_handle_seconds,
        max_attempts=rc.callback_attempts,
        retry_after=rc.callback_retry_after,
        key=rc.callback_key,
    )


def asterisk_credentials(config: Config) -> AsteriskCredentials:
    """External mode: from the configuration. Sandbox mode: the instance's generated secrets."""
    ast = config.asterisk
    if ast.mode == "external":
        # Both are guaranteed by config validation in external mode.
        assert ast.ari_password is not None
        assert ast.ami_secret is not None
        return AsteriskCredentials(
            ast.ari_username,
            ast.ari_password.get_secret_value(),
            ast.ami_username,
            ast.ami_secret.get_secret_value(),
        )
    from medhotline.sandbox import Sandbox

    return Sandbox(config).credentials()


class HotlineService:
    def __init__(
        self,
        config: Config,
        repo: db.CallRepository,
        flows: FlowRegistry,
        creds: AsteriskCredentials,
        *,
        recognizer: Recognizer | None = None,
        lexicon: LexiconRegistry | None = None,
        directory: PatientDirectory | None = None,
        engine: RoutingEngine | None = None,
        connect_directory: bool = False,
        access: AccessControl | None = None,
        recordings: CallRecordings | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        # Where an agent's upgrade of a call to emergency is audited (None only in tests of the IVR and routing).
        self.audit = audit
        # Recording, ingest and signed records; None only in tests of the IVR and routing alone.
        self.recordings = recordings
        # Outbound calls and the outreach nodes (set by run_service when [outreach] is enabled).
        self.outreach: Outreach | None = None
        # The hotline's mode from the database (surge or normal), polled on the reload loop; None in unit tests.
        self.surge: SurgeState | None = None
        # Callbacks instead of waiting (set by enable_callbacks when routing and callbacks are on).
        self.callbacks: CallbackService | None = None
        self.scheduler: OutreachScheduler | None = None
        # Calls an agent answered (their summary is sealed after the wrap-up) and calls handed to the ARI queue
        # by FastAGI (whose record is finished by the queue's side).
        self._answered: set[str] = set()
        self._handed_over: set[str] = set()
        # The access policy: the agent who answers an identified caller may see that patient during the call.
        self.access = access
        # Connect the patient registry (through the key service) when running; tests inject a directory instead.
        self.connect_directory = connect_directory
        self.lexicon = lexicon
        self.config = config
        self.repo = repo
        self.flows = flows
        self.creds = creds
        self.recognizer: Recognizer = recognizer or NoRecognizer()
        self.directory: PatientDirectory = directory or NoPatientDirectory()
        self.voice = Voice(config.prompts.voice, config.prompts.speed)
        self.dispatcher = AriDispatcher()
        self.ari = AriClient(
            config.asterisk.host,
            config.asterisk.ari_connect_port or config.asterisk.ari_port,
            creds.ari_username,
            creds.ari_password,
            config.asterisk.ari_app,
            timeout=config.asterisk.ari_timeout,
            max_connections=config.asterisk.ari_connections,
        )
        self._calls: set[asyncio.Task[None]] = set()
        self.engine = engine
        self.queue: CallerQueue | None = None
        if engine is not None:
            rc = config.routing
            self.queue = CallerQueue(
                self.ari,
                self.dispatcher,
                engine,
                settings=QueueSettings(
                    ring_timeout=rc.ring_timeout,
                    first_announcement=rc.first_announcement,
                    announce_every=rc.announce_every,
                    moh_class=rc.moh_class,
                    agent_caller_id=config.hotline.number,
                    emergency_key=rc.emergency_key,
                    upgrade_keys=rc.upgrade_keys,
                    callback=callback_policy(config),
                ),
                sound=lambda text: sound_name(text, self.voice),
                escalation_groups={
                    name: EscalationTransfer(g.number, g.trunk, g.ring_seconds, g.then_number, g.then_trunk)
                    for name, g in rc.escalation_groups.items()
                },
                recorder=recordings,
                on_upgrade=self._upgraded,
            )

    # -- calls ------------------------------------------------------------------------------------

    async def _record(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        """A database write for a call; a failure is logged loudly but never drops the caller."""
        try:
            await asyncio.to_thread(func, *args, **kwargs)
        except Exception:
            log.exception("call.record_failed", writing=what)

    async def handle_call(
        self, channel: CallChannel, *, flow: str | None = None, outreach: CallOutreach | None = None
    ) -> tuple[str, str]:
        """Run one call from arrival to the end of the IVR and keep its record; returns (call id, outcome).
        Never raises. ``flow`` and ``outreach``: an outbound call's flow and its patient's outreach port."""
        info = channel.info
        call_id = str(uuid.uuid4())
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            flows = self.flows.current  # this call's snapshot: later edits don't change it
            loaded = self._entry_flow(flows, flow, info.flow)
            if loaded is None:
                with contextlib.suppress(Exception):
                    await channel.hangup()
                return call_id, "error"
            log.info(
                "call.start",
                transport=info.transport,
                channel=info.channel_name,
                flow=loaded.flow.flow,
                version=loaded.version,
            )
            # The call's record is written in order beside the call, never in its way (a commit waits for the
            # disk); whatever refers to the call's row waits for these writes first (see _CallWrites).
            # Calls that may route at once (the queue answers them) hold their writes until the agent is dialled.
            defer_answer = (
                self.queue is not None and isinstance(channel, AriCallChannel) and not self.config.recordings.record_ivr
            )
            writes = _CallWrites(self._record, paused=defer_answer)
            writes.add(
                "start",
                self.repo.start,
                call_id=call_id,
                node=self.config.service.node_name,
                transport=info.transport,
                channel_id=info.channel_id,
                channel_name=info.channel_name,
                flow=loaded.flow.flow,
                flow_version=loaded.version,
                started_at=datetime.now(UTC),
            )
            answered = False
            ivr_recording: str | None = None
            recordings = self.recordings
            ivr_recorder = recordings.recorder(call_id, "ivr") if recordings is not None else None

            async def on_step(step: Step) -> None:
                nonlocal answered, ivr_recording
                now = datetime.now(UTC)
                if step.node_type != "route":
                    writes.resume()  # the IVR talks to the caller: nothing to get out of the way of
                if not answered:
                    answered = True
                    writes.add("answer", self.repo.mark_answered, call_id, now)
                    if ivr_recorder is not None and self.config.recordings.record_ivr:
                        await writes.drain()  # the recording's row refers to the call's
                        ivr_recording = await self._start_ivr_recording(ivr_recorder, channel)
                writes.add(
                    "step",
                    self.repo.add_step,
                    call_id,
                    flow=step.flow,
                    node=step.node,
                    node_type=step.node_type,
                    edge=step.edge,
                    input=step.input,
                    at=now,
                )

            runner = FlowRunner(
                flows,
                lambda text: sound_name(text, self.voice),
                on_step,
                recognizer=self.recognizer,
                directory=self.directory,
                consent=_CallConsent(recordings, call_id) if recordings is not None else None,
                recorder=_AfterWrites(recordings.recorder(call_id, "consent"), writes) if recordings else None,
                outreach=outreach or self._inbound_outreach(lambda: runner.variables.get("patient_ref"), call_id),
                # A route-first flow: the ARI queue answers the caller while it rings the agent.
                defer_answer=defer_answer,
            )
            try:
                result = await runner.run(loaded.flow, channel)
            except Exception as exc:
                log.exception("call.crashed")
                result = FlowResult("error", "unknown", f"{type(exc).__name__}")
                with contextlib.suppress(Exception):
                    await tell_unavailable_and_hang_up(channel)
            if ivr_recorder is not None and ivr_recording is not None:
                await ivr_recorder.stop(channel, ivr_recording)
            if recordings is not None and result.variables.get("patient_ref"):
                recordings.identify(call_id, result.variables["patient_ref"])
            if result.triage is not None:
                # In order with the call's other writes (the row may not be written yet) and before the queue: a
                # nurse's upgrade during the conversation lands beside what the IVR heard.
                writes.add(
                    "triage",
                    self.repo.record_triage,
                    call_id,
                    level=result.triage.level,
                    confidence=min(1.0, max(0.0, result.triage.confidence)),
                    discriminator=result.triage.discriminator,
                    confirm_answer=result.triage.confirm_answer,
                )
            if result.outcome == "routed" and result.route is not None:
                result = await self._to_agent(channel, call_id, result, writes)
            await self._finish_record(writes, call_id, result)
            log.info("call.end", outcome=result.outcome, last_step=result.last_step)
            if call_id not in self._handed_over:
                self._call_ended(call_id)
            self._handed_over.discard(call_id)
            return call_id, result.outcome

    async def _fastagi_call(self, channel: FastAgiCallChannel) -> None:
        await self.handle_call(channel)

    def _inbound_outreach(self, patient_of: Callable[[], str | None], call_id: str) -> CallOutreach | None:
        """Vaccination booking and adverse-reaction reports on the hotline: for the caller the IVR identified."""
        if self.outreach is None:
            return None
        from scheduler.outreach import CallOutreach

        return CallOutreach(self.outreach, patient_of=patient_of, call_id=lambda: call_id)

    async def run_outbound(self, leg: AriCallChannel, flow: str, port: CallOutreach) -> tuple[str, str]:
        """An answered outreach call: its flow, with the patient's outreach port (see scheduler.outreach)."""
        return await self.handle_call(leg, flow=flow, outreach=port)

    async def speak(self, text: str) -> str:
        """A sound for a text known only at call time (a medication, a booked date), rendered if new."""
        from ivr.prompts import render

        name = sound_name(text, self.voice)
        target = sounds_dir(self.config) / f"{name}.wav"
        if not await asyncio.to_thread(target.exists):
            await asyncio.to_thread(render, text, self.voice, target)
        return name

    def _call_ended(self, call_id: str) -> None:
        """Seal the call's summary after the wrap-up (the recordings know whether there is anything to seal)."""
        answered = call_id in self._answered
        self._answered.discard(call_id)
        if self.recordings is not None:
            self.recordings.spawn(
                self.recordings.call_ended(call_id, wrap_up=self.config.routing.wrap_up, answered_by_agent=answered)
            )

    async def _start_ivr_recording(self, recorder: ChannelRecorder, channel: CallChannel) -> str | None:
        try:
            return await recorder.start(channel, "ivr")
        except Exception:
            log.exception("recording.ivr_not_started")  # the call goes on unrecorded; the row says so
            return None

    async def _to_agent(
        self, channel: CallChannel, call_id: str, result: FlowResult, writes: _CallWrites
    ) -> FlowResult:
        """The IVR routed the call: wait in the queue for a qualified agent, then talk. Never raises."""
        route = result.route
        assert route is not None
        if self.queue is not None and isinstance(channel, FastAgiCallChannel):
            # The queue needs ARI (bridges, agent legs): the dialplan takes the call into Stasis as "queue".
            try:
                await writes.drain()  # the ARI side looks the call up by its record

                await channel.hand_over(
                    QUEUE_CONTEXT,
                    {
                        "MEDHOTLINE_CALL_ID": call_id,
                        "MEDHOTLINE_CATEGORY": route.category,
                        "MEDHOTLINE_PRIORITY": route.priority,
                    },
                )
                log.info("routing.handed_to_ari_queue", category=route.category)
                self._handed_over.add(call_id)
            except Exception:
                log.exception("routing.hand_over_failed")
                with contextlib.suppress(Exception):
                    await channel.hangup()
                return dataclasses.replace(result, outcome="error", error="hand-over to the queue failed")
            return result
        if self.queue is None or not isinstance(channel, AriCallChannel):
            log.error("routing.not_available", transport=channel.info.transport, category=route.category)
            with contextlib.suppress(Exception):
                await channel.hangup()
            return result
        if await self._overflowed(channel, call_id, route.category, route.priority, writes, answer=not result.answered):
            return result
        queued = await self._queue(
            channel,
            call_id,
            cast(RouteCategory, route.category),
            route.priority,
            patient_ref=result.variables.get("patient_ref"),
            writes=writes,
            answer=not result.answered,
        )
        # Who answered is in the ring history, an unavailable end in the path; the record keeps how it ended.
        return dataclasses.replace(
            result,
            outcome=QUEUE_OUTCOMES[queued.outcome],
            transfer_to=queued.transfer_to or result.transfer_to,
            error="queue failed" if queued.outcome == "failed" else result.error,
        )

    async def _queue(
        self,
        channel: AriCallChannel,
        call_id: str,
        category: RouteCategory,
        priority: str,
        *,
        patient_ref: str | None = None,
        writes: _CallWrites | None = None,
        answer: bool = False,
        serve: Callable[[QueueStep], Coroutine[Any, Any, QueueResult]] | None = None,
    ) -> QueueResult:
        """Wait for an agent and talk, recording the queue's milestones in the call's path. Never raises.
        ``writes``: the call's record writes, which the queue's steps join (in order); ``answer``: the IVR left the
        caller unanswered. ``serve``: how the queue serves the call (default: a caller joining the queue, answered
        by it if ``answer``); it is given the step recorder.

        When the IVR identified the caller, the answering agent gets the "current call" scope of the access
        policy for that patient until the wrap-up ends, and not a moment longer.
        """
        assert self.queue is not None
        assigned = False
        steps = writes or _CallWrites(self._record)

        async def on_step(node: str, edge: str | None, value: str | None) -> None:
            nonlocal assigned
            steps.add(
                "queue step",
                self.repo.add_step,
                call_id,
                flow="queue",
                node=node,
                node_type="queue",
                edge=edge,
                input=value,
                at=datetime.now(UTC),
                moves_last_step=False,
            )
            if node == "answered":
                # The conversation's recording and the agent's access refer to the call's record: written first.
                await steps.drain()
            if node == "answered" and edge is not None:
                self._answered.add(call_id)
            if node == "answered" and edge is not None and patient_ref and self.access is not None:
                await self._record(
                    "call assignment",
                    self.access.begin_call_assignment,
                    edge,
                    patient_ref,
                    call_id,
                    datetime.now(UTC),
                )
                assigned = True

        try:
            if serve is not None:
                steps.resume()  # no hold hook to wait for: the agent is reserved already
                return await serve(on_step)
            return await self.queue.serve(
                channel, call_id, category, cast(CallPriority, priority), on_step, answer=answer, on_hold=steps.resume
            )
        except Exception:
            log.exception("routing.crashed")
            with contextlib.suppress(Exception):
                await channel.hangup()
            return QueueResult("failed")
        finally:
            await steps.drain()
            if assigned:
                self._spawn(self._end_assignment(call_id, self.config.routing.wrap_up))

    def _entry_flow(self, flows: Mapping[str, LoadedFlow], flow: str | None, dialled: str) -> LoadedFlow | None:
        """The flow a call runs: an outbound call's own (None when it is missing: it must never run the hotline's
        in its place); else the dialled flow, through surge mode's entry while it is on; else the hotline's."""
        if flow is not None and flow not in flows:
            log.error("call.flow_missing", flow=flow)
            return None
        entry = flow or (self.surge.entry_flow(dialled) if self.surge is not None else dialled)
        return flows.get(entry) or flows[self.config.hotline.flow]

    async def _finish_record(self, writes: _CallWrites, call_id: str, result: FlowResult) -> None:
        """The call's final outcome, after every earlier write of the call."""
        writes.add(
            "finish",
            self.repo.finish,
            call_id,
            outcome=result.outcome,
            ended_at=datetime.now(UTC),
            last_step=result.last_step,
            error=result.error,
            route_category=result.route.category if result.route else None,
            route_priority=result.route.priority if result.route else None,
            transfer_to=result.transfer_to,
        )
        await writes.drain()

    async def _overflowed(
        self, channel: AriCallChannel, call_id: str, category: str, priority: str, writes: _CallWrites, *, answer: bool
    ) -> bool:
        """Surge mode's capacity limit: a normal call to a full queue hears the overflow message and the hang-up
        instead of waiting without end. Emergencies are never turned away. True when the call was turned away.
        ``answer``: the IVR left the caller unanswered (a route-first flow), so they are answered to hear it; the
        steps join the call's ``writes`` (its row may not be written yet)."""
        from routing.surge import OVERFLOW_GOODBYE, over_capacity, overflow_texts

        profile = self.surge.profile if self.surge is not None else None
        if profile is None or self.engine is None:
            return False
        request = CallRequest(call_id, cast(RouteCategory, category), cast(CallPriority, priority), datetime.now(UTC))
        if not over_capacity(profile, request, self.engine.waiting_by_category()):
            return False
        log.warning("surge.overflow", category=category)
        writes.resume()  # turned away: no reservation for the record's writes to get out of the way of
        writes.add(
            "overflow step", self.repo.add_step, call_id, flow="queue", node="overflow", node_type="queue",
            edge=category, input=None, at=datetime.now(UTC), moves_last_step=False,
        )  # fmt: skip
        # The profile's `overflow: callback` offers a callback at the place the caller would have had.
        key = self.config.routing.callback_key if self.callbacks is not None and channel.info.caller else ""
        texts = overflow_texts(profile, key)
        try:
            if answer:
                await channel.answer()
            pressed = await channel.play(sound_name(texts[0], self.voice), barge_in=True)
            if texts[1] != OVERFLOW_GOODBYE:
                pressed = pressed or await channel.play(sound_name(texts[1], self.voice), barge_in=True)
                pressed = pressed or await channel.read_digits(max_digits=1, timeout=OVERFLOW_KEY_WAIT)
                if pressed == key:
                    await self._overflow_callback(channel, call_id, request, writes)
                    return True
            await channel.play(sound_name(OVERFLOW_GOODBYE, self.voice))
            await channel.hangup()
        except ChannelError:
            pass  # the caller hung up meanwhile
        return True

    async def _overflow_callback(
        self, channel: AriCallChannel, call_id: str, request: CallRequest, writes: _CallWrites
    ) -> None:
        """The caller turned away by a full queue chose a callback: registered at their arrival time."""
        from routing.surge import OVERFLOW_GOODBYE

        assert self.callbacks is not None
        outcome = await self.callbacks.accept(call_id, channel.info.caller, request)
        writes.add(
            "callback step", self.repo.add_step, call_id, flow="queue", node="callback", node_type="queue",
            edge=outcome, input=self.config.routing.callback_key, at=datetime.now(UTC), moves_last_step=False,
        )  # fmt: skip
        text = {"accepted": CALLBACK_ACCEPTED, "duplicate": CALLBACK_DUPLICATE}.get(outcome, OVERFLOW_GOODBYE)
        await channel.play(sound_name(text, self.voice))
        await channel.hangup()

    async def _upgraded(self, call_id: str, agent_id: str) -> None:
        """An agent upgraded the call to emergency from their phone: the record says so (who, when), and the audit
        trail has it. The record comes first: it is what the hospital reads; a failed audit entry is logged."""
        at = datetime.now(UTC)
        await asyncio.to_thread(self.repo.upgrade_to_emergency, call_id, by=agent_id, at=at)
        if self.audit is not None:
            await self._record(
                "upgrade audit",
                self.audit.append,
                actor=agent_id,
                role="agent",
                action="change",
                outcome="success",
                reason="call upgraded to emergency by the agent",
                details={"call": call_id, "priority": "emergency", "via": "phone keys"},
            )

    async def _end_assignment(self, call_id: str, after: float) -> None:
        await asyncio.sleep(after)
        assert self.access is not None
        await self._record("end of call assignment", self.access.end_call_assignment, call_id, datetime.now(UTC))

    async def handle_handed_over(self, channel: AriCallChannel) -> None:
        """A call whose IVR ran over FastAGI, now in Stasis to wait for an agent. Never raises."""
        names = ("MEDHOTLINE_CALL_ID", "MEDHOTLINE_CATEGORY", "MEDHOTLINE_PRIORITY")
        try:
            values = [await self._channel_variable(channel.info.channel_id, name) for name in names]
        except ChannelError as exc:
            log.error("routing.hand_over_unreadable", reason=str(exc))
            with contextlib.suppress(Exception):
                await channel.hangup()
            return
        call_id, category, priority = values
        known = await asyncio.to_thread(self.repo.get, call_id) if is_uuid(call_id) else None
        if known is None or category not in ROUTE_CATEGORIES or priority not in ("normal", "emergency"):
            # Only the service's own hand-over sets these; anything else is refused, never guessed at.
            log.error("routing.hand_over_invalid", known_call=known is not None, category=category[:32])
            with contextlib.suppress(Exception):
                await channel.hangup()
            return
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            queued = await self._queue(channel, call_id, category, priority)
            outcome = QUEUE_OUTCOMES[queued.outcome]
            await self._record(
                "queue end",
                self.repo.refine_routed,
                call_id,
                outcome=outcome,
                ended_at=datetime.now(UTC),
                transfer_to=queued.transfer_to,
            )
            log.info("call.queue_end", outcome=queued.outcome)
            self._call_ended(call_id)

    async def _channel_variable(self, channel_id: str, name: str) -> str:
        reply = await self.ari.request("GET", f"/channels/{channel_id}/variable", {"variable": name})
        value = reply.get("value", "") if isinstance(reply, dict) else ""
        return str(value)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    # -- ARI --------------------------------------------------------------------------------------

    def on_ari_event(self, event: dict[str, Any]) -> None:
        log.debug("ari.event", event_type=event["type"], channel_id=event_channel_id(event))
        if event["type"] == "StasisStart":
            chan = event.get("channel") or {}
            args = event.get("args") or []
            if str(chan.get("name", "")).startswith(MEDIA_CHANNEL_PREFIX):
                return  # the service's own audio tap (external media) entering Stasis, not a call
            if (args and args[0] == SNOOP_ARG) or str(chan.get("name", "")).startswith(SNOOP_CHANNEL_PREFIX):
                self.dispatcher.dispatch(event)  # a recording's snoop channel: the recording waits for it
                return
            if args and args[0] in (AGENT_LEG_ARG, OUTBOUND_ARG):
                self.dispatcher.dispatch(event)  # an agent or a patient answered a call we dialled
                return
            if args and args[0] == QUEUE_ARG and isinstance(chan.get("id"), str):
                queued = AriCallChannel(
                    self.ari,
                    CallInfo(chan["id"], str(chan.get("name", "")), "ari", "", ""),
                )
                self.dispatcher.register(queued)

                async def run_queued() -> None:
                    try:
                        await self.handle_handed_over(queued)
                    finally:
                        self.dispatcher.unregister(queued.info.channel_id)

                self._spawn(run_queued())
                return
            if not isinstance(chan.get("id"), str):
                log.warning("ari.bad_event", reason="StasisStart without channel id")
                return
            info = CallInfo(
                channel_id=chan["id"],
                channel_name=str(chan.get("name", "")),
                transport="ari",
                flow=str(args[0]) if args else self.config.hotline.flow,
                dialed=str((chan.get("dialplan") or {}).get("exten", "")),
                caller=CallerId(str((chan.get("caller") or {}).get("number", ""))),
            )
            channel = AriCallChannel(self.ari, info)
            self.dispatcher.register(channel)

            async def run() -> None:
                try:
                    await self.handle_call(channel)
                finally:
                    self.dispatcher.unregister(info.channel_id)

            self._spawn(run())
            return
        self.dispatcher.dispatch(event)

    async def ari_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for event in self.ari.events():
                    backoff.reset()
                    self.on_ari_event(event)
            except ConnectionLost as exc:
                log.warning("ari.disconnected", reason=str(exc), calls_in_progress=len(self.dispatcher))
                self.dispatcher.fail_all(exc)
            except AriError as exc:
                log.error("ari.refused", reason=str(exc))
            await asyncio.sleep(backoff.next())

    # -- hot reload -------------------------------------------------------------------------------

    async def reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.hotline.reload_interval)
            try:
                await asyncio.to_thread(self.flows.refresh)
                if self.surge is not None:
                    await self.surge.poll()
                if self.lexicon is not None:
                    await asyncio.to_thread(self.lexicon.refresh)
            except Exception:
                log.exception("reload_failed")

    def _install_directory(self, directory: PatientDirectory) -> None:
        self.directory = directory  # calls starting from now identify their caller

    def _patients_ready(self, services: PatientServices) -> None:
        if self.outreach is not None:
            self.outreach.patients_ready(services)  # the dialer reads numbers, the nodes check identities
        if self.callbacks is not None:
            self.callbacks.patients_ready(services)  # callbacks' numbers are encrypted and indexed through it

    def enable_callbacks(self, sessions: sessionmaker[Session]) -> None:
        """Callbacks instead of waiting: the queue's offer and this node's callback dialler."""
        from medhotline.callbacks import CallbackService

        if self.engine is None or self.queue is None or not self.config.routing.callback_key:
            return
        self.callbacks = CallbackService(
            self.config,
            sessions,
            self.ari,
            self.dispatcher,
            self.engine,
            callback_policy(self.config),
            serve_answered=self._serve_callback,
        )
        self.queue.callbacks = self.callbacks

    async def _serve_callback(self, leg: AriCallChannel, ticket: Ticket, offer: Offer, callback: CallbackRecord) -> str:
        """A callback's patient answered: the attempt is a call of its own (record, path, recording), which starts
        by telling the patient who calls and continues as a routed call with the agent reserved for it."""
        assert self.queue is not None
        queue = self.queue
        call_id = ticket.request.call_id
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            now = datetime.now(UTC)
            # As for any call, the record is written in order beside the call (the greeting and the agent's ring
            # don't wait for a commit); the queue's steps join these writes, the finish waits for all of them.
            writes = _CallWrites(self._record)
            writes.add(
                "start", self.repo.start, call_id=call_id, node=self.config.service.node_name, transport="ari",
                channel_id=leg.info.channel_id, channel_name=leg.info.channel_name, flow="callback",
                flow_version=None, started_at=now,
            )  # fmt: skip
            writes.add("answer", self.repo.mark_answered, call_id, now)
            # The path names the call that asked for it (the callback's own id is in the callbacks table).
            writes.add(
                "callback step", self.repo.add_step, call_id, flow="callback", node="callback", node_type="callback",
                edge=callback.call_id, input=str(callback.attempts), at=now,
            )  # fmt: skip

            async def serve(step: QueueStep) -> QueueResult:
                try:
                    await leg.play(sound_name(CALLBACK_GREETING, self.voice))
                except ChannelError:
                    if self.engine is not None:
                        await self.engine.abandon(call_id)  # frees the reserved agent
                    return QueueResult("caller_hangup")
                return await queue.serve_callback(leg, ticket, offer, step)

            queued = await self._queue(
                leg, call_id, cast(RouteCategory, callback.category), callback.priority, writes=writes, serve=serve
            )
            writes.add(
                "finish", self.repo.finish, call_id, outcome=QUEUE_OUTCOMES[queued.outcome], ended_at=datetime.now(UTC),
                last_step="callback", error="queue failed" if queued.outcome == "failed" else None,
                route_category=callback.category, route_priority=callback.priority,
            )  # fmt: skip
            await writes.drain()
            self._call_ended(call_id)
            return queued.outcome

    def enable_outreach(self, sessions: sessionmaker[Session], bind: Engine) -> None:
        """Outbound calls: the scheduler (jobs, leader lock) and the dialer, over this service's ARI."""
        from scheduler.leader import leader_lock_for
        from scheduler.outreach import Outreach
        from scheduler.policy import DialPolicy
        from scheduler.runner import OutreachScheduler

        self.outreach = Outreach(
            self.config,
            sessions,
            self.ari,
            self.dispatcher,
            run_call=self.run_outbound,
            speak=self.speak,
            policy=DialPolicy.from_config(self.config.outreach),
        )
        self.scheduler = OutreachScheduler(
            bind,
            leader_lock_for(bind, self.config.service.state_dir),
            due_items=self.outreach.due_items,
            on_fire=self.outreach.on_fire,
            periodic_jobs=self.outreach.periodic_jobs(),
        )

    async def agent_endpoints_loop(self) -> None:
        """Sandbox only: keep the agents' PJSIP endpoints in Asterisk in step with the agent table."""
        from medhotline.sandbox import Sandbox
        from routing.agent_endpoints import FILE_NAME, render_agent_endpoints

        assert self.engine is not None
        sandbox = Sandbox(self.config)
        while True:
            try:
                # The engine's own last read of the agent table (refreshed every refresh_interval).
                await self.engine.refreshed.wait()
                text = render_agent_endpoints(
                    cast("list[ContactView]", list(self.engine.snapshot)), media_address=self.config.asterisk.host
                )
                if await asyncio.to_thread(sandbox.write_etc_file, FILE_NAME, text):
                    await self.ari.request("PUT", "/asterisk/modules/res_pjsip.so")
                    log.info("routing.agent_endpoints_reloaded", agents=text.count("type = aor"))
            except Exception:
                log.exception("routing.agent_endpoints_failed")
            await asyncio.sleep(max(1.0, self.config.routing.refresh_interval * 4))

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        fa = self.config.fastagi
        server = await start_fastagi(fa.host, fa.port, self._fastagi_call)
        log.info(
            "service.started",
            node=self.config.service.node_name,
            fastagi_port=fa.port,
            flows=sorted(self.flows.current),
        )
        ami = AmiMonitor(
            self.config.asterisk.host,
            self.config.asterisk.ami_port,
            self.creds.ami_username,
            self.creds.ami_secret,
            on_contact=self.engine.contact_state if self.engine is not None else None,
        )
        ami.start()
        loops = [
            asyncio.create_task(self.ari_loop()),
            asyncio.create_task(self.reload_loop()),
            asyncio.create_task(maintenance.sign_audit_heads(self.config)),
            asyncio.create_task(maintenance.sweep_break_glass(self.config)),
        ]
        if self.connect_directory:
            loops.append(
                asyncio.create_task(
                    maintenance.connect_patient_directory(
                        self.config, self._install_directory, ready=self._patients_ready
                    )
                )
            )
        if self.recordings is not None:
            loops.append(asyncio.create_task(self.recordings.resume_loop(self.ari, datetime.now(UTC))))
        if self.callbacks is not None:
            loops.append(asyncio.create_task(self.callbacks.run()))
        if self.outreach is not None and self.scheduler is not None:
            loops.append(asyncio.create_task(self.scheduler.run()))
            loops.append(asyncio.create_task(self.outreach.dialer_loop(self.scheduler.leading)))
        if self.engine is not None:
            loops.append(asyncio.create_task(self.engine.run()))
            loops.append(asyncio.create_task(maintenance.check_credentials_daily(self.config)))
            if self.config.asterisk.mode == "sandbox":
                loops.append(asyncio.create_task(self.agent_endpoints_loop()))
        try:
            await stop.wait()
        finally:
            log.info("service.stopping", calls_in_progress=len(self._calls))
            server.close()
            if self._calls:
                _, pending = await asyncio.wait(self._calls, timeout=SHUTDOWN_GRACE)
                for task in pending:
                    task.cancel()
            if self.outreach is not None:
                await self.outreach.drain(SHUTDOWN_GRACE)
            if self.callbacks is not None:
                await self.callbacks.drain(SHUTDOWN_GRACE)
            if self.recordings is not None:
                await self.recordings.drain(SHUTDOWN_GRACE)
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, *self._calls, return_exceptions=True)
            ami.close()
            if self.engine is not None:
                self.engine.close()
            await self.ari.aclose()
            log.info("service.stopped")


class _CallWrites:
    """One call's record writes, in the order they were made, off the call's path: the caller never waits for a
    commit. ``drain`` waits for every write made so far; it comes before anything that reads the call's record
    back or writes a row that refers to it (a recording, the FastAGI hand-over, the agent's access, the end)."""

    def __init__(self, record: Callable[..., Awaitable[None]], *, paused: bool = False) -> None:
        self._record = record  # HotlineService._record: logs a failure, never raises
        self._tail: asyncio.Task[None] | None = None
        # Paused: the writes wait (in order) until resume(), so they don't contend with the agent's reservation
        # for the database on the way to the agent's phone.
        self._go = asyncio.Event()
        if not paused:
            self._go.set()

    def add(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        previous, go = self._tail, self._go

        async def write() -> None:
            if previous is not None:
                await previous
            else:
                await go.wait()
            await self._record(what, func, *args, **kwargs)

        self._tail = asyncio.create_task(write())

    def resume(self) -> None:
        self._go.set()

    async def drain(self) -> None:
        self.resume()
        if self._tail is not None:
            await asyncio.shield(self._tail)


class _AfterWrites:
    """A call recorder whose recordings start only once the call's record is written (their rows refer to it)."""

    def __init__(self, recorder: CallRecorder, writes: _CallWrites) -> None:
        self._recorder = recorder
        self._writes = writes

    async def start(self, channel: CallChannel, label: str) -> str:
        await self._writes.drain()
        return await self._recorder.start(channel, label)

    async def stop(self, channel: CallChannel, name: str) -> None:
        await self._recorder.stop(channel, name)


class _CallConsent:
    """The IVR's consent port for one call: the record is sealed in the background once its recording is
    stored, so the caller is not kept waiting for the key service and the timestamp authority."""

    def __init__(self, recordings: CallRecordings, call_id: str) -> None:
        self._recordings = recordings
        self._call_id = call_id

    async def consent_given(self, exchange: ConsentExchange) -> None:
        self._recordings.spawn(self._recordings.consent_given(self._call_id, exchange))


def build_recognizer(config: Config) -> tuple[Recognizer, LexiconRegistry | None]:
    """The ``listen`` nodes' recognizer from ``[speech]``; a missing or broken model stops the start-up here."""
    speech = config.speech
    if speech.engine == "none":
        return NoRecognizer(), None
    from keywords.lexicon import DEFAULT_LEXICON_DIR, LexiconError
    from keywords.recognizer import ScriptedSpeech, SpeechEngine, StreamingRecognizer, registry_classifier

    lexicon = LexiconRegistry(speech.lexicon_dir or DEFAULT_LEXICON_DIR)
    problems = lexicon.refresh()
    if lexicon.current is None:
        raise LexiconError(problems or [])
    classify = registry_classifier(lexicon)
    engine: SpeechEngine
    if speech.engine == "scripted":
        engine = ScriptedSpeech(list(speech.script))
    else:
        from keywords.speech import SpeechModel

        assert speech.model_path is not None  # guaranteed by config validation
        engine = SpeechModel.load(speech.model_path)
    return StreamingRecognizer(engine, classify), lexicon


def build_routing_engine(config: Config, sessions: sessionmaker[Session]) -> RoutingEngine:
    """The routing engine over the shared agent table; rules from ``routing.rules_file`` or the built-in ones."""
    from routing.engine import EngineSettings
    from routing.rules import DEFAULT_RULES, load_rules
    from routing.store import AgentStore

    rc = config.routing
    rules = load_rules(rc.rules_file) if rc.rules_file is not None else DEFAULT_RULES
    settings = EngineSettings(
        node=config.service.node_name,
        refresh_interval=rc.refresh_interval,
        wrap_up=rc.wrap_up,
        no_answer_pause=rc.no_answer_pause,
    )
    return RoutingEngine(AgentStore(sessions), rules, settings)


def recording_spool(config: Config) -> Path:
    """Where this host reads the recordings Asterisk writes (astspooldir/recording)."""
    if config.recordings.spool_dir is not None:
        return config.recordings.spool_dir
    if config.asterisk.mode == "external":
        return Path("/var/spool/asterisk/recording")
    from medhotline.sandbox import Sandbox

    return Sandbox(config).instance_dir / "spool" / "recording"


def build_recordings(config: Config, sessions: sessionmaker[Session]) -> CallRecordings:
    """Capture, ingest and signed records over the key service (connected on first use, so the service starts
    and records even while the key service is still coming up; ingest waits for it)."""
    from compliance.audit import AuditLog, SqlAuditStore
    from compliance.data_keys import LazyKeyService
    from recordings.capture import CallRecordings
    from recordings.ingest import Ingestor
    from recordings.records import open_sealer
    from recordings.retention import RetentionPolicy
    from recordings.store import RecordingStore

    keys = LazyKeyService(config)
    audit = AuditLog(SqlAuditStore(db.make_engine(config.database_url)))
    store = RecordingStore(sessions)
    ingestor = Ingestor(
        store,
        keys,
        spool_dir=recording_spool(config),
        store_dir=config.recordings_store,
        policy=RetentionPolicy.from_config(config.recordings.retention_years),
        calls=db.CallRepository(sessions),
        audit=audit,
    )
    sealer = open_sealer(config, sessions, keys, audit)
    return CallRecordings(store, ingestor, sealer, department=config.recordings.department)


def run_service(config: Config) -> int:
    db.ensure_current(config.database_url)
    flows = FlowRegistry(config.hotline.flows_dir)
    problems = flows.refresh() or []
    if config.hotline.flow not in flows.current:
        raise FlowError(
            config.hotline.flows_dir, problems or [f"the hotline flow {config.hotline.flow!r} is not defined"]
        )
    sessions = db.make_sessionmaker(config.database_url)
    repo = db.CallRepository(sessions)
    recognizer, lexicon = build_recognizer(config)
    engine = build_routing_engine(config, sessions)
    from compliance.access_store import AccessControl
    from his.tables import PatientStore

    bind = db.make_engine(config.database_url)
    access = AccessControl.for_engine(bind, patients=PatientStore.for_engine(bind))

    recordings = build_recordings(config, sessions) if config.recordings.enabled else None
    from compliance.audit import AuditLog, SqlAuditStore

    audit = AuditLog(SqlAuditStore(bind))

    async def main() -> None:
        service = HotlineService(
            config,
            repo,
            flows,
            asterisk_credentials(config),
            recognizer=recognizer,
            lexicon=lexicon,
            engine=engine,
            connect_directory=True,
            access=access,
            recordings=recordings,
            audit=audit,
        )
        if config.outreach.enabled:
            service.enable_outreach(sessions, bind)
        service.enable_callbacks(sessions)
        from medhotline.surge import SurgeState
        from routing.callback_store import ModeStore

        service.surge = SurgeState(
            ModeStore(sessions),
            flows,
            engine,
            config.hotline.flow,
            service.speak,
            callback_key=config.routing.callback_key if service.callbacks is not None else "",
        )
        try:
            await service.surge.poll()  # a node started during a surge serves it from its first call
        except Exception:
            log.exception("surge.poll_failed")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(main())
    return 0
