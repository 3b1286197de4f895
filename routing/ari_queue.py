"""The telephony of waiting for an agent, over ARI: holding bridge, agent legs, and the conversation bridge.

A routed caller joins a holding bridge of their own (music on hold, position announcements), and the call's
task waits for what the :class:`~routing.engine.RoutingEngine` hands out. The agent's leg comes first: the
caller's side (answer when the IVR left it to the queue, holding bridge, music) is set up concurrently with the
reservation and the dial, and waited for only where it is needed (an announcement, the conversation bridge).
An :class:`~routing.engine.Offer` dials the agent's PJSIP endpoint as a new channel in the Stasis app
(``appArgs`` ``agent,<call id>``); when the agent answers, that channel enters Stasis and caller and agent are
moved into a mixing bridge. Whoever hangs up first ends the conversation for both. A caller who hangs up at any
point takes everything down with them: the agent leg, both bridges, and the reservation of the agent.

Callbacks. A waiting caller whose estimated wait is longer than ``callback_threshold`` hears the offer with the
position announcements; pressing ``callback_key`` then hands the call's place to a callback
(:class:`CallbackDesk`: stored with the number encrypted, the place moved in the engine), the caller hears that
it is registered and the call ends. A callback whose agent is reserved and whose patient answered is served
here too (:meth:`CallerQueue.serve_callback`): the reserved agent's phone is dialled first and the patient
(answered already) waits in a holding bridge while it rings, exactly as a caller who waited on the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog

from ground.logs import get_logger
from routing.announcements import ESCALATING, RECLASSIFIED, position_text
from routing.callbacks import CALLBACK_ACCEPTED, CALLBACK_DUPLICATE, CALLBACK_UNAVAILABLE, CallbackPolicy, offer_text
from routing.engine import CancelRing, Escalate, Offer, RoutingEngine, Ticket, TicketItem
from routing.model import CallPriority, CallRequest
from routing.supervision import ESCALATE_EVENT, ESCALATE_ITEM
from routing.upgrade import UpgradeKeys
from telephony.ari_channel import AriCallChannel, AriDispatcher
from telephony.ari_client import AriClient, AriError, AriNotFound, AriUnavailable
from telephony.channel import CallerHungUp, CallerId, CallInfo, ChannelError, tell_unavailable_and_hang_up
from telephony.consult import RouteCategory

log = get_logger(__name__)

AGENT_LEG_ARG = "agent"
# The system prompt callers hear when nobody can take the call (rendered by `prompts build` under this name).
UNAVAILABLE_SOUND = "medhotline/unavailable"
# Q.850 causes that mean "this phone can't be reached at all", as opposed to "it rang and nobody answered".
_UNREACHABLE_CAUSES = frozenset({1, 2, 3, 20, 27, 34, 38, 41, 42, 47, 66, 127})
# Slack over the ring timeout Asterisk enforces itself, in case its hang-up event is lost.
_RING_GUARD = 5.0


@dataclass(frozen=True, slots=True)
class QueueSettings:
    ring_timeout: float = 15.0
    first_announcement: float = 5.0
    announce_every: float = 30.0
    moh_class: str = "default"
    # The caller id the agent's phone shows: the hotline, never the patient's number.
    agent_caller_id: str = "12320"
    # A waiting caller who presses this key is an emergency from then on (empty: disabled).
    emergency_key: str = "0"
    # An agent who presses these keys during the conversation upgrades the call to emergency (empty: disabled).
    upgrade_keys: str = "*0"
    # Callbacks instead of waiting (``routing.callbacks``); key "" or no CallbackDesk: never offered.
    callback: CallbackPolicy = CallbackPolicy(key="")  # noqa: RUF009 - frozen, so one shared default is safe


@dataclass(frozen=True, slots=True)
class EscalationTransfer:
    """Where an escalated call goes: ``number`` (over ``trunk``) for ``ring_seconds``, then ``then_number``."""

    number: str
    trunk: str = ""
    ring_seconds: int = 60
    then_number: str = ""
    then_trunk: str = ""


@dataclass(frozen=True, slots=True)
class QueueResult:
    outcome: Literal["answered", "caller_hangup", "transferred", "unavailable", "failed", "callback"]
    agent_id: str | None = None
    transfer_to: str | None = None


QueueStep = Callable[[str, str | None, str | None], Awaitable[None]]
# An agent upgraded the call to emergency (``routing.upgrade``): (call id, agent id) → the record says so.
OnUpgrade = Callable[[str, str], Awaitable[None]]
# What the agent hears once the upgrade is recorded (a sound every Asterisk has).
UPGRADED_SOUND = "beep"


CallbackOutcome = Literal["accepted", "duplicate", "unavailable"]


class CallbackDesk(Protocol):
    """Registers a waiting caller's callback (``medhotline.callbacks.CallbackService``): the number is stored
    encrypted and the call's place passes to the callback. "duplicate": the number has an open callback already;
    "unavailable": nothing was stored and the call still waits in its place (e.g. an agent rings for it now)."""

    async def accept(self, call_id: str, caller: CallerId, request: CallRequest) -> CallbackOutcome: ...


# How long the caller's side waits for the agent's leg to be dialled first. The reservation takes milliseconds;
# this bounds the wait when it is slow or refused, so a caller never waits for music longer than this.
HOLD_GRACE = 0.1
# How long the caller's side then waits for Asterisk's first event about the agent's leg (in practice its state
# turning to Ringing: the phone has the INVITE), so the caller's answer and bridge don't compete with that INVITE
# inside Asterisk: the originate's response comes back before the INVITE leaves.
LEG_DIAL_GRACE = 0.02
# How often a playing route prompt is checked for its end (the music starts at most this long after it).
ROUTE_PROMPT_POLL = 0.25
# Failed checks in a row after which the prompt's end is taken as unknown and the music starts.
ROUTE_PROMPT_TRIES = 3
# How long an answered agent's bridging waits for the route prompt to be stopped (two ARI requests at most).
HUSH_WAIT = 2.0


class _Hold:
    """The caller's holding bridge and the task that sets it up (answer, bridge, music on hold).

    Started once the first agent's leg is dialled (or at once when no agent is being reserved, or after
    ``HOLD_GRACE``): the caller's requests then don't compete with the agent's on the way to the phone.
    """

    def __init__(
        self,
        bridge: str,
        setup: Callable[[], Awaitable[None]],
        on_start: Callable[[], None] | None = None,
        prompt: _RoutePrompt | None = None,
    ) -> None:
        self.bridge = bridge
        self._setup = setup
        self._on_start = on_start
        self._task: asyncio.Task[None] | None = None
        # The route node's prompt, when the IVR left it to the queue: played in this bridge before the music.
        self.prompt = prompt

    @property
    def task(self) -> asyncio.Task[None]:
        """The setup, started now if it was not yet."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._setup())
            self._task.add_done_callback(_retrieved)
            if self._on_start is not None:
                self._on_start()
        return self._task

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self.task  # noqa: B018 - the property starts it

    async def ready(self) -> str:
        """The bridge, once the caller is in it with music; raises what the setup raised (a hang-up, an ARI error).
        Shielded: whoever waits for it being cancelled must not cancel the setup itself.

        With a route prompt, also once the prompt is over: whoever needs the bridge (an announcement, an escalation)
        waits for it rather than talk over it or have the music restarted under it. An agent's answer stops the
        prompt first (``CallerQueue._hushing_step``), so the conversation does not wait for it."""
        await asyncio.shield(self.task)
        prompt = self.prompt.task if self.prompt is not None else None
        if prompt is not None:
            await asyncio.wait({prompt})  # its errors are its own (logged, or a hang-up the queue sees anyway)
        return self.bridge

    def check(self) -> None:
        """Raise the setup's error if it has failed already."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error


class _RoutePrompt:
    """The route node's prompt, played by the queue while the agent's phone rings (``CallerQueue.serve``'s
    ``prompt``). It ends by itself ("played"), or is stopped the moment an agent answers: the conversation comes
    first, the caller must not miss the agent's first words. Each outcome is a step in the call's path."""

    def __init__(self, sound: str, step: QueueStep) -> None:
        self.sound = sound
        self.step = step
        self.playback_id = f"route-prompt-{uuid.uuid4()}"
        self.task: asyncio.Task[None] | None = None
        self.hushed = asyncio.Event()
        self.left = False  # the call left the queue: nothing more to play

    def leave(self) -> None:
        self.left = True
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _retrieved(task: asyncio.Task[None]) -> None:
    """The setup's error is raised where the hold is needed; marked seen here for calls that never need it."""
    if not task.cancelled():
        task.exception()


