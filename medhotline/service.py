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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from sqlalchemy.orm import Session, sessionmaker

from compliance.access_store import AccessControl
from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import LazyKeyService
from ground import db
from ground.config import Config
from ground.ids import is_uuid
from his.tables import PatientStore
from ivr.fastagi import FastAgiCallChannel
from ivr.fastagi import start_server as start_fastagi
from ivr.flow_loader import FlowError
from ivr.flow_registry import FlowRegistry
from ivr.interpreter import FlowResult, FlowRunner, Outcome, Step
from ivr.prompts import Voice, render, sound_name
from keywords.lexicon import DEFAULT_LEXICON_DIR, LexiconError
from keywords.recognizer import ScriptedSpeech, SpeechEngine, StreamingRecognizer, registry_classifier
from keywords.registry import LexiconRegistry
from keywords.speech import SpeechModel
from medhotline import maintenance
from medhotline.ami import AmiMonitor
from medhotline.asterisk_config import AsteriskCredentials
from medhotline.sandbox import Sandbox
from medhotline.surge import SurgeState
from recordings.capture import CallRecordings
from recordings.ingest import Ingestor
from recordings.records import open_sealer
from recordings.retention import RetentionPolicy
from recordings.store import RecordingStore
from routing.agent_endpoints import FILE_NAME, render_agent_endpoints
from routing.ari_queue import AGENT_LEG_ARG, CallerQueue, EscalationTransfer, QueueResult, QueueSettings
from routing.callback_store import ModeStore
from routing.engine import EngineSettings, RoutingEngine
from routing.model import CallRequest
from routing.rules import DEFAULT_RULES, load_rules
from routing.store import AgentStore
from routing.surge import over_capacity, overflow_texts
from scheduler.leader import leader_lock_for
from scheduler.outreach import CallOutreach, Outreach
from scheduler.policy import DialPolicy
from scheduler.runner import OutreachScheduler
from telephony.ari_channel import (
    MEDIA_CHANNEL_PREFIX,
    SNOOP_ARG,
    SNOOP_CHANNEL_PREFIX,
    AriCallChannel,
    AriDispatcher,
    event_channel_id,
)
from telephony.ari_client import AriClient, AriError
from telephony.channel import CallChannel, CallerId, CallInfo, ChannelError, ConnectionLost
from telephony.consult import ROUTE_CATEGORIES, RouteCategory
from telephony.ports import ConsentExchange, NoPatientDirectory, NoRecognizer, PatientDirectory, Recognizer

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.access_store import AccessControl
    from compliance.audit import AuditLog
    from his.directory import PatientServices
    from medhotline.surge import SurgeState
    from recordings.capture import CallRecordings, ChannelRecorder
    from routing.agent_endpoints import ContactView
    from scheduler.outreach import CallOutreach, Outreach
    from scheduler.runner import OutreachScheduler
