"""The triage tier of a ``listen`` node: red flag → emergency, weak cue → asked once, symptoms → nurse triage."""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ivr import InMemoryCallChannel
from ivr.flow_loader import FlowError, LoadedFlow, load_flow
from ivr.flow_model import CONFIRM_QUESTION, Flow
from ivr.interpreter import FlowResult, FlowRunner, RouteDecision, Step, TriageResult, spoken_yes
from telephony.channel import CallChannel
from telephony.ports import Recognition, Recognizer, ScriptedRecognizer

REPO = Path(__file__).resolve().parents[3]
QUESTION = f"tts/{CONFIRM_QUESTION}"


def _sound_for(text: str) -> str:
    return f"tts/{text}"


def _flow(triage: dict[str, Any] | None = None, **listen: Any) -> Flow:
    """A listen node without a prompt of its own (so a scripted key is the confirmation's, not the prompt's)."""
    node: dict[str, Any] = {
        "type": "listen",
        "categories": {"emergency": "er", "medication": "med", "adverse_reaction": "adr"},
        "choices": {0: "er"},
        "default": "desk",
        "fallback": "desk",
        **listen,
    }
    if triage is not None:
        node["triage"] = triage
    nodes = {
        "l": node,
        "er": {"type": "route", "category": "emergency"},
        "med": {"type": "route", "category": "medication"},
        "adr": {"type": "route", "category": "adverse_reaction"},
        "nurse": {"type": "route", "category": "triage"},
        "desk": {"type": "route", "category": "general"},
    }
    return Flow.model_validate({"flow": "t", "start": "l", "nodes": nodes})


TRIAGE = _flow({"urgent": "nurse", "clinical_categories": ["adverse_reaction"]})


@dataclass
class Call:
    result: FlowResult
    steps: list[Step]
    channel: InMemoryCallChannel


async def _call(flow: Flow, recognizer: Recognizer, keys: list[str | None] | None = None) -> Call:
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    runner = FlowRunner({flow.flow: LoadedFlow(flow, Path("t.yaml"), "v1")}, _sound_for, on_step, recognizer=recognizer)
    channel = InMemoryCallChannel(keys=keys)
    with capture_logs():
        result = await asyncio.wait_for(runner.run(flow, channel), timeout=5)
    return Call(result, steps, channel)


def _listen_step(call: Call) -> Step:
    [step] = [s for s in call.steps if s.node == "l"]
    return step


WEAK = Recognition(
    "胸口有点不舒服", "general", level="urgent", confidence=0.55, discriminator="cardiac_chest_pain", confirm=True
)
URGENT = Recognition(
    "我发烧两天了，浑身没劲", "general", matched=("发烧",), level="urgent", confidence=0.8, discriminator="fever"
)
RED = Recognition("他叫不醒了", "emergency", True, ("叫不醒",), "emergency", 0.95, "unresponsive")
NURSE = RouteDecision("triage", "normal", "nurse")
EMERGENCY = RouteDecision("emergency", "emergency", "er")


# -- a single weak cue: asked once ----------------------------------------------------------------------------------


async def test_weak_cue_then_key_1_is_an_emergency() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK]), ["1"])
    assert call.result.route == EMERGENCY
    assert call.channel.sounds == [QUESTION]
    assert call.result.variables["priority"] == "emergency"
    assert call.result.triage == TriageResult("urgent", 0.55, "cardiac_chest_pain", "key")
    assert _listen_step(call) == Step("t", "l", "listen", "confirmed emergency", "key: urgent cardiac_chest_pain 0.55")


async def test_weak_cue_then_silence_goes_to_the_nurse() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK]), [None])
    assert call.result.route == NURSE
    assert "priority" not in call.result.variables
    assert call.result.triage is not None
    assert call.result.triage.confirm_asked
    assert call.result.triage.confirm_answer == "no_input"
    assert _listen_step(call).edge == "not confirmed"


async def test_weak_cue_then_another_key_goes_to_the_nurse() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK]), ["2"])
    assert call.result.route == NURSE
    assert call.result.triage is not None
    assert call.result.triage.confirm_answer == "declined"


