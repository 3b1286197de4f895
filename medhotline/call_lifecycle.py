"""One call's life in the service: the IVR, the record, the queue and the agent, the end (sealing, assignments).

The composition root (:class:`medhotline.service.HotlineService`) owns the wiring; :class:`CallLifecycle` reads it
through the :class:`CallWiring` port at each call, so a directory or outreach connected later is used by the
next call. Every call is its own task with ``call_id`` bound; nothing here lets one call take another down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import structlog

from compliance.access_store import AccessControl
from compliance.audit import AuditLog
from ground import db
from ground.config import Config
from ground.db_retry import RETRY_SECONDS, while_unavailable
from ground.ids import is_uuid
from ground.logs import get_logger, hold_lines
from ivr.fastagi import FastAgiCallChannel
from ivr.flow_registry import FlowRegistry
from ivr.flow_source import LoadedFlow
from ivr.interpreter import FlowResult, FlowRunner, Outcome, Step
from ivr.prompts import Voice, render, sound_name
from medhotline.callbacks import CallbackService
from medhotline.prompts import sounds_dir
from medhotline.surge import SurgeState
from recordings.capture import CallRecordings, ChannelRecorder
from routing.ari_queue import CallerQueue, QueueResult, QueueStep
from routing.callback_store import CallbackRecord
from routing.callbacks import CALLBACK_ACCEPTED, CALLBACK_DUPLICATE, CALLBACK_GREETING
from routing.engine import Offer, RoutingEngine, Ticket
from routing.model import CallPriority, CallRequest
from routing.surge import OVERFLOW_GOODBYE, over_capacity, overflow_texts
from scheduler.outreach import CallOutreach, Outreach
from telephony.ari_channel import (
    AriCallChannel,
    AriDispatcher,
)
from telephony.ari_client import AriClient
from telephony.channel import CallChannel, ChannelError, tell_unavailable_and_hang_up
from telephony.consult import ROUTE_CATEGORIES, RouteCategory
from telephony.ports import (
    CallRecorder,
    ConsentExchange,
    PatientDirectory,
    Recognizer,
)

log = get_logger("medhotline.service")

# Seconds a caller turned away by a full queue has to press the callback key after the offer.
OVERFLOW_KEY_WAIT = 5.0
# The dialplan context (and Stasis argument) through which FastAGI calls join the ARI queue.
# How long a call's record write keeps trying while no writable primary answers (a PostgreSQL failover: the
# primary lost, a standby being promoted; docs/cluster.md). Longer than a promotion by hand or by Patroni's
# default TTL takes; the call itself never waits for it (see _CallWrites).
RECORD_RETRY_SECONDS = RETRY_SECONDS


async def record_write(
    what: str, func: Callable[..., Any], *args: Any, retry_for: float = RECORD_RETRY_SECONDS, **kwargs: Any
) -> bool:
    """Run one database write for a call off the event loop; never raises, returns whether it was stored.

    A :class:`~ground.db.DatabaseUnavailable` (connection lost, primary gone, standby not yet promoted) is retried
    with a growing pause for ``retry_for`` seconds: the pool has dropped the dead connection, so the next attempt
    connects afresh through the URL's host list to whichever server is the primary now. The repositories' writes
    are idempotent under such a retry. Any other failure is logged at once and not retried.
    """
    try:
        await while_unavailable(
            functools.partial(func, *args, **kwargs),
            retry_for=retry_for,
            on_retry=lambda exc, pause: log.warning("call.record_retry", writing=what, reason=str(exc), pause=pause),
        )
    except db.DatabaseUnavailable as exc:
        log.error("call.record_failed", writing=what, reason=str(exc), retried_for=retry_for)
        return False
    except Exception:
        log.exception("call.record_failed", writing=what)
        return False
    return True


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


class CallWiring(Protocol):
    """What a call needs of the composition root; some parts are connected after start (directory, outreach)."""

    config: Config
    repo: db.CallRepository
    flows: FlowRegistry
    voice: Voice
    ari: AriClient
    dispatcher: AriDispatcher
    queue: CallerQueue | None
    recordings: CallRecordings | None
    access: AccessControl | None
    audit: AuditLog | None
    engine: RoutingEngine | None
    surge: SurgeState | None
    outreach: Outreach | None
    recognizer: Recognizer
    directory: PatientDirectory
    callbacks: CallbackService | None


class CallLifecycle:
    """Runs calls (ARI, FastAGI, outbound, handed over from FastAGI) from arrival to their sealed end."""

    def __init__(self, wiring: CallWiring) -> None:
        self.wiring = wiring
        # Calls an agent answered (their summary is sealed after the wrap-up) and calls handed to the ARI queue
        # by FastAGI (whose record is finished by the queue's side).
        self._answered: set[str] = set()
        self._handed_over: set[str] = set()
        self._calls: set[asyncio.Task[None]] = set()

    async def _record(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        """A database write for a call; a failure is logged loudly but never drops the caller."""
        await record_write(what, func, *args, **kwargs)

    async def handle_call(
        self, channel: CallChannel, *, flow: str | None = None, outreach: CallOutreach | None = None
    ) -> tuple[str, str]:
        """Run one call from arrival to the end of the IVR and keep its record; returns (call id, outcome).
        Never raises. ``flow`` and ``outreach``: an outbound call's flow and its patient's outreach port."""
        info = channel.info
        call_id = str(uuid.uuid4())
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            flows = self.wiring.flows.current  # this call's snapshot: later edits don't change it
            loaded = self._entry_flow(flows, flow, info.flow)
            if loaded is None:
                with contextlib.suppress(Exception):
                    await channel.hangup()
                return call_id, "error"
            # The call's record is written in order beside the call, never in its way (a commit waits for the
            # disk); whatever refers to the call's row waits for these writes first (see _CallWrites).
            # Calls that may route at once (the queue answers them) hold their writes, and the log lines written
            # meanwhile, until the agent is dialled.
            defer_answer = (
                self.wiring.queue is not None
                and isinstance(channel, AriCallChannel)
                and not self.wiring.config.recordings.record_ivr
            )
            # A flow that talks to the caller first has nothing to get out of the way of: its record is written at
            # once, so a service killed during the greeting leaves a record to close (medhotline.orphans).
            talks_first = loaded.flow.nodes[loaded.flow.start].type != "route"
            writes = _CallWrites(self._record, paused=defer_answer and not talks_first)
            log.info(
                "call.start",
                transport=info.transport,
                channel=info.channel_name,
                flow=loaded.flow.flow,
                version=loaded.version,
            )
            writes.add(
                "start",
                self.wiring.repo.start,
                call_id=call_id,
                node=self.wiring.config.service.node_name,
                transport=info.transport,
                channel_id=info.channel_id,
                channel_name=info.channel_name,
                flow=loaded.flow.flow,
                flow_version=loaded.version,
                started_at=datetime.now(UTC),
            )
            answered = False
            ivr_recording: str | None = None
            recordings = self.wiring.recordings
            ivr_recorder = recordings.recorder(call_id, "ivr") if recordings is not None else None

            async def on_step(step: Step) -> None:
                nonlocal answered, ivr_recording
                now = datetime.now(UTC)
                if step.node_type != "route":
                    writes.resume()  # the IVR talks to the caller: nothing to get out of the way of
                if not answered:
                    answered = True
                    writes.add("answer", self.wiring.repo.mark_answered, call_id, now)
                    if ivr_recorder is not None and self.wiring.config.recordings.record_ivr:
                        await writes.drain()  # the recording's row refers to the call's
                        ivr_recording = await self._start_ivr_recording(ivr_recorder, channel)
                writes.add(
                    "step",
                    self.wiring.repo.add_step,
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
                lambda text: sound_name(text, self.wiring.voice),
                on_step,
                recognizer=self.wiring.recognizer,
                directory=self.wiring.directory,
                consent=_CallConsent(recordings, call_id) if recordings is not None else None,
                recorder=_AfterWrites(recordings.recorder(call_id, "consent"), writes) if recordings else None,
                outreach=outreach or self._inbound_outreach(lambda: runner.variables.get("patient_ref"), call_id),
                # A route-first flow: the ARI queue answers the caller while it rings the agent.
                defer_answer=defer_answer,
                # And a route node's prompt is the queue's too, played while the agent's phone already rings. Not
                # with a recorded IVR: its recording ends with the IVR and must hold every prompt the caller heard.
                queue_says_route_prompt=defer_answer,
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
            self._record_listening(writes, call_id, result)
            if result.outcome == "routed" and result.route is not None:
                result = await self._to_agent(channel, call_id, result, writes)
            await self._finish_record(writes, call_id, result)
            log.info("call.end", outcome=result.outcome, last_step=result.last_step)
            if call_id not in self._handed_over:
                self._call_ended(call_id)
            self._handed_over.discard(call_id)
            return call_id, result.outcome

    def _record_listening(self, writes: _CallWrites, call_id: str, result: FlowResult) -> None:
        """What the IVR's listen nodes made of the call: the triage, and whether a recognizer was free."""
        if result.triage is not None:
            # In order with the call's other writes (the row may not be written yet) and before the queue: a
            # nurse's upgrade during the conversation lands beside what the IVR heard.
            writes.add(
                "triage",
                self.wiring.repo.record_triage,
                call_id,
                level=result.triage.level,
                confidence=min(1.0, max(0.0, result.triage.confidence)),
                discriminator=result.triage.discriminator,
                confirm_answer=result.triage.confirm_answer,
            )
        if result.speech_admission is not None:
            # A refusal is how capacity planning sees a busy recognizer: per call, node and time.
            writes.add("speech admission", self.wiring.repo.record_speech_admission, call_id, result.speech_admission)

    def _inbound_outreach(self, patient_of: Callable[[], str | None], call_id: str) -> CallOutreach | None:
        """Vaccination booking and adverse-reaction reports on the hotline: for the caller the IVR identified."""
        if self.wiring.outreach is None:
            return None

        return CallOutreach(self.wiring.outreach, patient_of=patient_of, call_id=lambda: call_id)

    async def run_outbound(self, leg: AriCallChannel, flow: str, port: CallOutreach) -> tuple[str, str]:
        """An answered outreach call: its flow, with the patient's outreach port (see scheduler.outreach)."""
        return await self.handle_call(leg, flow=flow, outreach=port)

    async def speak(self, text: str) -> str:
        """A sound for a text known only at call time (a medication, a booked date), rendered if new."""

        name = sound_name(text, self.wiring.voice)
        target = sounds_dir(self.wiring.config) / f"{name}.wav"
        if not await asyncio.to_thread(target.exists):
            await asyncio.to_thread(render, text, self.wiring.voice, target)
        return name

    def _call_ended(self, call_id: str) -> None:
        """Seal the call's summary after the wrap-up (the recordings know whether there is anything to seal)."""
        answered = call_id in self._answered
        self._answered.discard(call_id)
        if self.wiring.recordings is not None:
            self.wiring.recordings.spawn(
                self.wiring.recordings.call_ended(
                    call_id, wrap_up=self.wiring.config.routing.wrap_up, answered_by_agent=answered
                )
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
        if self.wiring.queue is not None and isinstance(channel, FastAgiCallChannel):
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
        if self.wiring.queue is None or not isinstance(channel, AriCallChannel):
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
            prompt=route.prompt,
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
        prompt: str | None = None,
        serve: Callable[[QueueStep], Coroutine[Any, Any, QueueResult]] | None = None,
    ) -> QueueResult:
        """Wait for an agent and talk, recording the queue's milestones in the call's path. Never raises.
        ``writes``: the call's record writes, which the queue's steps join (in order); ``answer``: the IVR left the
        caller unanswered; ``prompt``: the route prompt the IVR left to the queue. ``serve``: how the queue serves
        the call (default: a caller joining the queue, answered by it if ``answer``); it is given the step recorder.

        When the IVR identified the caller, the answering agent gets the "current call" scope of the access
        policy for that patient until the wrap-up ends, and not a moment longer.
        """
        assert self.wiring.queue is not None
        assigned = False
        steps = writes or _CallWrites(self._record)

        async def on_step(node: str, edge: str | None, value: str | None) -> None:
            nonlocal assigned
            steps.add(
                "queue step",
                self.wiring.repo.add_step,
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
            if node == "answered" and edge is not None and patient_ref and self.wiring.access is not None:
                await self._record(
                    "call assignment",
                    self.wiring.access.begin_call_assignment,
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
            return await self.wiring.queue.serve(
                channel,
                call_id,
                category,
                cast(CallPriority, priority),
                on_step,
                answer=answer,
                on_hold=steps.resume,
                prompt=prompt,
            )
        except Exception:
            log.exception("routing.crashed")
            with contextlib.suppress(Exception):
                await channel.hangup()
            return QueueResult("failed")
        finally:
            await steps.drain()
            if assigned:
                self.spawn(self._end_assignment(call_id, self.wiring.config.routing.wrap_up))

    def _entry_flow(self, flows: Mapping[str, LoadedFlow], flow: str | None, dialled: str) -> LoadedFlow | None:
        """The flow a call runs: an outbound call's own (None when it is missing: it must never run the hotline's
        in its place); else the dialled flow, through surge mode's entry while it is on; else the hotline's."""
        if flow is not None and flow not in flows:
            log.error("call.flow_missing", flow=flow)
            return None
        entry = flow or (self.wiring.surge.entry_flow(dialled) if self.wiring.surge is not None else dialled)
        return flows.get(entry) or flows[self.wiring.config.hotline.flow]

    async def _finish_record(self, writes: _CallWrites, call_id: str, result: FlowResult) -> None:
        """The call's final outcome, after every earlier write of the call."""
        writes.add(
            "finish",
            self.wiring.repo.finish,
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

        profile = self.wiring.surge.profile if self.wiring.surge is not None else None
        if profile is None or self.wiring.engine is None:
            return False
        request = CallRequest(call_id, cast(RouteCategory, category), cast(CallPriority, priority), datetime.now(UTC))
        if not over_capacity(profile, request, self.wiring.engine.waiting_by_category()):
            return False
        log.warning("surge.overflow", category=category)
        writes.resume()  # turned away: no reservation for the record's writes to get out of the way of
        writes.add(
            "overflow step",
            self.wiring.repo.add_step,
            call_id,
            flow="queue",
            node="overflow",
            node_type="queue",
            edge=category,
            input=None,
            at=datetime.now(UTC),
            moves_last_step=False,
        )
        # The profile's `overflow: callback` offers a callback at the place the caller would have had.
        key = (
            self.wiring.config.routing.callback_key if self.wiring.callbacks is not None and channel.info.caller else ""
        )
        texts = overflow_texts(profile, key)
        try:
            if answer:
                await channel.answer()
            pressed = await channel.play(sound_name(texts[0], self.wiring.voice), barge_in=True)
            if texts[1] != OVERFLOW_GOODBYE:
                pressed = pressed or await channel.play(sound_name(texts[1], self.wiring.voice), barge_in=True)
                pressed = pressed or await channel.read_digits(max_digits=1, timeout=OVERFLOW_KEY_WAIT)
                if pressed == key:
                    await self._overflow_callback(channel, call_id, request, writes)
                    return True
            await channel.play(sound_name(OVERFLOW_GOODBYE, self.wiring.voice))
            await channel.hangup()
        except ChannelError:
            pass  # the caller hung up meanwhile
        return True

    async def _overflow_callback(
        self, channel: AriCallChannel, call_id: str, request: CallRequest, writes: _CallWrites
    ) -> None:
        """The caller turned away by a full queue chose a callback: registered at their arrival time."""

        assert self.wiring.callbacks is not None
        outcome = await self.wiring.callbacks.accept(call_id, channel.info.caller, request)
        writes.add(
            "callback step",
            self.wiring.repo.add_step,
            call_id,
            flow="queue",
            node="callback",
            node_type="queue",
            edge=outcome,
            input=self.wiring.config.routing.callback_key,
            at=datetime.now(UTC),
            moves_last_step=False,
        )
        text = {"accepted": CALLBACK_ACCEPTED, "duplicate": CALLBACK_DUPLICATE}.get(outcome, OVERFLOW_GOODBYE)
        await channel.play(sound_name(text, self.wiring.voice))
        await channel.hangup()

    async def serve_callback(self, leg: AriCallChannel, ticket: Ticket, offer: Offer, callback: CallbackRecord) -> str:
        """A callback's patient answered: the attempt is a call of its own (record, path, recording), which starts
        by telling the patient who calls and continues as a routed call with the agent reserved for it."""
        assert self.wiring.queue is not None
        queue = self.wiring.queue
        call_id = ticket.request.call_id
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            now = datetime.now(UTC)
            # As for any call, the record is written in order beside the call (the greeting and the agent's ring
            # don't wait for a commit); the queue's steps join these writes, the finish waits for all of them.
            writes = _CallWrites(self._record)
            writes.add(
                "start",
                self.wiring.repo.start,
                call_id=call_id,
                node=self.wiring.config.service.node_name,
                transport="ari",
                channel_id=leg.info.channel_id,
                channel_name=leg.info.channel_name,
                flow="callback",
                flow_version=None,
                started_at=now,
            )
            writes.add("answer", self.wiring.repo.mark_answered, call_id, now)
            # The path names the call that asked for it (the callback's own id is in the callbacks table).
            writes.add(
                "callback step",
                self.wiring.repo.add_step,
                call_id,
                flow="callback",
                node="callback",
                node_type="callback",
                edge=callback.call_id,
                input=str(callback.attempts),
                at=now,
            )

            async def serve(step: QueueStep) -> QueueResult:
                try:
                    await leg.play(sound_name(CALLBACK_GREETING, self.wiring.voice))
                except ChannelError:
                    if self.wiring.engine is not None:
                        await self.wiring.engine.abandon(call_id)  # frees the reserved agent
                    return QueueResult("caller_hangup")
                return await queue.serve_callback(leg, ticket, offer, step)

            queued = await self._queue(
                leg, call_id, cast(RouteCategory, callback.category), callback.priority, writes=writes, serve=serve
            )
            writes.add(
                "finish",
                self.wiring.repo.finish,
                call_id,
                outcome=QUEUE_OUTCOMES[queued.outcome],
                ended_at=datetime.now(UTC),
                last_step="callback",
                error="queue failed" if queued.outcome == "failed" else None,
                route_category=callback.category,
                route_priority=callback.priority,
            )
            await writes.drain()
            self._call_ended(call_id)
            return queued.outcome

    async def upgraded(self, call_id: str, agent_id: str) -> None:
        """An agent upgraded the call to emergency from their phone: the record says so (who, when), and the audit
        trail has it. The record comes first: it is what the hospital reads; a failed audit entry is logged."""
        at = datetime.now(UTC)
        await asyncio.to_thread(self.wiring.repo.upgrade_to_emergency, call_id, by=agent_id, at=at)
        if self.wiring.audit is not None:
            await self._record(
                "upgrade audit",
                self.wiring.audit.append,
                actor=agent_id,
                role="agent",
                action="change",
                outcome="success",
                reason="call upgraded to emergency by the agent",
                details={"call": call_id, "priority": "emergency", "via": "phone keys"},
            )

    async def _end_assignment(self, call_id: str, after: float) -> None:
        await asyncio.sleep(after)
        assert self.wiring.access is not None
        await self._record("end of call assignment", self.wiring.access.end_call_assignment, call_id, datetime.now(UTC))

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
        known = await asyncio.to_thread(self.wiring.repo.get, call_id) if is_uuid(call_id) else None
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
                self.wiring.repo.refine_routed,
                call_id,
                outcome=outcome,
                ended_at=datetime.now(UTC),
                transfer_to=queued.transfer_to,
            )
            log.info("call.queue_end", outcome=queued.outcome)
            self._call_ended(call_id)

    async def _channel_variable(self, channel_id: str, name: str) -> str:
        reply = await self.wiring.ari.request("GET", f"/channels/{channel_id}/variable", {"variable": name})
        value = reply.get("value", "") if isinstance(reply, dict) else ""
        return str(value)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)


class _CallWrites:
    """One call's record writes, in the order they were made, off the call's path: the caller never waits for a
    commit. ``drain`` waits for every write made so far; it comes before anything that reads the call's record
    back or writes a row that refers to it (a recording, the FastAGI hand-over, the agent's access, the end)."""

    def __init__(self, record: Callable[..., Awaitable[object]], *, paused: bool = False) -> None:
        self._record = record  # HotlineService._record: logs a failure, never raises
        self._tail: asyncio.Task[None] | None = None
        # Paused: the writes wait (in order) until resume(), so they don't contend with the agent's reservation
        # for the database on the way to the agent's phone; so do the service's info lines (ground.logs), whose
        # writing would delay the ring as much.
        self._go = asyncio.Event()
        self._lines = hold_lines() if paused else None
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
        if self._lines is not None:
            self._lines.release()

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