class ConversationRecorder(Protocol):
    """Records the conversation bridge (``recordings.capture.CallRecordings`` satisfies it). ``start`` returns a
    handle for ``stop``, or None when the recording could not start (the call goes on regardless)."""

    async def start_bridge(self, ari: AriClient, bridge_id: str, call_id: str) -> Any: ...

    async def stop_bridge(self, ari: AriClient, row: Any) -> None: ...


async def _no_step(node: str, edge: str | None, value: str | None) -> None:
    return None


async def _next_key(channel: AriCallChannel) -> str:
    """The next key the caller presses, or ``ESCALATE_ITEM`` when a supervisor asked (an ARI user event on the
    caller's channel, ``routing.ari_supervision``) to move the call to emergency; CallerHungUp when they hang up."""
    while True:
        event = await channel.next_event()
        if event is None:
            continue
        if channel.gone:
            raise CallerHungUp("caller hung up")
        if event["type"] == "ChannelDtmfReceived":
            return str(event.get("digit", ""))
        if event["type"] == "ChannelUserevent" and event.get("eventname") == ESCALATE_EVENT:
            return ESCALATE_ITEM


def dial_string(endpoint: str) -> str:
    """An agent endpoint as Asterisk dials it: a bare PJSIP endpoint name, or a full ``TECH/resource``."""
    return endpoint if "/" in endpoint else f"PJSIP/{endpoint}"