@pytest.mark.parametrize(
    ("said", "answer", "route"),
    [
        ("需要", "speech", EMERGENCY),
        ("是的 快点", "speech", EMERGENCY),
        ("要！", "speech", EMERGENCY),
        ("不需要", "declined", NURSE),
        ("不要不要", "declined", NURSE),
        ("没事，就问问", "declined", NURSE),
    ],
)
async def test_weak_cue_answered_by_speech(said: str, answer: str, route: RouteDecision) -> None:
    # After words that are not a yes, a key still counts (read briefly); none here.
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK, Recognition(said, None)]), [None])
    assert call.result.route == route
    assert call.result.triage is not None
    assert call.result.triage.confirm_answer == answer


async def test_a_key_pressed_while_being_listened_to_still_answers() -> None:
    # The speech pass heard nothing; the key pressed meanwhile is read right after it.
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK, None]), ["1"])
    assert call.result.route == EMERGENCY
    assert call.result.triage is not None
    assert call.result.triage.confirm_answer == "key"


@dataclass
class SpeechOnce:
    """Speech for the listen node only: it is gone by the time of the confirmation (keys only then)."""

    results: list[Recognition] = field(default_factory=list)
    listened: int = 0

    def available_for(self, channel: CallChannel) -> bool:
        return self.listened == 0

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        return nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        self.listened += 1
        return self.results.pop(0)


async def test_without_speech_the_confirmation_takes_keys_only() -> None:
    recognizer = SpeechOnce([WEAK])
    call = await _call(TRIAGE, recognizer, ["1"])
    assert recognizer.listened == 1  # no speech pass for the confirmation
    assert call.result.route == EMERGENCY


async def test_the_question_is_configurable_per_node_and_rendered() -> None:
    flow = _flow({"urgent": "nurse", "confirm": {"say": "需要救护车吗？需要请按5", "key": 5, "timeout": 3}})
    call = await _call(flow, ScriptedRecognizer([WEAK]), ["5"])
    assert call.channel.sounds == ["tts/需要救护车吗？需要请按5"]
    assert call.result.route == EMERGENCY
    assert "需要救护车吗？需要请按5" in flow.prompt_texts()
    assert CONFIRM_QUESTION in TRIAGE.prompt_texts()  # the default question gets its audio too


async def test_a_hang_up_at_the_question_keeps_the_triage_for_the_record() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([WEAK]), [])  # key script exhausted: the caller hangs up
    assert call.result.outcome == "caller_hangup"
    assert call.result.triage == TriageResult("urgent", 0.55, "cardiac_chest_pain")


# -- levels ---------------------------------------------------------------------------------------------------------


async def test_urgent_symptoms_go_to_nurse_triage_without_a_question() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([URGENT]))
    assert call.result.route == NURSE
    assert call.channel.sounds == []
    assert call.result.triage == TriageResult("urgent", 0.8, "fever")
    assert _listen_step(call) == Step("t", "l", "listen", "triage urgent", "urgent fever 0.80")


async def test_urgent_in_a_clinical_category_keeps_its_route() -> None:
    heard = Recognition("打完疫苗起疹子", "adverse_reaction", level="urgent", discriminator="rash")
    call = await _call(TRIAGE, ScriptedRecognizer([heard]))
    assert call.result.route == RouteDecision("adverse_reaction", "normal", "adr")


async def test_a_red_flag_goes_to_emergency_at_once() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([RED]))
    assert call.result.route == EMERGENCY
    assert call.channel.sounds == []  # never asked
    # The category route says the same and keeps the terms that fired in the record (as before the triage tier).
    assert _listen_step(call).edge == "heard emergency"


async def test_a_red_flag_in_another_category_still_goes_to_emergency() -> None:
    heard = Recognition("吃了药以后喘不上气", "adverse_reaction", True, (), "emergency", 0.9, "anaphylaxis")
    call = await _call(TRIAGE, ScriptedRecognizer([heard]))
    assert call.result.route == EMERGENCY
    assert _listen_step(call).edge == "triage emergency"


async def test_routine_routes_by_category() -> None:
    call = await _call(TRIAGE, ScriptedRecognizer([Recognition("降压药怎么吃", "medication")]))
    assert call.result.route == RouteDecision("medication", "normal", "med")
    assert call.result.triage == TriageResult("routine", 1.0, "")