from medhotline.prompts import sounds_dir
from routing.model import CallPriority
from scheduler.outreach import OUTBOUND_ARG

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 20.0
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
            config.asterisk.ari_port,
            creds.ari_username,
            creds.ari_password,
            config.asterisk.ari_app,
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
            if flow is not None and flow not in flows:
                # An outbound call must run its own flow, never the hotline's in its place.
                log.error("call.flow_missing", flow=flow)
                with contextlib.suppress(Exception):
                    await channel.hangup()
                return call_id, "error"
            entry = flow or (self.surge.entry_flow(info.flow) if self.surge is not None else info.flow)
            loaded = flows.get(entry) or flows[self.config.hotline.flow]
            log.info(
                "call.start",
                transport=info.transport,
                channel=info.channel_name,
                flow=loaded.flow.flow,
                version=loaded.version,
            )
            await self._record(
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
                if not answered:
                    answered = True
                    await self._record("answer", self.repo.mark_answered, call_id, now)
                    if ivr_recorder is not None and self.config.recordings.record_ivr:
                        ivr_recording = await self._start_ivr_recording(ivr_recorder, channel)
                await self._record(
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
                recorder=recordings.recorder(call_id, "consent") if recordings is not None else None,
                outreach=outreach or self._inbound_outreach(lambda: runner.variables.get("patient_ref"), call_id),
            )
            try:
                result = await runner.run(loaded.flow, channel)
            except Exception as exc:
                log.exception("call.crashed")
                result = FlowResult("error", "unknown", f"{type(exc).__name__}")
                with contextlib.suppress(Exception):
                    await channel.hangup()
            if ivr_recorder is not None and ivr_recording is not None:
                await ivr_recorder.stop(channel, ivr_recording)
            if recordings is not None and result.variables.get("patient_ref"):
                recordings.identify(call_id, result.variables["patient_ref"])
            if result.triage is not None:
                # Before the queue: a nurse's upgrade during the conversation lands beside what the IVR heard.
                await self._record(
                    "triage",
                    self.repo.record_triage,
                    call_id,
                    level=result.triage.level,
                    confidence=min(1.0, max(0.0, result.triage.confidence)),
                    discriminator=result.triage.discriminator,
                    confirm_answer=result.triage.confirm_answer,
                )
            if result.outcome == "routed" and result.route is not None:
                result = await self._to_agent(channel, call_id, result)
            await self._record(
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

        return CallOutreach(self.outreach, patient_of=patient_of, call_id=lambda: call_id)

    async def run_outbound(self, leg: AriCallChannel, flow: str, port: CallOutreach) -> tuple[str, str]:
        """An answered outreach call: its flow, with the patient's outreach port (see scheduler.outreach)."""
        return await self.handle_call(leg, flow=flow, outreach=port)

    async def speak(self, text: str) -> str:
        """A sound for a text known only at call time (a medication, a booked date), rendered if new."""

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

    async def _to_agent(self, channel: CallChannel, call_id: str, result: FlowResult) -> FlowResult:
        """The IVR routed the call: wait in the queue for a qualified agent, then talk. Never raises."""
        route = result.route
        assert route is not None
        if self.queue is not None and isinstance(channel, FastAgiCallChannel):
            # The queue needs ARI (bridges, agent legs): the dialplan takes the call into Stasis as "queue".
            try:
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
        if await self._overflowed(channel, call_id, route.category, route.priority):
            return result
        queued = await self._queue(
            channel,
            call_id,
            cast(RouteCategory, route.category),
            route.priority,
            patient_ref=result.variables.get("patient_ref"),
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
    ) -> QueueResult:
        """Wait for an agent and talk, recording the queue's milestones in the call's path. Never raises.

        When the IVR identified the caller, the answering agent gets the "current call" scope of the access
        policy for that patient until the wrap-up ends, and not a moment longer.
        """
        assert self.queue is not None
        assigned = False

        async def on_step(node: str, edge: str | None, value: str | None) -> None:
            nonlocal assigned
            await self._record(
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
            return await self.queue.serve(channel, call_id, category, cast(CallPriority, priority), on_step)
        except Exception:
            log.exception("routing.crashed")
            with contextlib.suppress(Exception):
                await channel.hangup()
            return QueueResult("failed")
        finally:
            if assigned:
                self._spawn(self._end_assignment(call_id, self.config.routing.wrap_up))

    async def _overflowed(self, channel: AriCallChannel, call_id: str, category: str, priority: str) -> bool:
        """Surge mode's capacity limit: a normal call to a full queue hears the overflow message and the hang-up
        instead of waiting without end. Emergencies are never turned away. True when the call was turned away."""

        profile = self.surge.profile if self.surge is not None else None
        if profile is None or self.engine is None:
            return False
        request = CallRequest(call_id, cast(RouteCategory, category), cast(CallPriority, priority), datetime.now(UTC))
        if not over_capacity(profile, request, self.engine.waiting_by_category()):
            return False
        log.warning("surge.overflow", category=category)
        await self._record(
            "overflow step", self.repo.add_step, call_id, flow="queue", node="overflow", node_type="queue",
            edge=category, input=None, at=datetime.now(UTC), moves_last_step=False,
        )  # fmt: skip
        try:
            for text in overflow_texts(profile, callback_offered=False):
                await channel.play(sound_name(text, self.voice))
            await channel.hangup()
        except ChannelError:
            pass  # the caller hung up meanwhile
        return True

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

    def enable_outreach(self, sessions: sessionmaker[Session], bind: Engine) -> None:
        """Outbound calls: the scheduler (jobs, leader lock) and the dialer, over this service's ARI."""

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

        assert self.engine is not None
        sandbox = Sandbox(self.config)
        while True:
            try:
                # The engine's own last read of the agent table (refreshed every refresh_interval).
                await self.engine.refreshed.wait()
                text = render_agent_endpoints(cast("list[ContactView]", list(self.engine.snapshot)))
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

    lexicon = LexiconRegistry(speech.lexicon_dir or DEFAULT_LEXICON_DIR)
    problems = lexicon.refresh()
    if lexicon.current is None:
        raise LexiconError(problems or [])
    classify = registry_classifier(lexicon)
    engine: SpeechEngine
    if speech.engine == "scripted":
        engine = ScriptedSpeech(list(speech.script))
    else:
        assert speech.model_path is not None  # guaranteed by config validation
        engine = SpeechModel.load(speech.model_path)
    return StreamingRecognizer(engine, classify), lexicon


def build_routing_engine(config: Config, sessions: sessionmaker[Session]) -> RoutingEngine:
    """The routing engine over the shared agent table; rules from ``routing.rules_file`` or the built-in ones."""

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

    return Sandbox(config).instance_dir / "spool" / "recording"


def build_recordings(config: Config, sessions: sessionmaker[Session]) -> CallRecordings:
    """Capture, ingest and signed records over the key service (connected on first use, so the service starts
    and records even while the key service is still coming up; ingest waits for it)."""

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

    bind = db.make_engine(config.database_url)
    access = AccessControl.for_engine(bind, patients=PatientStore.for_engine(bind))

    recordings = build_recordings(config, sessions) if config.recordings.enabled else None

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

        service.surge = SurgeState(ModeStore(sessions), flows, engine, config.hotline.flow, service.speak)
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
