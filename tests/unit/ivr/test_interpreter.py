"""run_flow over the in-memory channel: prompt order, every outcome, the step bound, and a property test."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ivr import ChannelError, InMemoryCallChannel
from ivr.flow_model import Flow, HangupNode, MenuNode, PlayNode, RouteNode, SetNode
from ivr.interpreter import MAX_STEPS, FlowResult, FlowRunner, RouteDecision, Step, run_flow
from ivr.prompts import SOUND_PREFIX, SYSTEM_PROMPTS
from telephony.channel import UNAVAILABLE_SOUND


def _flow(start: str, nodes: dict[str, dict[str, Any]]) -> Flow:
    return Flow.model_validate({"flow": "test", "start": start, "nodes": nodes})


GREETING = _flow(
    "greeting",
    {
        "greeting": {"type": "play", "say": "welcome", "next": "notice"},
        "notice": {"type": "play", "file": "custom/notice", "next": "bye"},
        "bye": {"type": "hangup", "say": "goodbye"},
    },
)


def _sound_for(text: str) -> str:
    return f"tts/{text}"


class Steps:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, step: Step) -> None:
        self.seen.append(step.node)


async def _run(flow: Flow, channel: InMemoryCallChannel) -> tuple[FlowResult, list[str]]:
    steps = Steps()
    result = await run_flow(flow, channel, _sound_for, steps)
    return result, steps.seen


async def test_completed_path_plays_every_prompt_in_order_then_hangs_up() -> None:
    channel = InMemoryCallChannel()
    result, steps = await _run(GREETING, channel)
    assert result == FlowResult("completed", "bye")
    assert channel.operations == [
        ("answer",),
        ("play", "tts/welcome"),
        ("play", "custom/notice"),  # a `file:` prompt is played by its sound name, not rendered
        ("play", "tts/goodbye"),
        ("hangup",),
    ]
    assert steps == ["greeting", "notice", "bye"]
    assert channel.hung_up


async def test_hangup_node_without_prompt_hangs_up_without_playing() -> None:
    channel = InMemoryCallChannel()
    result, _ = await _run(_flow("end", {"end": {"type": "hangup"}}), channel)
    assert result.outcome == "completed"
    assert channel.operations == [("answer",), ("hangup",)]


async def test_hangup_during_second_prompt_is_caller_hangup_at_that_node() -> None:
    channel = InMemoryCallChannel(hang_up_at=3)  # answer, 1st prompt, 2nd prompt ←
    result, steps = await _run(GREETING, channel)
    assert result == FlowResult("caller_hangup", "notice")
    assert channel.sounds == ["tts/welcome", "custom/notice"]
    assert steps == ["greeting"]  # steps are recorded once done; where it ended is the result's last_step
    assert channel.operations[-1] == ("play", "custom/notice")  # no hang-up sent to a gone caller


async def test_hangup_before_answer_reports_the_answer_step() -> None:
    result, steps = await _run(GREETING, InMemoryCallChannel(hang_up_at=1))
    assert result == FlowResult("caller_hangup", "answer")
    assert steps == []


async def test_connection_lost_is_its_own_outcome() -> None:
    channel = InMemoryCallChannel(lose_connection_at=2)
    result, _ = await _run(GREETING, channel)
    assert result.outcome == "connection_lost"
    assert result.last_step == "greeting"
    assert result.error is not None
    # Without events no prompt's end could be heard of; but the caller is hung up, not left on a silent line.
    assert channel.operations[-1] == ("hangup",)
    assert channel.hung_up


async def test_channel_error_is_error_and_the_caller_is_told_then_hung_up() -> None:
    channel = InMemoryCallChannel(fail_at=3)
    with capture_logs() as logs:
        result, _ = await _run(GREETING, channel)
    assert result.outcome == "error"
    assert result.last_step == "notice"
    assert channel.operations[-3:] == [("answer",), ("play", UNAVAILABLE_SOUND), ("hangup",)]
    assert channel.hung_up
    assert [e["event"] for e in logs] == ["flow.failed"]
    assert logs[0]["node"] == "notice"


class SilentPlayback(InMemoryCallChannel):
    """A channel whose playbacks never report their end (the event of a prompt's end is lost)."""

    async def play(self, sound: str, *, barge_in: bool = False) -> str | None:
        self.operations.append(("play", sound))
        if sound == UNAVAILABLE_SOUND:
            await asyncio.sleep(3600)
        raise ChannelError("play failed with HTTP 500")


async def test_the_unavailable_prompt_is_bounded_and_the_caller_still_hung_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("telephony.channel.APOLOGY_TIMEOUT", 0.05)
    channel = SilentPlayback()
    with capture_logs() as logs:
        result, _ = await asyncio.wait_for(_run(GREETING, channel), timeout=10)
    assert result.outcome == "error"
    assert channel.operations[-1] == ("hangup",)
    assert "call.unavailable_prompt_failed" in [e["event"] for e in logs]


class BrokenHangup(InMemoryCallChannel):
    """A channel whose hang-up keeps failing (like ARI answering DELETE with HTTP 500)."""

    async def hangup(self) -> None:
        self.operations.append(("hangup",))
        raise ChannelError("DELETE failed with HTTP 500")


async def test_failing_hangup_is_an_error_outcome_not_an_exception() -> None:
    channel = BrokenHangup()
    with capture_logs():
        result, _ = await _run(GREETING, channel)
    assert result.outcome == "error"
    assert result.last_step == "bye"
    # The end's hang-up, then the error path's: told, and hung up once more.
    assert [op[0] for op in channel.operations[-4:]] == ["hangup", "answer", "play", "hangup"]


async def test_play_only_loop_ends_with_error_after_max_steps() -> None:
    loop = _flow(
        "a",
        {
            "a": {"type": "play", "say": "one", "next": "b"},
            "b": {"type": "play", "say": "two", "next": "a"},
        },
    )
    channel = InMemoryCallChannel()
    with capture_logs():
        result, steps = await asyncio.wait_for(_run(loop, channel), timeout=10)
    assert result.outcome == "error"
    assert result.error is not None
    assert str(MAX_STEPS) in result.error
    assert len(steps) == MAX_STEPS
    assert steps[:4] == ["a", "b", "a", "b"]
    assert channel.operations[-1] == ("hangup",)


@st.composite
def _random_flows(draw: st.DrawFn) -> Flow:
    count = draw(st.integers(min_value=1, max_value=8))
    names = [f"n{i}" for i in range(count)]
    nodes: dict[str, dict[str, Any]] = {}
    for name in names:
        prompt: dict[str, str] = draw(st.sampled_from([{}, {"say": "text"}, {"file": "custom/x"}]))
        if draw(st.booleans()):
            nodes[name] = {"type": "hangup", **prompt}
        else:
            nodes[name] = {"type": "play", **(prompt or {"say": "text"}), "next": draw(st.sampled_from(names))}
    return _flow(draw(st.sampled_from(names)), nodes)


@settings(max_examples=60, deadline=None)
@given(
    flow=_random_flows(),
    failure=st.sampled_from(["hang_up_at", "lose_connection_at", "fail_at", None]),
    at=st.integers(min_value=1, max_value=12),
)
def test_random_flows_always_terminate_with_a_known_outcome(flow: Flow, failure: str | None, at: int) -> None:
    channel = InMemoryCallChannel(
        hang_up_at=at if failure == "hang_up_at" else None,
        lose_connection_at=at if failure == "lose_connection_at" else None,
        fail_at=at if failure == "fail_at" else None,
    )
    with capture_logs():
        result, steps = asyncio.run(_run(flow, channel))
    assert result.outcome in ("completed", "caller_hangup", "connection_lost", "error")
    assert len(steps) <= MAX_STEPS
    assert len(channel.operations) <= 2 * MAX_STEPS + 3  # answer + (step + prompt) per step + hang-ups
    if result.outcome == "completed":
        assert isinstance(flow.nodes[result.last_step], HangupNode)
        assert channel.operations[-1] == ("hangup",)
    if result.outcome == "error":
        assert channel.hung_up


_KEYS = st.sampled_from(["0", "1", "2", "3", "9", "*", "#"])


@st.composite
def _random_menu_flows(draw: st.DrawFn) -> Flow:
    """Flows of menus (random choices to random nodes), plays, sets and terminal hang-ups and routes."""
    count = draw(st.integers(min_value=1, max_value=8))
    names = [f"n{i}" for i in range(count)]
    target = st.sampled_from(names)
    nodes: dict[str, dict[str, Any]] = {}
    for name in names:
        kind = draw(st.sampled_from(["menu", "play", "set", "hangup", "route"]))
        prompt: dict[str, str] = draw(st.sampled_from([{"say": "text"}, {"file": "custom/x"}]))
        barge_in = draw(st.booleans())
        if kind == "menu":
            choices = draw(st.dictionaries(_KEYS, target, min_size=1, max_size=4))
            nodes[name] = {
                "type": "menu",
                **prompt,
                "barge_in": barge_in,
                "retries": draw(st.integers(min_value=0, max_value=3)),
                "choices": choices,
                "fallback": draw(target),
                **draw(st.sampled_from([{}, {"invalid": {"say": "bad"}, "no_input": {"say": "none"}}])),
            }
        elif kind == "play":
            nodes[name] = {"type": "play", **prompt, "barge_in": barge_in, "next": draw(target)}
        elif kind == "set":
            nodes[name] = {"type": "set", "vars": {"v": draw(st.sampled_from(["a", "b"]))}, "next": draw(target)}
        elif kind == "hangup":
            nodes[name] = {"type": "hangup", **draw(st.sampled_from([{}, prompt]))}
        else:
            nodes[name] = {"type": "route", "category": draw(st.sampled_from(["emergency", "general"]))}
    return _flow(draw(target), nodes)


def _next_of(flow: Flow, step: Step) -> str | None:
    """Where the flow goes after ``step``, by the edge the step reports (None for a terminal node)."""
    node = flow.nodes[step.node]
    if isinstance(node, MenuNode):
        if step.edge == "fallback":
            assert step.input in ("invalid", "no_input")
            return node.fallback
        assert step.edge == f"press {step.input}"
        return node.choices[step.input or ""]
    if isinstance(node, (PlayNode, SetNode)):
        assert step.edge == "next"
        return node.next
    return None


@settings(max_examples=150, deadline=None)
@given(
    flow=_random_menu_flows(),
    keys=st.none() | st.lists(st.none() | st.text(alphabet="0123456789*#", min_size=1, max_size=3), max_size=12),
)
def test_random_menu_flows_driven_by_random_keys_end_with_a_known_outcome(
    flow: Flow, keys: list[str | None] | None
) -> None:
    channel = InMemoryCallChannel(keys=None if keys is None else list(keys))
    recorded: list[Step] = []

    async def on_step(step: Step) -> None:
        recorded.append(step)

    async def call() -> FlowResult:
        return await asyncio.wait_for(run_flow(flow, channel, _sound_for, on_step), timeout=5)

    with capture_logs():
        result = asyncio.run(call())
    event(result.outcome)
    assert result.outcome in ("completed", "routed", "caller_hangup", "error")
    assert 0 < len(recorded) <= MAX_STEPS or result.outcome == "caller_hangup"
    assert len(recorded) <= MAX_STEPS
    # every step leaves by an edge that exists, and the next step is where that edge points
    for before, after in itertools.pairwise(recorded):
        assert _next_of(flow, before) == after.node
    if result.outcome == "caller_hangup":
        assert keys is not None  # only a finished key script hangs up
        assert channel.keys == []
    if result.outcome == "completed":
        assert isinstance(flow.nodes[result.last_step], HangupNode)
        assert channel.operations[-1] == ("hangup",)
    if result.outcome == "routed":
        node = flow.nodes[result.last_step]
        assert isinstance(node, RouteNode)
        assert result.route == RouteDecision(node.category, node.effective_priority, result.last_step)
        assert not channel.hung_up
    if result.outcome == "error":
        assert result.error is not None
        assert str(MAX_STEPS) in result.error
        assert len(recorded) == MAX_STEPS
        assert channel.hung_up
    if result.outcome in ("completed", "routed"):
        assert recorded[-1].node == result.last_step


async def test_a_silent_route_at_the_start_leaves_the_answer_to_the_queue_when_told() -> None:
    route_first = _flow("route", {"route": {"type": "route", "category": "general"}})
    announced = _flow("route", {"route": {"type": "route", "category": "general", "say": "one moment"}})
    for flow, defer, answered in (
        (route_first, True, False),  # nothing to say: the queue answers while it rings the agent
        (route_first, False, True),  # a transport whose queue can't answer: answered here as always
        (announced, True, True),  # a prompt needs an answered channel
        (GREETING, True, True),
    ):
        channel = InMemoryCallChannel()
        result = await FlowRunner({}, _sound_for, defer_answer=defer).run(flow, channel)
        assert result.answered is answered, (flow.start, defer)
        assert (("answer",) in channel.operations) is answered
        if flow is route_first:
            assert (result.outcome, result.route) == ("routed", RouteDecision("general", "normal", "route"))


def test_unavailable_sound_is_the_rendered_system_prompt() -> None:
    # The call edge names the sound (telephony sits below ivr); the prompts module renders it: they must agree.
    assert f"{SOUND_PREFIX}/unavailable" == UNAVAILABLE_SOUND
    assert "unavailable" in SYSTEM_PROMPTS
