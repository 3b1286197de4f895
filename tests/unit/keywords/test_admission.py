"""Admission control for speech: the budget core, and the ``listen`` node over it with fake engines.

What must hold: a caller over the budget gets the node's key menu at once (its prompt is the first thing played,
never the invitation to speak) and key 0 reaches the emergency route there, also typed ahead; the call's result
says "refused"; a slot is released on every way out of a listen node (result, hang-up, error, cancellation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from ivr import InMemoryCallChannel
from ivr.flow_model import Flow
from ivr.interpreter import FlowResult, FlowRunner, RouteDecision
from keywords.admission import (
    AdmissionCounts,
    AdmittedRecognizer,
    SpeechBudget,
    budgeted,
    default_max_streams,
)
from keywords.recognizer import SpeechStreamLike, StreamingRecognizer
from keywords.speech import SpeechBusy, SpeechEvent
from telephony.channel import CallChannel, CallerHungUp
from telephony.ports import Recognition, RecognitionUnavailable, RecognizerBusy, ScriptedRecognizer

# -- the budget core ------------------------------------------------------------------------------------------------


def test_the_budget_admits_up_to_its_size_then_refuses_without_waiting() -> None:
    budget = SpeechBudget(2)
    first, second = budget.try_acquire(), budget.try_acquire()
    assert first is not None
    assert second is not None
    assert budget.try_acquire() is None
    assert budget.counts() == AdmissionCounts(max_streams=2, in_use=2, peak=2, admitted=2, refused=1)
    first.release()
    third = budget.try_acquire()
    assert third is not None
    assert budget.counts() == AdmissionCounts(max_streams=2, in_use=2, peak=2, admitted=3, refused=1)


def test_a_slot_is_released_once_however_often_it_is_released() -> None:
    budget = SpeechBudget(1)
    slot = budget.acquire()
    with slot:
        assert budget.in_use == 1
    assert not slot.held
    slot.release()  # a finally after the with: harmless
    assert budget.in_use == 0
    assert budget.try_acquire() is not None


def test_acquire_on_a_spent_budget_raises_speech_busy_naming_the_setting() -> None:
    budget = SpeechBudget(1)
    budget.acquire()
    with pytest.raises(SpeechBusy, match=r"all 1 speech recognition slots.*speech\.max_streams"):
        budget.acquire()


@pytest.mark.parametrize("size", [0, -1])
def test_a_budget_below_one_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_streams must be at least 1"):
        SpeechBudget(size)


@pytest.mark.parametrize(("cores", "expected"), [(None, 1), (1, 1), (2, 2), (3, 3), (4, 4), (16, 16)])
def test_the_default_is_one_stream_per_core(cores: int | None, expected: int) -> None:
    assert default_max_streams(cores) == expected


def test_budgeted_takes_the_configured_size_or_the_default_and_logs_it() -> None:
    with capture_logs() as logs:
        assert budgeted(ScriptedRecognizer(), 5, 2).budget.max_streams == 5
        assert budgeted(ScriptedRecognizer(), None, 2).budget.max_streams == 2
    assert [(e["event"], e["max_streams"], e["source"]) for e in logs] == [
        ("speech.budget", 5, "configured"),
        ("speech.budget", 2, "default 1.0 per core"),
    ]


# -- the listen node over the budget -----------------------------------------------------------------------------


def _flow(greeting_barge_in: bool = False) -> Flow:
    return Flow.model_validate(
        {
            "flow": "test",
            "start": "greeting",
            "nodes": {
                "greeting": {"type": "play", "say": "welcome", "barge_in": greeting_barge_in, "next": "ask"},
                "ask": {
                    "type": "listen",
                    "say": "say it, or press 0 for emergency",
                    "choices": {0: "emergency"},
                    "categories": {"emergency": "emergency", "medication": "desk"},
                    "default": "desk",
                    "fallback": "menu",
                },
                "menu": {
                    "type": "menu",
                    "say": "press 0 for emergency, 1 for the desk",
                    "barge_in": True,
                    "choices": {0: "emergency", 1: "desk"},
                    "fallback": "desk",
                },
                "emergency": {"type": "route", "category": "emergency", "priority": "emergency"},
                "desk": {"type": "route", "category": "general"},
            },
        }
    )


FLOW = _flow()
EMERGENCY = RouteDecision("emergency", "emergency", "emergency")
DESK = RouteDecision("general", "normal", "desk")
LISTEN_PROMPT = "tts/say it, or press 0 for emergency"
MENU_PROMPT = "tts/press 0 for emergency, 1 for the desk"


def _sound_for(text: str) -> str:
    return f"tts/{text}"


@dataclass
class HeldRecognizer:
    """Listens until ``release`` is set (a caller still talking), then hears ``result``. Counts its listenings."""

    result: Recognition | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    fail: BaseException | None = None

    def available_for(self, channel: CallChannel) -> bool:
        return True

    def admit(self, channel: CallChannel) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        self.listening.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return self.result


async def _run(recognizer: Any, channel: InMemoryCallChannel, flow: Flow = FLOW) -> FlowResult:
    return await FlowRunner({}, _sound_for, recognizer=recognizer).run(flow, channel)


async def test_a_caller_over_the_budget_gets_the_key_menu_at_once_and_key_0_reaches_emergency() -> None:
    held = HeldRecognizer(Recognition("胸口疼", "emergency", emergency=True))
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    first = asyncio.create_task(_run(recognizer, InMemoryCallChannel()))
    await held.listening.wait()  # the first caller holds the only slot, still talking

    second = InMemoryCallChannel(keys=["0"])
    with capture_logs() as logs:
        result = await _run(recognizer, second)

    # Never the invitation to speak: the key menu's prompt follows the greeting directly, and 0 is answered there.
    assert second.sounds == ["tts/welcome", MENU_PROMPT]
    assert result.route == EMERGENCY
    assert result.speech_admission == "refused"
    busy = next(e for e in logs if e["event"] == "speech.busy")
    assert (busy["reason"], busy["max_streams"], busy["in_use"], busy["refused_total"]) == ("budget", 1, 1, 1)
    assert not first.done()  # the admitted caller was never disturbed

    held.release.set()
    admitted = await first
    assert admitted.route == EMERGENCY
    assert admitted.speech_admission == "admitted"
    assert recognizer.budget.counts() == AdmissionCounts(max_streams=1, in_use=0, peak=1, admitted=1, refused=1)


async def test_key_0_typed_ahead_during_the_greeting_still_reaches_emergency_when_refused() -> None:
    held = HeldRecognizer()
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    first = asyncio.create_task(_run(recognizer, InMemoryCallChannel()))
    await held.listening.wait()

    typed_ahead = InMemoryCallChannel(keys=["0"])  # pressed during the greeting (barge-in)
    result = await _run(recognizer, typed_ahead, _flow(greeting_barge_in=True))

    assert result.route == EMERGENCY
    assert typed_ahead.sounds == ["tts/welcome"]  # the menu answered the key it had, without making them wait
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_the_step_records_why_the_caller_got_the_keys() -> None:
    held = HeldRecognizer()
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    first = asyncio.create_task(_run(recognizer, InMemoryCallChannel()))
    await held.listening.wait()
    steps: list[tuple[str, str | None, str | None]] = []

    async def on_step(step: Any) -> None:
        steps.append((step.node, step.edge, step.input))

    await FlowRunner({}, _sound_for, on_step, recognizer=recognizer).run(FLOW, InMemoryCallChannel(keys=["1"]))

    assert ("ask", "fallback", "speech busy") in steps
    assert ("menu", "press 1", "1") in steps
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_a_slot_is_released_when_the_caller_hangs_up_mid_listen() -> None:
    held = HeldRecognizer(fail=CallerHungUp("caller hung up"))
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    call = asyncio.create_task(_run(recognizer, InMemoryCallChannel()))
    await held.listening.wait()
    assert recognizer.budget.in_use == 1
    held.release.set()

    result = await call

    assert (result.outcome, result.last_step, result.speech_admission) == ("caller_hangup", "ask", "admitted")
    assert recognizer.budget.in_use == 0


async def test_a_slot_is_released_when_recognition_fails() -> None:
    held = HeldRecognizer(fail=RecognitionUnavailable("engine error"))
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    held.release.set()

    # No key during the invitation to speak; at the key menu, silence once, then 1.
    result = await _run(recognizer, InMemoryCallChannel(keys=[None, "1"]))

    assert result.route == DESK  # "speech failed": the key menu, then key 1
    assert recognizer.budget.in_use == 0


async def test_a_slot_is_released_when_the_call_task_is_cancelled_mid_listen() -> None:
    held = HeldRecognizer()
    recognizer = AdmittedRecognizer(held, SpeechBudget(1))
    call = asyncio.create_task(_run(recognizer, InMemoryCallChannel()))
    await held.listening.wait()
    assert recognizer.budget.in_use == 1

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert recognizer.budget.in_use == 0
    assert recognizer.budget.try_acquire() is not None  # the next caller is listened to


async def test_a_slot_is_released_after_a_result_and_reused_by_the_next_caller() -> None:
    scripted = ScriptedRecognizer([Recognition("降压药", "medication"), Recognition("降压药", "medication")])
    recognizer = AdmittedRecognizer(scripted, SpeechBudget(1))
    for _ in range(2):
        result = await _run(recognizer, InMemoryCallChannel())
        assert (result.route, result.speech_admission) == (DESK, "admitted")
    assert recognizer.budget.counts() == AdmissionCounts(max_streams=1, in_use=0, peak=1, admitted=2, refused=0)


async def test_without_speech_for_the_call_no_slot_is_taken() -> None:
    recognizer = AdmittedRecognizer(ScriptedRecognizer(available=False), SpeechBudget(1))
    result = await _run(recognizer, InMemoryCallChannel(keys=["1"]))
    assert (result.route, result.speech_admission) == (DESK, None)
    assert recognizer.budget.counts().admitted == 0


# -- an engine that is full itself (e.g. every speech server): the same fallback ----------------------------------


class AudioChannel(InMemoryCallChannel):
    """The in-memory call with caller audio (silence, 20 ms chunks), as ARI external media gives it."""

    @contextlib.asynccontextmanager
    async def caller_audio(self, max_seconds: float = 30.0) -> AsyncIterator[AsyncIterator[bytes]]:
        async def frames() -> AsyncIterator[bytes]:
            for _ in range(int(max_seconds * 50)):
                await asyncio.sleep(0)
                yield b"\x00\x00" * 160

        yield frames()


@dataclass
class FullEngine:
    """A speech engine with no free capacity: refuses at the stream (``at="open"``) or at the first audio."""

    at: str = "open"

    def async_stream(self, sample_rate: int = 8000, *, max_seconds: float = 20.0) -> SpeechStreamLike:
        if self.at == "open":
            raise SpeechBusy("every speech server is full")
        return _RefusingStream()


class _RefusingStream:
    async def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        raise SpeechBusy("the speech server is full")

    async def finish(self) -> SpeechEvent:
        return SpeechEvent("final", "")

    async def aclose(self) -> None:
        return None


def _no_classifier(text: str) -> Recognition:
    raise AssertionError("nothing was heard, so nothing is classified")


@pytest.mark.parametrize("at", ["open", "audio"])
async def test_an_engine_that_is_full_sends_the_caller_to_the_keys_and_frees_the_slot(at: str) -> None:
    recognizer = AdmittedRecognizer(StreamingRecognizer(FullEngine(at), _no_classifier), SpeechBudget(2))
    channel = AudioChannel(keys=[None, "0"])  # no key while invited to speak; 0 at the key menu

    with capture_logs() as logs:
        result = await _run(recognizer, channel)

    assert result.route == EMERGENCY
    assert result.speech_admission == "refused"
    assert channel.sounds[:3] == ["tts/welcome", LISTEN_PROMPT, MENU_PROMPT]
    assert any(e["event"] == "speech.busy" and e["reason"] == "engine" for e in logs)
    assert recognizer.budget.in_use == 0


async def test_an_inner_recognizer_that_refuses_admission_leaves_no_slot_behind() -> None:
    class Refusing(ScriptedRecognizer):
        def admit(self, channel: CallChannel) -> contextlib.nullcontext[None]:
            raise RecognizerBusy("the remote farm is full")

    recognizer = AdmittedRecognizer(Refusing(), SpeechBudget(1))
    result = await _run(recognizer, InMemoryCallChannel(keys=["0"]))

    assert (result.route, result.speech_admission) == (EMERGENCY, "refused")
    assert recognizer.budget.in_use == 0
