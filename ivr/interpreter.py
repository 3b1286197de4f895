"""The flow interpreter: walks a validated flow over a ``CallChannel``. Sans-I/O apart from its ports.

It never raises for what a caller or Asterisk does: a hang-up, a lost connection or a failed operation ends
the walk with an outcome and the node where it happened, which the service writes to the call record.
Every step is reported through ``on_step`` with the input that chose the edge, so a call record shows the
path a caller took (sensitive inputs, e.g. a birth year, only as "valid"/"invalid").

A ``consent`` node needs two more ports, ``consent`` (where a given consent goes) and, when it records,
``recorder``. Without them the flow ends with outcome "error" at that node: a consent that can't be stored or
recorded is never taken. The outreach nodes (``verify_identity``, ``save_readings``, ``medication_confirm``,
``vaccination_book``, ``vaccination_cancel``, ``report_adverse_reaction``, ``record_survey``) need ``outreach``
likewise, and a port that fails ends the flow with outcome "error" too: an identity check, a reading, a medication
answer or a survey score that could not be handled never passes for one that was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar, assert_never

from ground.errors import MedhotlineError
from ground.logs import get_logger
from ivr.conditions import evaluate
from ivr.flow_loader import LoadedFlow
from ivr.flow_model import (
    BranchNode,
    CollectNode,
    ConfirmNode,
    ConsentNode,
    Flow,
    HangupNode,
    ListenNode,
    LookupPatientNode,
    MedicationConfirmNode,
    MenuNode,
    Node,
    PlayNode,
    Prompt,
    RecordSurveyNode,
    ReportAdverseReactionNode,
    ReturnNode,
    RouteNode,
    SaveReadingsNode,
    SetNode,
    SubflowNode,
    TransferNode,
    TriageConfirm,
    VaccinationBookNode,
    VaccinationCancelNode,
    VerifyIdentityNode,
)
from telephony.channel import (
    AudioLossReport,
    CallChannel,
    CallerHungUp,
    ChannelError,
    ConnectionLost,
    tell_unavailable_and_hang_up,
)
from telephony.ports import (
    BookingResult,
    CallRecorder,
    ConsentExchange,
    ConsentSink,
    ConsentUnavailable,
    NoPatientDirectory,
    NoRecognizer,
    OutreachPort,
    OutreachUnavailable,
    PatientDirectory,
    ReadingsVerdict,
    Recognition,
    RecognitionUnavailable,
    Recognizer,
    RecognizerBusy,
)

log = get_logger(__name__)


Outcome = Literal["completed", "routed", "transferred", "caller_hangup", "connection_lost", "error"]
# Every step is bounded: a caller pressing "repeat" forever, or a loop an administrator did not foresee,
# ends as an error after this many steps instead of holding a line for ever.
MAX_STEPS = 500
# "Press 2 to hear it again" does not count as a wrong key, but is bounded too.
MAX_REPEATS = 5
# A sound name a port hands over (medication, booking date): plain, like a flow's `file:` and never absolute, so
# it can't reach outside the sounds directory.
_SOUND_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_/-]{0,127}$")
# A reading as the port receives it: digits, with one decimal point (typed as `*` on the keypad).
_DECIMAL = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,3})?$")
# A satisfaction score as a ``record_survey`` node hands it over: one key 1-5 (docs/complaints.md).
_SURVEY_SCORE = re.compile(r"^[1-5]$")
_DAY = re.compile(r"^[1-7]$")
SLOTS = ("morning", "afternoon")
# What the port answered with a booking outcome → the node's edge.
_BOOKING_EDGES: Mapping[str, Literal["booked", "full", "not_booked"]] = {
    "booked": "booked",
    "full": "full",
    "no_slot": "not_booked",
    "not_identified": "not_booked",
    "failed": "not_booked",
}
T = TypeVar("T")
# A spoken answer to the confirmation question: yes only with one of these and no negation anywhere (不需要, 不要,
# 没事, 别): a hesitant or negated answer goes to the nurse, who can still upgrade the call.
_YES_WORDS = ("需要", "是的", "要", "是", "对", "快")
_NEGATORS = ("不", "没", "别", "无", "否")
_NOT_TEXT = re.compile(r"[\s\W_]+", re.UNICODE)


def spoken_yes(transcript: str) -> bool:
    """Is this transcript a yes to "是否需要急救"? Punctuation and spaces (ASR output) are ignored."""
    text = _NOT_TEXT.sub("", transcript)
    return any(word in text for word in _YES_WORDS) and not any(neg in text for neg in _NEGATORS)


@dataclass(frozen=True)
class Step:
    """One node visited: which, and what chose the way out of it."""

    flow: str
    node: str
    node_type: str
    edge: str | None = None
    input: str | None = None


@dataclass(frozen=True)
class RouteDecision:
    """Where the IVR sends the call. ``prompt``: the route node's sound, still to be played to the caller by the
    queue (see FlowRunner.queue_says_route_prompt); None when the IVR said it already or the node has none."""

    category: str
    priority: str
    node: str
    prompt: str | None = None


ConfirmAnswer = Literal["key", "speech", "declined", "no_input"]
# Whether the call's listen nodes got a recognizer: "refused" as soon as one did not (the budget of concurrent
# recognitions was spent, or the engine was full) and the caller was given the key menu instead.
SpeechAdmission = Literal["admitted", "refused"]


@dataclass(frozen=True)
class TriageResult:
    """What the last ``listen`` node made of the caller's words, for the call record (never the words).

    ``confirm_answer`` is None when no confirmation was asked; otherwise how it ended: "key" or "speech" (yes:
    emergency), "declined" (another key or other words: the urgent tier), "no_input".
    """

    level: str
    confidence: float
    discriminator: str
    confirm_answer: ConfirmAnswer | None = None

    @property
    def confirm_asked(self) -> bool:
        return self.confirm_answer is not None


@dataclass(frozen=True)
class FlowResult:
    outcome: Outcome
    last_step: str
    error: str | None = None
    route: RouteDecision | None = None
    transfer_to: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    triage: TriageResult | None = None
    # False only for a route decision taken before answering (see FlowRunner.defer_answer): the queue answers.
    answered: bool = True
    # None when no listen node was reached with speech available.
    speech_admission: SpeechAdmission | None = None


SoundFor = Callable[[str], str]
OnStep = Callable[[Step], Awaitable[None]]


async def _noop_step(step: Step) -> None:
    return None


class _Done(Exception):
    def __init__(self, result: FlowResult) -> None:
        self.result = result


@dataclass
class FlowRunner:
    """Runs one call through one flow (and its subflows, resolved from ``flows``)."""

    flows: Mapping[str, LoadedFlow]
    sound_for: SoundFor
    on_step: OnStep = _noop_step
    recognizer: Recognizer = field(default_factory=NoRecognizer)
    directory: PatientDirectory = field(default_factory=NoPatientDirectory)
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    variables: dict[str, str] = field(default_factory=dict)
    # For ``consent`` nodes; None means "not configured" and such a node ends the flow with an error.
    consent: ConsentSink | None = None
    recorder: CallRecorder | None = None
    # For the outreach nodes; None means "not configured" and such a node ends the flow with an error.
    outreach: OutreachPort | None = None
    # A flow that starts with a silent route node says nothing to the caller: leave the answer to whoever takes
    # the routed call (the ARI queue answers concurrently with ringing the agent). Only for transports whose
    # queue can answer; the result's ``answered`` tells.
    defer_answer: bool = False
    # A route node's prompt is not said before routing but handed over with the decision, for the queue to play
    # while the agent's phone already rings (an emergency caller must not wait ~5 s of "please hold" before
    # anyone is dialled). Only for transports whose queue plays it (ARI); FastAGI says it first.
    queue_says_route_prompt: bool = False

    # Where the call is: "node", or "subflow:node" inside a subflow. Reported with the outcome.
    _where: str = field(default="answer", init=False)
    _typeahead: str | None = field(default=None, init=False)
    # The triage of the last utterance a listen node classified (reported with the outcome).
    _triage: TriageResult | None = field(default=None, init=False)
    _answered: bool = field(default=False, init=False)
    _speech: SpeechAdmission | None = field(default=None, init=False)

    async def run(self, flow: Flow, channel: CallChannel) -> FlowResult:
        """Answer, walk the flow from its start node, and end in a hang-up, a route or a transfer."""
        try:
            start = flow.nodes[flow.start]
            silent_start = isinstance(start, RouteNode) and (start.prompt is None or self.queue_says_route_prompt)
            if not (self.defer_answer and silent_start):
                await channel.answer()
                self._answered = True
            return await self._walk(flow, channel)
        except _Done as done:
            return done.result
        except CallerHungUp:
            return self._ended("caller_hangup")
        except ConnectionLost as exc:
            # The event stream is gone, so a prompt's end would never be heard of; the REST side may still work,
            # and a hang-up is better than a silent line until the caller gives up.
            with contextlib.suppress(ChannelError):
                await channel.hangup()
            return self._ended("connection_lost", str(exc))
        except ChannelError as exc:
            log.error("flow.failed", node=self._where, error=str(exc))
            await tell_unavailable_and_hang_up(channel)
            return self._ended("error", str(exc))

    async def _walk(self, flow: Flow, channel: CallChannel) -> FlowResult:
        stack: list[tuple[Flow, str]] = []  # (calling flow, node to continue at) for subflows
        node_id = flow.start
        for _ in range(MAX_STEPS):
            self._where = node_id if not stack else f"{flow.flow}:{node_id}"
            node = flow.nodes[node_id]
            edge, value, target = await self._step(flow, node_id, node, channel)
            await self.on_step(Step(flow.flow, node_id, node.type, edge, value))
            if isinstance(node, SubflowNode):
                if node.flow not in self.flows:  # the graph checks should prevent it; never a KeyError out of run()
                    raise ChannelError(f"node {node_id}: subflow {node.flow!r} is not loaded")
                stack.append((flow, node.next))
                flow = self.flows[node.flow].flow
                node_id = flow.start
                continue
            if isinstance(node, ReturnNode):
                if not stack:  # a subflow run on its own: returning ends the call politely
                    await channel.hangup()
                    return self._result("completed")
                flow, node_id = stack.pop()
                continue
            if target is None:  # a terminal node did its work in _step
                raise AssertionError(f"terminal node {node_id} returned no result")
            node_id = target
        raise ChannelError(f"flow {flow.flow!r} ran {MAX_STEPS} steps without reaching an end")

    def _result(self, outcome: Outcome, **extra: object) -> FlowResult:
        return FlowResult(
            outcome,
            self._where,
            variables=dict(self.variables),
            triage=self._triage,
            speech_admission=self._speech,
            **extra,  # type: ignore[arg-type]
        )

    def _ended(self, outcome: Outcome, error: str | None = None) -> FlowResult:
        """The walk ended by what the caller or Asterisk did (not by a terminal node)."""
        return FlowResult(
            outcome, self._where, error, variables=self.variables, triage=self._triage, speech_admission=self._speech
        )

    async def _say(self, channel: CallChannel, prompt: Prompt | None, barge_in: bool) -> str | None:
        """Play a prompt. A key pressed during an earlier interruptible announcement (type-ahead) answers an
        interruptible prompt at once: a caller who presses 0 during the greeting reaches emergency without
        waiting for the menu."""
        if barge_in and self._typeahead is not None:
            pressed, self._typeahead = self._typeahead, None
            return pressed
        self._typeahead = None
        if prompt is None:
            return None
        return await channel.play(self._sound_of(prompt), barge_in=barge_in)

    def _sound_of(self, prompt: Prompt) -> str:
        return prompt.file if prompt.file else self.sound_for(prompt.say or "")

    async def _step(
        self, flow: Flow, node_id: str, node: Node, channel: CallChannel
    ) -> tuple[str | None, str | None, str | None]:
        """Run one node; returns (edge label, recorded input, next node). Terminal nodes raise _Done.

        One case per member of the typed node union; ``assert_never`` makes mypy name a node type added to
        the union without a case here."""
        match node:
            case PlayNode():
                pressed = await self._say(channel, node.prompt, node.barge_in)
                # The key skipped this announcement and is kept for the next question.
                self._typeahead = pressed
                return "next", pressed and "skipped", node.next
            case SetNode():
                self.variables.update(node.vars)
                return "next", None, node.next
            case BranchNode():
                for index, case in enumerate(node.cases):
                    if evaluate(case.when, self.variables, flow.hours, self.now()):
                        return f"case {index + 1}", None, case.next
                return "default", None, node.default
            case LookupPatientNode():
                await self._say(channel, node.prompt, node.barge_in)
                match = await self.directory.lookup_caller(channel)
                if match is None:
                    return "not found", None, node.not_found
                self.variables["patient_ref"] = match.patient_ref
                return "found", None, node.found
            case SubflowNode():
                await self._say(channel, node.prompt, node.barge_in)
                return "subflow", node.flow, None
            case ReturnNode():
                await self._say(channel, node.prompt, node.barge_in)
                return "return", None, None
            case MenuNode():
                return await self._menu(node, channel)
            case CollectNode():
                return await self._collect(node, channel)
            case ConfirmNode():
                return await self._confirm(node, channel)
            case ListenNode():
                return await self._listen(node, channel)
            case ConsentNode():
                return await self._consent(flow.flow, node_id, node, channel)
            case (
                VerifyIdentityNode()
                | SaveReadingsNode()
                | MedicationConfirmNode()
                | VaccinationBookNode()
                | VaccinationCancelNode()
                | ReportAdverseReactionNode()
                | RecordSurveyNode()
            ):
                return await self._outreach_step(f"flow {flow.flow!r} node {node_id!r}", node, channel)
            case HangupNode():
                await self._say(channel, node.prompt, False)
                await self.on_step(Step(flow.flow, node_id, "hangup"))
                await channel.hangup()
                raise _Done(self._result("completed"))
            case RouteNode():
                later: str | None = None
                if self.queue_says_route_prompt:
                    self._typeahead = None  # as _say would: a skipped announcement's key is no input for the queue
                    later = self._sound_of(node.prompt) if node.prompt is not None else None
                else:
                    await self._say(channel, node.prompt, False)
                decision = RouteDecision(node.category, node.effective_priority, node_id, later)
                await self.on_step(Step(flow.flow, node_id, "route", node.category, decision.priority))
                raise _Done(self._result("routed", route=decision, answered=self._answered))
            case TransferNode():
                await self._say(channel, node.prompt, False)
                await self.on_step(Step(flow.flow, node_id, "transfer", node.trunk or "internal", node.to))
                await channel.transfer(node.to, node.trunk)
                raise _Done(self._result("transferred", transfer_to=node.to))
            case _:
                assert_never(node)

    # -- waiting nodes ------------------------------------------------------------------------------

    async def _retry_or_fallback(
        self, node: MenuNode | CollectNode | ConfirmNode | ListenNode, attempt: int, kind: str, channel: CallChannel
    ) -> bool:
        """After a bad or missing input: True to ask again, False when the retries are used up."""
        if attempt > node.retries:
            return False
        await self._say(channel, node.no_input if kind == "no_input" else node.invalid, False)
        return True

    async def _menu(self, node: MenuNode, channel: CallChannel) -> tuple[str, str | None, str]:
        attempt = 0
        while True:
            pressed = await self._say(channel, node.prompt, node.barge_in)
            if pressed is None:
                pressed = await channel.read_digits(max_digits=1, timeout=node.timeout)
            if pressed in node.choices:
                return f"press {pressed}", pressed, node.choices[pressed]
            attempt += 1
            kind = "no_input" if not pressed else "invalid"
            if not await self._retry_or_fallback(node, attempt, kind, channel):
                return "fallback", kind, node.fallback

    async def _collect(self, node: CollectNode, channel: CallChannel) -> tuple[str, str | None, str]:
        attempt = 0
        while True:
            first = await self._say(channel, node.prompt, node.barge_in)
            digits = first or ""
            if node.terminator is not None and digits == node.terminator:
                digits = ""
            elif len(digits) < node.max_digits:  # a one-digit collect may already be complete by barge-in
                digits += await channel.read_digits(
                    max_digits=node.max_digits - len(digits), timeout=node.timeout, terminator=node.terminator
                )
            valid = node.min_digits <= len(digits) <= node.max_digits and (
                node.pattern is None or re.fullmatch(node.pattern, digits) is not None
            )
            if valid:
                self.variables[node.var] = digits
                return "next", "valid" if node.sensitive else digits, node.next
            attempt += 1
            kind = "no_input" if not digits else "invalid"
            if not await self._retry_or_fallback(node, attempt, kind, channel):
                return "fallback", kind, node.fallback

    async def _confirm(self, node: ConfirmNode, channel: CallChannel) -> tuple[str, str | None, str]:
        attempt = repeats = 0
        while True:
            pressed = await self._say(channel, node.prompt, node.barge_in)
            if pressed is None:
                pressed = await channel.read_digits(max_digits=1, timeout=node.timeout)
            if pressed == node.confirm_digit:
                return "confirmed", pressed, node.next
            if pressed == node.repeat_digit and repeats < MAX_REPEATS:
                repeats += 1
                continue
            attempt += 1
            kind = "no_input" if not pressed else "invalid"
            if not await self._retry_or_fallback(node, attempt, kind, channel):
                return "fallback", kind, node.fallback

    async def _listen(self, node: ListenNode, channel: CallChannel) -> tuple[str, str | None, str]:
        if not self.recognizer.available_for(channel):
            # No speech on this node (or it failed): the caller gets the key menu instead, never silence.
            return "fallback", "speech unavailable", node.fallback
        admission = contextlib.ExitStack()
        try:
            # Before the node's question: a caller over the budget is never invited to speak and then refused.
            admission.enter_context(self.recognizer.admit(channel))
        except RecognizerBusy as exc:
            return self._speech_busy(node, exc)
        # Held for the whole node (question, listening, confirmation) and released on every way out of it: a
        # result, a hang-up, an error, the call's task cancelled. Nothing awaits between the admission and here.
        dropped_before = _dropped(channel)
        try:
            if self._speech is None:
                self._speech = "admitted"
            edge, heard, target = await self._listen_admitted(node, channel)
        finally:
            admission.close()
        return edge, _with_drops(heard, _dropped(channel) - dropped_before), target

    def _speech_busy(self, node: ListenNode, exc: RecognizerBusy) -> tuple[str, str, str]:
        """No recognizer free: the key menu at once (a key typed ahead, 0 included, is still answered there)."""
        log.warning("speech.busy_fallback", node=self._where, reason=str(exc))
        self._speech = "refused"
        return "fallback", "speech busy", node.fallback

    async def _listen_admitted(self, node: ListenNode, channel: CallChannel) -> tuple[str, str | None, str]:
        attempt = 0
        while True:
            pressed = await self._say(channel, node.prompt, True)
            if pressed is not None:
                if pressed in node.choices:
                    return f"press {pressed}", pressed, node.choices[pressed]
                recognition = None
            else:
                try:
                    recognition = await self.recognizer.recognize(channel, node.max_seconds)
                except RecognizerBusy as exc:
                    return self._speech_busy(node, exc)
                except RecognitionUnavailable as exc:
                    log.error("speech.unavailable", node=self._where, reason=str(exc))
                    return self._speech_failed(node, exc.heard)
            if recognition is not None and recognition.transcript:
                self.variables[node.var] = recognition.transcript
                if recognition.emergency:
                    self.variables["priority"] = "emergency"
                self._triage = TriageResult(recognition.level, recognition.confidence, recognition.discriminator[:64])
                if node.triage is not None:
                    tiered = await self._triage_edge(node, recognition, channel)
                    if tiered is not None:
                        return tiered
                category = recognition.category
                # The record keeps why: the category and the terms that fired, never the transcript itself.
                why = f"{category or 'unclassified'}: {','.join(recognition.matched)}"[:64]
                if category in node.categories:
                    return f"heard {category}", why, node.categories[category]
                return "default", why, node.default
            attempt += 1
            kind = "no_input" if pressed is None else "invalid"
            if not await self._retry_or_fallback(node, attempt, kind, channel):
                return "fallback", kind, node.fallback

    def _speech_failed(self, node: ListenNode, heard: Recognition | None) -> tuple[str, str, str]:
        """Recognition broke off: the key menu (the fallback, whose prompt the caller hears at once). What was heard
        before the break is kept like a transcript, and the record says what it was classified as."""
        if heard is None or not heard.transcript:
            return "fallback", "speech failed", node.fallback
        self.variables[node.var] = heard.transcript
        self._triage = TriageResult(heard.level, heard.confidence, heard.discriminator[:64])
        why = f"speech failed; heard {heard.category or 'unclassified'}: {','.join(heard.matched)}"[:64]
        return "fallback", why, node.fallback

    async def _triage_edge(
        self, node: ListenNode, recognition: Recognition, channel: CallChannel
    ) -> tuple[str, str, str] | None:
        """The triage levels of a listen node: a red flag → the emergency target at once; a single weak cue → ask
        once; symptoms without a red flag → the urgent (nurse-triage) target. None: route by category."""
        triage = node.triage
        emergency = node.emergency_target
        # The model guarantees both: triage is why we are here, and it needs an emergency target.
        assert triage is not None
        assert emergency is not None
        why = f"{recognition.level} {recognition.discriminator or '-'} {recognition.confidence:.2f}"[:64]
        if recognition.emergency or recognition.level == "emergency":
            self.variables["priority"] = "emergency"
            if recognition.category == "emergency" and node.categories.get("emergency") == emergency:
                return None  # the category route says the same, with the terms that fired ("heard emergency")
            return "triage emergency", why, emergency
        if recognition.confirm:
            answer = await self._ask_confirm(triage.confirm, channel)
            self._triage = dataclasses.replace(self._triage, confirm_answer=answer) if self._triage else None
            if answer in ("key", "speech"):
                self.variables["priority"] = "emergency"
                return "confirmed emergency", f"{answer}: {why}"[:64], emergency
            return "not confirmed", f"{answer}: {why}"[:64], triage.urgent
        if recognition.level == "urgent" and recognition.category not in triage.clinical_categories:
            return "triage urgent", why, triage.urgent
        return None

    async def _ask_confirm(self, confirm: TriageConfirm, channel: CallChannel) -> ConfirmAnswer:
        """ "是否需要急救？需要请按1", once. The question is heard in full (a key pressed before it is no answer);
        then a short speech pass where speech is available, then the key. A spoken yes or ``key`` is an emergency;
        another key or other words decline; silence is no input. Both of the last go to the urgent tier."""
        self._typeahead = None
        await channel.play(self.sound_for(confirm.say), barge_in=False)
        heard = ""
        if self.recognizer.available_for(channel):
            try:
                said = await self.recognizer.recognize(channel, confirm.max_seconds)
            except RecognitionUnavailable as exc:
                log.error("speech.unavailable", node=self._where, reason=str(exc))
                said = None
            heard = said.transcript if said is not None else ""
            if heard and spoken_yes(heard):
                return "speech"
        # A key pressed while the caller was listened to is still waiting to be read; otherwise wait for one.
        pressed = await channel.read_digits(max_digits=1, timeout=0.5 if heard else confirm.timeout)
        if pressed == confirm.key:
            return "key"
        if pressed or heard:
            return "declined"
        return "no_input"

    # -- consent ----------------------------------------------------------------------------------------

    async def _consent(
        self, flow_name: str, node_id: str, node: ConsentNode, channel: CallChannel
    ) -> tuple[str, str | None, str]:
        """Record, ask, stop the recording, and only then hand a given consent to the consent store.

        The recording is stopped in ``finally``: also when the caller hangs up (then the hang-up ends the flow as
        usual and no consent is reported). A stop that fails after a complete exchange is an error outcome, since
        the consent would point at a recording that may be incomplete; after a hang-up it is only logged.
        """
        where = f"flow {flow_name!r} node {node_id!r}"
        sink, recorder = self.consent, self.recorder
        if sink is None:
            raise ConsentUnavailable(f"{where}: no consent store configured, so no consent can be taken")
        if node.record and recorder is None:
            raise ConsentUnavailable(
                f"{where}: no call recorder configured, and this consent must be recorded (record: true)"
            )
        recording: str | None = None
        if recorder is not None and node.record:
            try:
                recording = await recorder.start(channel, f"consent.{flow_name}.{node_id}")
            except (CallerHungUp, ConnectionLost):
                raise
            except MedhotlineError as exc:
                raise ConsentUnavailable(f"{where}: the consent exchange can't be recorded: {exc}") from exc
        finished = False
        try:
            answer = await self._ask_consent(node, channel)
            finished = True
        finally:
            if recorder is not None and recording is not None:
                try:
                    await recorder.stop(channel, recording)
                except MedhotlineError as exc:
                    if not finished:
                        # The exchange already failed (usually: the caller hung up); that reason is the one kept.
                        log.error("consent.recording_stop_failed", node=self._where, error=str(exc))
                    elif isinstance(exc, CallerHungUp | ConnectionLost):
                        raise
                    else:
                        raise ConsentUnavailable(f"{where}: the recording could not be stopped: {exc}") from exc
        edge, value, times = answer
        if times is None:
            return edge, value, node.next.refused
        asked_at, first, second = times
        exchange = ConsentExchange(
            flow=flow_name,
            node=node_id,
            document=node.document,
            text=node.text,
            confirm_text=node.confirm_again,
            asked_at=asked_at,
            confirmed_at=(first, second),
            recording=recording,
            key=node.key,
        )
        try:
            await sink.consent_given(exchange)
        except (CallerHungUp, ConnectionLost):
            raise
        except MedhotlineError as exc:
            raise ConsentUnavailable(f"{where}: the consent was given but could not be stored: {exc}") from exc
        return edge, value, node.next.given

    def _utc_now(self) -> datetime:
        return self.now().astimezone(UTC)

    async def _consent_key(self, channel: CallChannel, text: str, timeout: float) -> str:
        """Read ``text`` in full (keys pressed meanwhile are discarded), then wait for one key; "" on none."""
        await self._say(channel, Prompt(say=text), False)
        return await channel.read_digits(max_digits=1, timeout=timeout)

    async def _ask_consent(
        self, node: ConsentNode, channel: CallChannel
    ) -> tuple[str, str, tuple[datetime, datetime, datetime] | None]:
        """The exchange: (edge, recorded input, (asked, first, second confirmation) when given, else None).

        What counts: ``key`` after the text and ``key`` again after ``confirm_again`` is consent. Any other key
        at either question is a refusal at once: the patient said no and is not asked again. No key within
        ``timeout`` at either question replays ``no_input`` (if any) and the whole exchange from the text, up to
        ``retries`` times; then it is a refusal. The recorded input is the keys of the last round ("1,1",
        "1,2", "3") or "no_input": only digits, never anything identifying.
        """
        attempt = 0
        while True:
            asked_at = self._utc_now()
            first = await self._consent_key(channel, node.text, node.timeout)
            if first == node.key:
                first_at = self._utc_now()
                second = await self._consent_key(channel, node.confirm_again, node.timeout)
                if second == node.key:
                    return "given", f"{first},{second}", (asked_at, first_at, self._utc_now())
                if second:
                    return "refused", f"{first},{second}", None
            elif first:
                return "refused", first, None
            attempt += 1
            if attempt > node.retries:
                return "refused", "no_input", None
            await self._say(channel, node.no_input, False)

    # -- outreach -----------------------------------------------------------------------------------------------

    async def _outreach_step(
        self,
        where: str,
        node: VerifyIdentityNode
        | SaveReadingsNode
        | MedicationConfirmNode
        | VaccinationBookNode
        | VaccinationCancelNode
        | ReportAdverseReactionNode
        | RecordSurveyNode,
        channel: CallChannel,
    ) -> tuple[str, str | None, str]:
        """Run an outreach node; (edge, recorded input, next node). The recorded input is never a value the
        caller typed (identity, readings): only the medication answer's keys and the booking outcome."""
        port = self.outreach
        if port is None:
            raise OutreachUnavailable(f"{where}: no outreach port configured, so this node can't do its work")
        match node:
            case VerifyIdentityNode():
                verified = await self._ask_port(
                    where, "the identity check", port.verify_identity(self._values(where, node.vars))
                )
                # Only a plain True lets the caller through: a port answering anything else has not verified anyone.
                if verified is True:
                    return "verified", None, node.next.verified
                return "not_verified", None, node.next.not_verified
            case SaveReadingsNode():
                values = self._values(where, node.vars)
                for name, value in list(values.items()):
                    values[name] = value.replace("*", ".")  # the keypad has no decimal point: `*` stands for it
                    if not _DECIMAL.fullmatch(values[name]):
                        # The collect node's pattern let something through that is no number (the value stays out).
                        raise OutreachUnavailable(f"{where}: variable {name!r} is not a number")
                verdict = await self._ask_port(where, "saving the readings", port.save_readings(values))
                if not isinstance(verdict, ReadingsVerdict):
                    raise OutreachUnavailable(f"{where}: saving the readings gave no verdict")
                # Anything but a plain "not abnormal" is treated as abnormal: the caller hears the recall suggestion.
                if verdict.abnormal is False:
                    return "normal", None, node.next.normal
                return "abnormal", None, node.next.abnormal
            case MedicationConfirmNode():
                return await self._medication(where, node, port, channel)
            case VaccinationBookNode():
                return await self._book(where, node, port, channel)
            case VaccinationCancelNode():
                cancelled = await self._ask_port(where, "the cancellation", port.cancel_vaccination())
                if cancelled is True:
                    return "cancelled", None, node.next.cancelled
                return "none", None, node.next.none
            case ReportAdverseReactionNode():
                await self._ask_port(where, "the adverse reaction report", port.report_adverse_reaction())
                return "next", None, node.next
            case RecordSurveyNode():
                score = self._values(where, [node.var])[node.var]
                if not _SURVEY_SCORE.fullmatch(score):
                    # The collect node's pattern let something else through: nothing is written (the value stays out).
                    raise OutreachUnavailable(f"{where}: variable {node.var!r} is not a satisfaction score 1-5")
                await self._ask_port(where, "recording the satisfaction score", port.record_survey(int(score)))
                return "next", None, node.next
            case _:
                assert_never(node)

    async def _ask_port(self, where: str, what: str, call: Awaitable[T]) -> T:
        """Await a port call; any failure becomes OutreachUnavailable (outcome "error"), never a crashed call.

        A ``MedhotlineError``'s message is kept (the project's errors name no patient); any other exception only by
        its type, since its text may quote the data the port was working on (an SQL error quotes its parameters).
        """
        try:
            return await call
        except (CallerHungUp, ConnectionLost):
            raise
        except MedhotlineError as exc:
            raise OutreachUnavailable(f"{where}: {what} failed: {exc}") from exc
        except Exception as exc:  # a port bug must end this call as an error, not crash the service
            raise OutreachUnavailable(f"{where}: {what} failed ({type(exc).__name__})") from exc

    def _values(self, where: str, names: Sequence[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for name in names:
            value = self.variables.get(name)
            if value is None:
                raise OutreachUnavailable(f"{where}: variable {name!r} has no value (collect it before this node)")
            values[name] = value
        return values

    def _sound(self, where: str, what: str, sound: object) -> str:
        if not isinstance(sound, str) or not _SOUND_NAME.fullmatch(sound):
            raise OutreachUnavailable(f"{where}: {what} is not a sound name (A-Z a-z 0-9 _ / -, not starting with /)")
        return sound

    async def _hear_then_key(self, channel: CallChannel, sounds: Sequence[str], timeout: float) -> str:
        """Play ``sounds`` in full (keys pressed meanwhile, and any type-ahead, are discarded), then wait for one
        key; "" when none came within ``timeout``."""
        self._typeahead = None
        for sound in sounds:
            await channel.play(sound, barge_in=False)
        return await channel.read_digits(max_digits=1, timeout=timeout)

    async def _medication(
        self, where: str, node: MedicationConfirmNode, port: OutreachPort, channel: CallChannel
    ) -> tuple[str, str, str]:
        """Two confirmations of the medication and dose; the port hears every answer, a hang-up after the first
        confirmation included (then the hang-up still ends the call). A hang-up before the first answer reports
        nothing: the call's outcome says it, and the scheduler calls again."""
        medication = self._sound(
            where,
            "the medication sound",
            await self._ask_port(where, "fetching the medication sound", port.medication_sound()),
        )
        first = await self._hear_then_key(
            channel, [self.sound_for(node.intro), medication, self.sound_for(node.ask)], node.timeout
        )
        if first != node.key:
            keys = first or "-"
            await self._ask_port(where, "recording the medication answer", port.medication_result(False, keys))
            return "not_confirmed", keys, node.next.not_confirmed
        try:
            second = await self._hear_then_key(
                channel, [self.sound_for(node.repeat), medication, self.sound_for(node.ask_again)], node.timeout
            )
        except ChannelError:
            # The caller hung up (or the call was lost) after confirming once: that is "not confirmed", and the
            # port must know, or a single "1" could pass for a taken dose. The hang-up stays the call's outcome.
            try:
                await self._ask_port(where, "recording the medication answer", port.medication_result(False, first))
            except OutreachUnavailable as exc:
                log.error("outreach.medication_answer_lost", node=self._where, error=str(exc))
            raise
        keys = f"{first},{second or '-'}"
        confirmed = second == node.key
        await self._ask_port(where, "recording the medication answer", port.medication_result(confirmed, keys))
        if confirmed:
            return "confirmed", keys, node.next.confirmed
        return "not_confirmed", keys, node.next.not_confirmed

    async def _book(
        self, where: str, node: VaccinationBookNode, port: OutreachPort, channel: CallChannel
    ) -> tuple[str, str, str]:
        values = self._values(where, [node.day_var, node.slot_var])
        day, slot = values[node.day_var], values[node.slot_var]
        if not _DAY.fullmatch(day):
            raise OutreachUnavailable(f"{where}: variable {node.day_var!r} is not a day 1-7")
        if slot not in SLOTS:
            raise OutreachUnavailable(f"{where}: variable {node.slot_var!r} is not a slot ({', '.join(SLOTS)})")
        result = await self._ask_port(where, "the booking", port.book_vaccination(int(day), slot))
        if not isinstance(result, BookingResult) or result.outcome not in _BOOKING_EDGES:
            raise OutreachUnavailable(f"{where}: the booking gave no known outcome")
        if result.sound is not None:
            self._typeahead = None
            await channel.play(self._sound(where, "the booking's sound", result.sound), barge_in=False)
        edge = _BOOKING_EDGES[result.outcome]
        return edge, result.outcome, getattr(node.next, edge)


async def run_flow(
    flow: Flow,
    channel: CallChannel,
    sound_for: SoundFor,
    on_step: OnStep = _noop_step,
    flows: Mapping[str, LoadedFlow] | None = None,
) -> FlowResult:
    """Convenience for a flow without subflows, recognizer or patient directory."""
    return await FlowRunner(flows or {}, sound_for, on_step).run(flow, channel)


def _dropped(channel: CallChannel) -> int:
    return channel.audio_losses().dropped if isinstance(channel, AudioLossReport) else 0


def _with_drops(heard: str | None, dropped: int) -> str | None:
    """The listen step's input, with the audio frames the recognizer never got (RTP gaps, or frames dropped
    because it fell behind): a result from damaged audio says so in the record. The note is kept whole; what
    was heard is shortened to make room (the step's input holds 64 characters)."""
    if dropped <= 0:
        return heard
    note = f"rtp dropped {dropped}"
    if not heard:
        return note
    return f"{heard[: 64 - len(note) - 2]}; {note}"