async def test_without_triage_the_node_behaves_as_before() -> None:
    flow = _flow()
    assert (await _call(flow, ScriptedRecognizer([RED]))).result.route == EMERGENCY
    assert (await _call(flow, ScriptedRecognizer([URGENT]))).result.route == RouteDecision("general", "normal", "desk")
    # A weak cue is not asked about without triage: the category decides, as before.
    weak = await _call(flow, ScriptedRecognizer([WEAK]))
    assert weak.channel.sounds == []
    assert weak.result.route == RouteDecision("general", "normal", "desk")


async def test_an_explicit_emergency_target() -> None:
    flow = Flow.model_validate(
        {
            "flow": "t",
            "start": "l",
            "nodes": {
                "l": {
                    "type": "listen",
                    "categories": {"medication": "desk"},
                    "default": "desk",
                    "fallback": "desk",
                    "triage": {"urgent": "nurse", "emergency": "er"},
                },
                "er": {"type": "route", "category": "emergency"},
                "nurse": {"type": "route", "category": "triage"},
                "desk": {"type": "route", "category": "general"},
            },
        }
    )
    assert flow.nodes["l"].targets()["triage emergency"] == "er"
    assert (await _call(flow, ScriptedRecognizer([WEAK]), ["1"])).result.route == EMERGENCY


def test_spoken_yes() -> None:
    assert spoken_yes("需要")
    assert spoken_yes("是的。")
    assert not spoken_yes("不需要")
    assert not spoken_yes("别")
    assert not spoken_yes("嗯")


# -- the shipped hotline -----------------------------------------------------------------------------------------------


def test_the_hotline_sends_urgent_callers_to_a_triage_route() -> None:
    hotline = load_flow(REPO / "dialplans" / "hotline.yaml").flow
    ask = hotline.nodes["ask"]
    assert ask.type == "listen"
    assert ask.triage is not None
    assert ask.emergency_target == "emergency"
    nurse = hotline.nodes[ask.triage.urgent]
    assert nurse.type == "route"
    assert nurse.category == "triage"
    assert ask.triage.confirm.say == CONFIRM_QUESTION
    assert ask.triage.confirm.key == "1"


# -- bad YAML -------------------------------------------------------------------------------------------------------

HEAD = """\
flow: t
start: l
nodes:
  l:
    type: listen
    categories: {emergency: er}
    default: er
    fallback: er
"""
TAIL = """\
  er:
    type: route
    category: emergency
  nurse:
    type: route
    category: triage
"""


def _problems(tmp_path: Path, triage: str, categories: str = "{emergency: er}") -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(HEAD.replace("{emergency: er}", categories) + triage + TAIL, encoding="utf-8")
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


@pytest.mark.parametrize(
    ("triage", "expected"),
    [
        pytest.param(
            "    triage: {urgent: nowhere}\n",
            "9:14: nodes.l.triage.urgent: node 'nowhere' is not defined",
            id="undefined-urgent",
        ),
        pytest.param(
            "    triage: {urgnt: nurse}\n",
            "9:14: nodes.l.triage.urgnt: unknown key `urgnt`",
            id="typo",
        ),
        pytest.param(
            "    triage:\n      urgent: nurse\n      confirm: {key: 12}\n",
            "11:17: nodes.l.triage.confirm.key: key must be one key of the phone: 0-9, * or # (got '12')",
            id="bad-key",
        ),
        pytest.param(
            "    triage:\n      urgent: nurse\n      clinical_categories: [dermatology]\n",
            "11:29: nodes.l.triage.clinical_categories.0: Input should be 'emergency'",
            id="bad-category",
        ),
    ],
)
def test_bad_triage_keys_name_file_node_and_field(tmp_path: Path, triage: str, expected: str) -> None:
    problems = _problems(tmp_path, triage)
    assert any(p.startswith(expected) for p in problems), problems


def test_triage_without_an_emergency_target_is_refused(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path, "    triage: {urgent: nurse}\n", categories="{medication: er}")
    assert problem.startswith("4:3: nodes.l: ")
    assert "triage needs an emergency target" in problem
