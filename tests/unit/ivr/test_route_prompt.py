"""Who says a route node's prompt: the IVR before routing (FastAGI), or the queue while the agent's phone rings
(ARI, ``queue_says_route_prompt``). An emergency caller must not hear ~5 s of "please hold" before anyone is dialled."""

from __future__ import annotations

from typing import Any

from ivr import InMemoryCallChannel
from ivr.flow_model import Flow
from ivr.interpreter import FlowResult, FlowRunner, RouteDecision, Step

EMERGENCY_SAY = "正在为您优先转接急诊医护人员，请不要挂机。"


def _flow(start: str, nodes: dict[str, dict[str, Any]]) -> Flow:
    return Flow.model_validate({"flow": "test", "start": start, "nodes": nodes})


# The shipped hotline's shape: a greeting one may skip, a menu whose 0 is the emergency route.
HOTLINE = _flow(
    "greeting",
    {
        "greeting": {"type": "play", "say": "welcome", "barge_in": True, "next": "menu"},
        "menu": {
            "type": "menu",
            "say": "press 0 for an emergency",
            "choices": {"0": "emergency", "1": "general"},
            "fallback": "general",
        },
        "emergency": {"type": "route", "category": "emergency", "say": EMERGENCY_SAY},
        "general": {"type": "route", "category": "general", "file": "custom/general"},
    },
)


def _sound_for(text: str) -> str:
    return f"tts/{text}"


async def _run(
    flow: Flow, keys: list[str | None], *, defer_answer: bool = False, queue_says_route_prompt: bool = False
) -> tuple[FlowResult, InMemoryCallChannel, list[Step]]:
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    channel = InMemoryCallChannel(keys=keys)
    result = await FlowRunner(
        {}, _sound_for, on_step, defer_answer=defer_answer, queue_says_route_prompt=queue_says_route_prompt
    ).run(flow, channel)
    return result, channel, steps


async def test_on_ari_the_emergency_prompt_goes_with_the_decision_and_nothing_is_said_first() -> None:
    result, channel, steps = await _run(HOTLINE, ["0"], defer_answer=True, queue_says_route_prompt=True)
    assert result.outcome == "routed"
    assert result.route == RouteDecision("emergency", "emergency", "emergency", f"tts/{EMERGENCY_SAY}")
    # 0 during the greeting skips the menu; the route prompt is not played by the IVR.
    assert channel.operations == [("answer",), ("play", "tts/welcome")]
    # The path still has the route step, with its category and priority, as the last step.
    assert (steps[-1].node, steps[-1].node_type, steps[-1].edge, steps[-1].input) == (
        "emergency",
        "route",
        "emergency",
        "emergency",
    )


async def test_on_fastagi_the_route_prompt_is_said_before_routing_as_before() -> None:
    result, channel, steps = await _run(HOTLINE, ["0"])
    assert result.route == RouteDecision("emergency", "emergency", "emergency")
    assert result.route.prompt is None  # nothing left for the queue to play
    assert channel.operations == [("answer",), ("play", "tts/welcome"), ("play", f"tts/{EMERGENCY_SAY}")]
    assert steps[-1].node == "emergency"


async def test_a_file_prompt_is_handed_over_by_its_sound_name_and_a_silent_route_hands_over_none() -> None:
    result, channel, _ = await _run(HOTLINE, ["1"], queue_says_route_prompt=True)
    assert result.route == RouteDecision("general", "normal", "general", "custom/general")
    assert ("play", "custom/general") not in channel.operations
    silent = _flow("route", {"route": {"type": "route", "category": "general"}})
    result, _, _ = await _run(silent, [], queue_says_route_prompt=True)
    assert result.route == RouteDecision("general", "normal", "route", None)


async def test_a_flow_starting_with_an_announced_route_leaves_the_answer_and_the_prompt_to_the_queue() -> None:
    announced = _flow("route", {"route": {"type": "route", "category": "emergency", "say": EMERGENCY_SAY}})
    result, channel, _ = await _run(announced, [], defer_answer=True, queue_says_route_prompt=True)
    assert result.answered is False
    assert channel.operations == []
    assert result.route is not None
    assert result.route.prompt == f"tts/{EMERGENCY_SAY}"
    # Without the queue saying it, the IVR must answer to say it (and the queue gets no prompt).
    result, channel, _ = await _run(announced, [], defer_answer=True)
    assert result.answered is True
    assert channel.operations == [("answer",), ("play", f"tts/{EMERGENCY_SAY}")]
    assert result.route is not None
    assert result.route.prompt is None