def _cause(event: Mapping[str, Any]) -> int:
    cause = event.get("cause")
    return cause if isinstance(cause, int) else 0


class CallerQueue:
    """Runs one routed ARI call from joining the queue to the end of the conversation (or abandonment)."""

    def __init__(
        self,
        ari: AriClient,
        events: AriDispatcher,
        engine: RoutingEngine,
        *,
        settings: QueueSettings,
        sound: Callable[[str], str],
        escalation_groups: Mapping[str, EscalationTransfer],
        recorder: ConversationRecorder | None = None,
        on_upgrade: OnUpgrade | None = None,
        callbacks: CallbackDesk | None = None,
    ) -> None:
        self.callbacks = callbacks
        self._recorder = recorder
        self._on_upgrade = on_upgrade
        self._ari = ari
        self._events = events
        self._engine = engine
        self._settings = settings
        self._sound = sound
        self._groups = escalation_groups

    async def serve(
        self,
        caller: AriCallChannel,
        call_id: str,
        category: RouteCategory,
        priority: CallPriority,
        on_step: QueueStep | None = None,
        *,
        answer: bool = False,
        on_hold: Callable[[], None] | None = None,
        prompt: str | None = None,
    ) -> QueueResult:
        """Never raises for telephony trouble: the result says how the call left the queue.

        ``on_step(node, edge, input)`` records the queue's milestones in the call's path (queued, reclassified,
        answered by which agent, escalated); every ring is in the agents' ring history. ``answer``: the IVR left
        the caller unanswered (a flow that starts with its route node), the queue answers them. ``on_hold()`` is
        called when the caller's side starts: the agent's leg is dialled (or nobody is being reserved), so the
        caller's other work (their record) no longer competes with it. ``prompt``: the route node's sound, which
        the IVR left to the queue; the caller hears it in the holding bridge as their side starts (the agent's
        phone is ringing by then), before the music, and an agent who answers meanwhile stops it.
        """
        route_prompt = _RoutePrompt(prompt, on_step or _no_step) if prompt is not None else None
        step = self._hushing_step(on_step or _no_step, route_prompt)
        # The agent first: the engine reserves and offers while the caller's side is set up beside it.
        ticket = self._engine.enqueue(CallRequest(call_id, category, priority, datetime.now(UTC)))
        bridge = f"hold-{call_id}"
        hold = _Hold(
            bridge, lambda: self._hold(caller, bridge, answer=answer, prompt=route_prompt), on_hold, route_prompt
        )
        try:
            # The priority it waits with: the statistics hold emergencies to their own target (an agent's later
            # upgrade changes the call's record, not how it waited).
            await step("queued", category, priority)
            await asyncio.sleep(0)  # the engine takes its decision up to the reservation's database write
            if not self._engine.reserving(call_id):
                hold.start()  # nobody to ring yet: the caller's side starts now
            return await self._wait(caller, ticket, hold, step)
        except CallerHungUp:
            log.info("queue.caller_hung_up", position=self._engine.position(call_id))
            await self._engine.abandon(call_id)
            return QueueResult("caller_hangup")
        except ChannelError as exc:
            log.error("queue.failed", reason=str(exc))
            await self._engine.abandon(call_id)
            if hold.started:
                with contextlib.suppress(ChannelError, AriError):
                    await self._moh(hold.bridge, on=False)
            # Told, then hung up: never left on hold music (or silence) that leads nowhere.
            await tell_unavailable_and_hang_up(caller)
            return QueueResult("failed")
        finally:
            await self._drop_hold(hold)

    async def _drop_hold(self, hold: _Hold) -> None:
        """The holding bridge goes when the call leaves the queue (if its setup ever started)."""
        if hold.started:
            if hold.prompt is not None:
                hold.prompt.leave()  # the call left the queue: nothing more to play, nor music to start after it
            # Let the setup finish rather than cancel it, so no bridge it is creating outlives this DELETE.
            with contextlib.suppress(ChannelError, asyncio.CancelledError):
                await hold.ready()
            with contextlib.suppress(ChannelError):
                await self._ari.request("DELETE", f"/bridges/{hold.bridge}")

    async def _hold(
        self, caller: AriCallChannel, bridge: str, *, answer: bool, prompt: _RoutePrompt | None = None
    ) -> None:
        """Answer (if the IVR did not), put the caller into their holding bridge and start the music; with a route
        prompt, the prompt first and the music after it (the setup is done once the prompt has started)."""
        if answer:
            await caller.answer()
        await self._request("POST", "/bridges", {"type": "holding", "bridgeId": bridge, "name": bridge})
        await self._request(
            "POST", f"/bridges/{bridge}/addChannel", {"channel": caller.info.channel_id, "role": "participant"}
        )
        if prompt is not None and prompt.left:
            return
        if prompt is not None:
            prompt.task = asyncio.ensure_future(self._route_prompt(caller, bridge, prompt))
            prompt.task.add_done_callback(_retrieved)
            return
        await self._moh(bridge, on=True)

    async def _route_prompt(self, caller: AriCallChannel, bridge: str, prompt: _RoutePrompt) -> None:
        """Play the route prompt, then start the music; stop it when an agent answers (``_hushing_step``).

        Its end is polled (``GET /playbacks``) rather than awaited as an event: the caller's events belong to the
        queue's wait, which must see a key pressed during the prompt (the emergency key, a callback) as it does
        at any other time."""
        if prompt.hushed.is_set():  # an agent answered before the caller's side was even ready
            await prompt.step("route_prompt", "skipped", prompt.sound)
            return
        try:
            await self._request(
                "POST",
                f"/channels/{caller.info.channel_id}/play/{prompt.playback_id}",
                {"media": f"sound:{prompt.sound}"},
            )
        except (AriError, AriUnavailable) as exc:
            # The caller waits with music instead; the path says they did not hear it.
            log.error("queue.route_prompt_failed", reason=str(exc))
            await prompt.step("route_prompt", "not_played", prompt.sound)
            await self._moh(bridge, on=True)
            return
        await prompt.step("route_prompt", "playing", prompt.sound)
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ROUTE_PROMPT_POLL):
                    await prompt.hushed.wait()
            if prompt.hushed.is_set():
                with contextlib.suppress(AriError, AriUnavailable):  # ended in the meantime: nothing to stop
                    await self._ari.request("DELETE", f"/playbacks/{prompt.playback_id}")
                await prompt.step("route_prompt", "stopped", "agent answered")
                return
            try:
                await self._ari.request("GET", f"/playbacks/{prompt.playback_id}")
            except AriNotFound:
                break
            except (AriError, AriUnavailable) as exc:
                # Asterisk can't say: after a few tries the music goes on (whoever waits for the prompt must not
                # wait for ever), and the path says its end is not known.
                failures += 1
                if failures >= ROUTE_PROMPT_TRIES:
                    log.warning("queue.route_prompt_end_unknown", reason=str(exc))
                    await prompt.step("route_prompt", "end_unknown", prompt.sound)
                    await self._moh(bridge, on=True)
                    return
        # A playback also vanishes when the caller hangs up: then this raises CallerHungUp and records nothing.
        with contextlib.suppress(AriUnavailable):
            await self._request("GET", f"/channels/{caller.info.channel_id}")
        await prompt.step("route_prompt", "played", prompt.sound)
        await self._moh(bridge, on=True)

    @staticmethod
    def _hushing_step(step: QueueStep, prompt: _RoutePrompt | None) -> QueueStep:
        """The queue's step recorder, which first stops the route prompt when an agent answered: the agent is
        bridged to the caller right after this step, and the caller must not miss their first words under it."""
        if prompt is None:
            return step

        async def hushing(node: str, edge: str | None, value: str | None) -> None:
            if node == "answered" and not prompt.hushed.is_set():
                prompt.hushed.set()
                if prompt.task is not None:
                    # Stopped (and its step written) before the answer's step; bounded, the agent is waiting.
                    await asyncio.wait({prompt.task}, timeout=HUSH_WAIT)
            await step(node, edge, value)

        return hushing

    async def serve_callback(
        self, patient: AriCallChannel, ticket: Ticket, offer: Offer, on_step: QueueStep | None = None
    ) -> QueueResult:
        """A callback's patient answered; ``offer`` is the agent reserved for it before the patient was dialled.
        As for a caller, the agent's leg comes first: the reserved agent's phone is dialled, then the patient (on
        the line already, so not answered again) waits in a holding bridge while it rings, then they talk. An agent
        who does not answer puts the callback back in its place in the engine, with the patient now waiting on the
        line like any caller. Never raises for telephony trouble."""
        step = on_step or _no_step
        call_id = ticket.request.call_id
        bridge = f"hold-{call_id}"
        hold = _Hold(bridge, lambda: self._hold(patient, bridge, answer=False))
        try:
            result = await self._ring(patient, ticket, hold, offer, step)
            if result is not None:
                return result
            return await self._wait(patient, ticket, hold, step)
        except CallerHungUp:
            log.info("queue.callback_patient_hung_up")
            await self._engine.abandon(call_id)
            return QueueResult("caller_hangup")
        except ChannelError as exc:
            log.error("queue.failed", reason=str(exc))
            await self._engine.abandon(call_id)
            with contextlib.suppress(ChannelError):
                await patient.hangup()
            return QueueResult("failed")
        finally:
            await self._drop_hold(hold)

    # -- waiting ------------------------------------------------------------------------------------
    async def _wait(self, caller: AriCallChannel, ticket: Ticket, hold: _Hold, step: QueueStep) -> QueueResult:
        call_id = ticket.request.call_id
        loop = asyncio.get_running_loop()
        announce_at = loop.time() + self._settings.first_announcement
        offered = False
        while True:
            remaining = announce_at - loop.time()
            item = await self._next(ticket, caller, hold, remaining if hold.started else min(remaining, HOLD_GRACE))
            if item is None and not hold.started:
                hold.start()  # the agent's leg is slow in coming: the caller's side goes ahead
                continue
            if item is None:
                position = self._engine.position(call_id)
                if position is not None:
                    log.info("queue.announce", position=position)
                    # A key pressed during the announcement counts: that is when callers hear the hint.
                    item = await self._announce(caller, hold, position_text(position))
                    if item is None and self._long_wait(caller, ticket):
                        if not offered:
                            await step("callback_offered", None, None)
                        offered = True
                        item = await self._announce(caller, hold, offer_text(self._settings.callback.key))
                announce_at = loop.time() + self._settings.announce_every
                if item is None:
                    continue
            if isinstance(item, str):
                if item == ESCALATE_ITEM:
                    # A supervisor's move (authorised and audited by whoever asked): no announcement, the caller
                    # simply waits ahead; the path records who moved it.
                    if self._engine.reclassify_emergency(call_id):
                        await step("reclassified", "emergency", "supervisor")
                elif item == self._settings.emergency_key and self._engine.reclassify_emergency(call_id):
                    await step("reclassified", "emergency", item)
                    await self._announce(caller, hold, RECLASSIFIED)
                elif offered and item == self._settings.callback.key:
                    result = await self._take_callback(caller, ticket, hold, step)
                    if result is not None:
                        return result
                continue
            if isinstance(item, Offer):
                result = await self._ring(caller, ticket, hold, item, step)
                if result is not None:
                    return result
                continue
            if isinstance(item, Escalate):
                result = await self._escalate(caller, call_id, hold, item, step)
                if result is not None:
                    return result
            # A CancelRing for a ring that already ended needs nothing.

    def _long_wait(self, caller: AriCallChannel, ticket: Ticket) -> bool:
        """Whether to offer this caller a callback now: callbacks on, a number to call back (never for a callback's
        own patient), and an estimated wait longer than the threshold (or unknown: nobody could take it now)."""
        policy = self._settings.callback
        if self.callbacks is None or not policy.key or ticket.request.callback or not caller.info.caller:
            return False
        estimate = self._engine.estimate(ticket.request.call_id, policy.handle_seconds)
        return estimate is not None and policy.offer(estimate[1])

    async def _take_callback(
        self, caller: AriCallChannel, ticket: Ticket, hold: _Hold, step: QueueStep
    ) -> QueueResult | None:
        """The caller pressed the callback key after the offer. A result ends the call (registered, or the number
        has one already); None: nothing was registered and the caller keeps waiting in their place."""
        assert self.callbacks is not None
        outcome = await self.callbacks.accept(ticket.request.call_id, caller.info.caller, ticket.request)
        await step("callback", outcome, self._settings.callback.key)
        log.info("queue.callback", outcome=outcome)
        if outcome == "unavailable":
            await self._announce(caller, hold, CALLBACK_UNAVAILABLE)
            return None
        if outcome == "duplicate":
            # The earlier callback keeps its place; this call leaves the queue (the number is called back once).
            await self._engine.abandon(ticket.request.call_id)
        bridge = await hold.ready()  # set up already: the offer was announced in it
        await self._moh(bridge, on=False)
        with contextlib.suppress(ChannelError):
            await caller.play(self._sound(CALLBACK_ACCEPTED if outcome == "accepted" else CALLBACK_DUPLICATE))
        with contextlib.suppress(ChannelError):
            await caller.hangup()
        return QueueResult("callback")

    async def _next(
        self, ticket: Ticket, caller: AriCallChannel, hold: _Hold, timeout: float
    ) -> TicketItem | str | None:
        """The engine's next item for this call, a key the caller pressed, or None when ``timeout`` passed.
        CallerHungUp if the caller left; the hold's error if setting it up failed meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        get = asyncio.ensure_future(ticket.items.get())
        key = asyncio.ensure_future(_next_key(caller))
        try:
            while True:
                hold.check()
                setup = hold.task if hold.started else None
                waiting = {get, key} if setup is None or setup.done() else {get, key, setup}
                remaining = max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if setup is None or done != {setup}:
                    break  # an item, a key, or the timeout; the hold finishing alone is no reason to return
            hold.check()  # a failed setup ends the wait even if an item came with it (abandon() releases it)
        finally:
            if not get.done():
                get.cancel()
            if not key.done():
                key.cancel()
        if get in done:
            if key in done and key.exception() is not None:
                ticket.items.put_nowait(get.result())  # keep the offer: abandon() will release its agent
                raise CallerHungUp("caller hung up while waiting")
            return get.result()
        return key.result() if key in done else None

    async def _announce(self, caller: AriCallChannel, hold: _Hold, text: str) -> str | None:
        """Music stops for the announcement and resumes after it; a key pressed meanwhile ends it and is returned.
        A route prompt still playing is heard to its end first (``_Hold.ready``; keys pressed meanwhile wait in the
        channel's events and end the announcement at once)."""
        bridge = await hold.ready()
        await self._moh(bridge, on=False)
        key = await caller.play(self._sound(text), barge_in=True)
        await self._moh(bridge, on=True)
        return key

    async def _moh(self, bridge: str, *, on: bool) -> None:
        if on:
            await self._request("POST", f"/bridges/{bridge}/moh", {"mohClass": self._settings.moh_class})
        else:
            with contextlib.suppress(AriError):  # already stopped
                await self._request("DELETE", f"/bridges/{bridge}/moh")

    # -- ringing an agent ---------------------------------------------------------------------------
    async def _ring(
        self, caller: AriCallChannel, ticket: Ticket, hold: _Hold, offer: Offer, step: QueueStep
    ) -> QueueResult | None:
        """Ring the offered agent. A result ends the call's time in the queue; None means "back to waiting"."""
        call_id = ticket.request.call_id
        agent_id = offer.assignment.agent_id
        leg_id = f"agent-{uuid.uuid4()}"
        leg = AriCallChannel(
            self._ari, CallInfo(leg_id, offer.assignment.endpoint, "ari", "", offer.assignment.endpoint)
        )
        self._events.register(leg)
        try:
            with structlog.contextvars.bound_contextvars(agent=agent_id, agent_leg=leg_id):
                try:
                    await self._ari.request(
                        "POST",
                        "/channels",
                        {
                            "endpoint": dial_string(offer.assignment.endpoint),
                            "app": self._ari.app,
                            "appArgs": f"{AGENT_LEG_ARG},{call_id}",
                            "channelId": leg_id,
                            "timeout": str(int(self._settings.ring_timeout)),
                            "callerId": f'"{self._settings.agent_caller_id}" <{self._settings.agent_caller_id}>',
                        },
                    )
                except (AriError, AriUnavailable) as exc:
                    # Not retried: an originate that got no answer may be ringing the phone already. The leg is
                    # hung up below by its id either way, and the call waits for the next offer.
                    hold.start()
                    log.warning("queue.dial_failed", reason=str(exc))
                    await self._engine.no_answer(call_id, agent_id, reachable=False)
                    return None
                await leg.heard_from(LEG_DIAL_GRACE)
                hold.start()  # the agent's phone is being dialled: now the caller's side, beside it
                log.info("queue.ringing")
                answered = await self._await_answer(caller, ticket, leg, agent_id)
                if not answered:
                    return None
                await self._engine.answered(call_id, agent_id)
                await step("answered", agent_id, None)
                try:
                    await self._talk(caller, leg, hold, call_id, agent_id=agent_id, step=step)
                finally:
                    await self._engine.finished(call_id, agent_id)
                return QueueResult("answered", agent_id=agent_id)
        finally:
            if not leg.gone:
                with contextlib.suppress(ChannelError):
                    await leg.hangup()
            self._events.unregister(leg_id)

    async def _await_answer(self, caller: AriCallChannel, ticket: Ticket, leg: AriCallChannel, agent_id: str) -> bool:
        """True when the agent answered. False after no answer or a cancelled ring (the call is waiting again).
        CallerHungUp if the caller left meanwhile (the agent leg is hung up by the caller of this method)."""
        call_id = ticket.request.call_id
        deadline = asyncio.get_running_loop().time() + self._settings.ring_timeout + _RING_GUARD
        caller_gone = asyncio.ensure_future(caller.wait_gone())
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                leg_event = asyncio.ensure_future(leg.next_event(timeout=max(0.0, remaining)))
                item = asyncio.ensure_future(ticket.items.get())
                done, _ = await asyncio.wait({caller_gone, leg_event, item}, return_when=asyncio.FIRST_COMPLETED)
                for task in (leg_event, item):
                    if not task.done():
                        task.cancel()
                if item in done and not item.cancelled():
                    got = item.result()
                    if isinstance(got, CancelRing) and got.agent_id == agent_id:
                        log.warning("queue.ring_cancelled", reason="agent frozen")
                        return False
                    if not isinstance(got, CancelRing):
                        ticket.items.put_nowait(got)  # not for this phase; keep it
                if caller_gone in done:
                    raise CallerHungUp("caller hung up while the agent's phone rang")
                if leg_event in done and not leg_event.cancelled():
                    event = leg_event.result()
                    if event is None:
                        log.warning("queue.ring_guard_expired")
                        await self._engine.no_answer(call_id, agent_id)
                        return False
                    if event["type"] == "StasisStart":
                        return True
                    if leg.gone:
                        cause = _cause(event)
                        reachable = cause not in _UNREACHABLE_CAUSES
                        log.info("queue.not_answered", cause=cause, reachable=reachable)
                        await self._engine.no_answer(call_id, agent_id, reachable=reachable)
                        return False
        finally:
            if not caller_gone.done():
                caller_gone.cancel()

    async def _talk(
        self, caller: AriCallChannel, leg: AriCallChannel, hold: _Hold, call_id: str, *, agent_id: str, step: QueueStep
    ) -> None:
        """Caller and agent in one mixing bridge until either hangs up; then the other is hung up too. Meanwhile
        the agent's keys are watched for the upgrade sequence."""
        talk = f"talk-{call_id}"
        recording: Any = None
        bridge = await hold.ready()  # an agent quicker than the caller's setup waits for it here
        with contextlib.suppress(AriError):
            await self._moh(bridge, on=False)
        await self._request("POST", f"/bridges/{bridge}/removeChannel", {"channel": caller.info.channel_id})
        await self._request("POST", "/bridges", {"type": "mixing", "bridgeId": talk, "name": talk})
        try:
            await self._request(
                "POST", f"/bridges/{talk}/addChannel", {"channel": f"{caller.info.channel_id},{leg.info.channel_id}"}
            )
            log.info("queue.connected")
            # Recorded from the moment the agent joins: both parties, one file (see recordings.capture).
            if self._recorder is not None:
                recording = await self._recorder.start_bridge(self._ari, talk, call_id)
            caller_gone = asyncio.ensure_future(caller.wait_gone())
            agent_gone = asyncio.ensure_future(self._agent_keys(leg, call_id, agent_id, step))
            done, _ = await asyncio.wait({caller_gone, agent_gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (caller_gone, agent_gone):
                if not task.done():
                    task.cancel()
            log.info("queue.conversation_ended", by="caller" if caller_gone in done else "agent")
            for channel in (caller, leg):
                with contextlib.suppress(ChannelError):
                    await channel.hangup()
        finally:
            if recording is not None and self._recorder is not None:
                await self._recorder.stop_bridge(self._ari, recording)
            with contextlib.suppress(ChannelError):
                await self._ari.request("DELETE", f"/bridges/{talk}")

    async def _agent_keys(self, leg: AriCallChannel, call_id: str, agent_id: str, step: QueueStep) -> None:
        """Until the agent's leg is gone: the upgrade sequence, once, upgrades the call (record, path, audit by the
        service's ``on_upgrade``), and the agent hears a beep that it is done."""
        keys = UpgradeKeys(self._settings.upgrade_keys) if self._settings.upgrade_keys else None
        loop = asyncio.get_running_loop()
        while True:
            event = await leg.next_event()
            if event is None:
                continue
            if leg.gone:
                return
            if keys is None or event["type"] != "ChannelDtmfReceived":
                continue
            if not keys.press(str(event.get("digit", "")), loop.time()):
                continue
            log.warning("queue.upgraded", agent=agent_id)
            await step("upgraded", "emergency", agent_id)
            if self._on_upgrade is not None:
                try:
                    await self._on_upgrade(call_id, agent_id)
                except Exception:  # the conversation goes on; the failure is loud
                    log.exception("queue.upgrade_not_recorded")
            with contextlib.suppress(ChannelError):
                await self._ari.request(
                    "POST", f"/channels/{leg.info.channel_id}/play/{uuid.uuid4()}", {"media": f"sound:{UPGRADED_SOUND}"}
                )

    # -- escalation ---------------------------------------------------------------------------------
    async def _escalate(
        self, caller: AriCallChannel, call_id: str, hold: _Hold, escalate: Escalate, step: QueueStep
    ) -> QueueResult | None:
        """Transfer to the rule's target. Without one (no rule, or its group has no configured target), a caller
        who waited the rule's time, or whom nobody could ever take, is told so and where to turn (120 for an
        emergency), rather than left waiting for ever. None: keep waiting (not used today)."""
        rule = escalate.rule
        target: EscalationTransfer | None = None
        if rule is not None and rule.transfer is not None:
            target = EscalationTransfer(rule.transfer.number, rule.transfer.trunk)
        elif rule is not None and rule.group is not None:
            target = self._groups.get(rule.group)
            if target is None:
                log.error("queue.escalation_unconfigured", group=rule.group, hint="set [routing.escalation_groups]")
        await self._engine.abandon(call_id)
        bridge = await hold.ready()
        await self._moh(bridge, on=False)
        if target is None:
            await step("unavailable", escalate.reason, None)
            log.warning("queue.unavailable", reason=escalate.reason)
            await caller.play(UNAVAILABLE_SOUND)
            await caller.hangup()
            return QueueResult("unavailable")
        log.warning("queue.escalating", group=rule.group if rule else None, trunk=target.trunk or None)
        await step("escalated", (rule.group if rule else None) or "transfer", None)
        await caller.play(self._sound(ESCALATING))
        await self._request("POST", f"/bridges/{bridge}/removeChannel", {"channel": caller.info.channel_id})
        # The dialplan's [medhotline-transfer] rings the target, then the second target if nobody answered.
        await caller.set_variable("MEDHOTLINE_RING", str(target.ring_seconds))
        await caller.set_variable("MEDHOTLINE_THEN", target.then_number)
        await caller.set_variable("MEDHOTLINE_THEN_TRUNK", target.then_trunk)
        await caller.transfer(target.number, target.trunk or None)
        return QueueResult("transferred", transfer_to=target.number)

    async def _request(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        """An ARI request for this call; a vanished caller channel is a hang-up, not an error."""
        try:
            return await self._ari.request(method, path, params)
        except AriNotFound:
            raise CallerHungUp(f"{method} {path}: the channel or bridge is gone") from None
