"""FlowRunner node by node over the in-memory channel, then the real dialplans driven by key scripts."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from ivr import InMemoryCallChannel
from ivr.conditions import is_open
from ivr.flow_loader import LoadedFlow, load_flow
from ivr.flow_model import Flow, Hours
from ivr.interpreter import MAX_REPEATS, FlowResult, FlowRunner, RouteDecision, Step
from ivr.memory_channel import MemoryOutreach
from telephony.channel import CallChannel
from telephony.ports import NoRecognizer, OutreachPort, PatientMatch, Recognition, Recognizer, ScriptedRecognizer
from telephony.rtp import AudioLosses

DIALPLANS = Path(__file__).resolve().parents[3] / "dialplans"
SHANGHAI = ZoneInfo("Asia/Shanghai")
# Wednesday 3 March 2027, 10:00 in Shanghai: inside the hotline's outpatient hours.
IN_HOURS = datetime(2027, 3, 3, 10, 0, tzinfo=SHANGHAI)
Keys = list[str | None] | None


def _flow(start: str, nodes: dict[str, dict[str, Any]], *, name: str = "test", **extra: Any) -> Flow:
    return Flow.model_validate({"flow": name, "start": start, "nodes": nodes, **extra})


def _loaded(flow: Flow) -> LoadedFlow:
    return LoadedFlow(flow, Path(f"{flow.flow}.yaml"), "v1")


def _sound_for(text: str) -> str:
    return f"tts/{text}"


@dataclass
class Directory:
    match: PatientMatch | None
    asked: int = 0

    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None:
        self.asked += 1
        return self.match


@dataclass
class Call:
    result: FlowResult
    steps: list[Step]
    channel: InMemoryCallChannel
    runner: FlowRunner = field(repr=False)

    @property
    def path(self) -> list[str]:
        return [s.node if s.flow == "test" else f"{s.flow}:{s.node}" for s in self.steps]


async def _call(
    flow: Flow,
    keys: Keys = None,
    *,
    subflows: tuple[Flow, ...] = (),
    recognizer: Recognizer | None = None,
    directory: Directory | None = None,
    now: datetime = IN_HOURS,
    outreach: OutreachPort | None = None,
    channel: InMemoryCallChannel | None = None,
) -> Call:
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    runner = FlowRunner(
        {f.flow: _loaded(f) for f in (flow, *subflows)},
        _sound_for,
        on_step,
        recognizer=recognizer or NoRecognizer(),
        directory=directory or Directory(None),
        now=lambda: now,
        outreach=outreach,
    )
    channel = channel or InMemoryCallChannel(keys=keys)
    with capture_logs():
        result = await asyncio.wait_for(runner.run(flow, channel), timeout=5)
    return Call(result, steps, channel, runner)


def _step(call: Call, node: str) -> Step:
    found = [s for s in call.steps if s.node == node]
    assert len(found) == 1, f"{node} visited {len(found)} times: {call.path}"
    return found[0]


END = {"ok": {"type": "hangup", "say": "ok"}, "fb": {"type": "hangup", "say": "fallback"}}

# -- menu -----------------------------------------------------------------------------------------

MENU = _flow(
    "m",
    {
        "m": {
            "type": "menu",
            "say": "press one",
            "choices": {1: "ok", 2: "fb"},
            "invalid": {"say": "wrong key"},
            "no_input": {"say": "nothing"},
            "fallback": "fb",
        },
        **END,
    },
)


async def test_menu_valid_choice_takes_its_edge_with_the_key_as_input() -> None:
    call = await _call(MENU, ["1"])
    assert call.result == FlowResult("completed", "ok")
    assert _step(call, "m") == Step("test", "m", "menu", "press 1", "1")
    assert call.channel.sounds == ["tts/press one", "tts/ok"]
    assert ("read_digits", "1") not in call.channel.operations  # the barge-in key was used without waiting


async def test_menu_invalid_key_plays_invalid_prompt_then_replays() -> None:
    call = await _call(MENU, ["7", "1"])
    assert call.result.last_step == "ok"
    assert call.channel.sounds == ["tts/press one", "tts/wrong key", "tts/press one", "tts/ok"]
    assert _step(call, "m").edge == "press 1"


async def test_menu_silence_plays_no_input_prompt() -> None:
    call = await _call(MENU, [None, "1"])
    assert call.result.last_step == "ok"
    assert call.channel.sounds == ["tts/press one", "tts/nothing", "tts/press one", "tts/ok"]


@pytest.mark.parametrize(
    ("keys", "kind", "retry_sound"),
    [(["7", "8", "9"], "invalid", "tts/wrong key"), ([None, None, None], "no_input", "tts/nothing")],
)
async def test_menu_retries_exhausted_take_fallback(keys: Keys, kind: str, retry_sound: str) -> None:
    call = await _call(MENU, keys)
    assert call.result == FlowResult("completed", "fb")
    assert _step(call, "m") == Step("test", "m", "menu", "fallback", kind)
    # retries: 2 → three attempts, two retry prompts, then the fallback (no third retry prompt)
    assert call.channel.sounds == [
        "tts/press one",
        retry_sound,
        "tts/press one",
        retry_sound,
        "tts/press one",
        "tts/fallback",
    ]
    assert call.channel.keys == []


async def test_menu_with_zero_retries_falls_back_at_once() -> None:
    flow = _flow("m", {"m": {"type": "menu", "say": "p", "retries": 0, "choices": {1: "ok"}, "fallback": "fb"}, **END})
    call = await _call(flow, ["5"])
    assert call.result.last_step == "fb"
    assert call.channel.sounds == ["tts/p", "tts/fallback"]


async def test_menu_without_barge_in_reads_keys_only_after_the_prompt() -> None:
    flow = _flow(
        "m", {"m": {"type": "menu", "say": "p", "barge_in": False, "choices": {1: "ok"}, "fallback": "fb"}, **END}
    )
    channel_keys: Keys = ["1"]
    call = await _call(flow, channel_keys)
    assert call.result.last_step == "ok"
    assert call.channel.operations[:3] == [("answer",), ("play", "tts/p"), ("read_digits", "1")]


async def test_menu_without_barge_in_leaves_the_script_during_the_prompt() -> None:
    flow = _flow(
        "m", {"m": {"type": "menu", "say": "p", "barge_in": False, "choices": {1: "ok"}, "fallback": "fb"}, **END}
    )
    call = await _call(flow, ["12"])  # two keys at once: read_digits takes only the first of them
    assert call.result.last_step == "ok"
    assert ("read_digits", "1") in call.channel.operations


async def test_menu_script_exhausted_is_caller_hangup_at_the_menu() -> None:
    call = await _call(MENU, ["7"])
    assert call.result.outcome == "caller_hangup"
    assert call.result.last_step == "m"
    assert call.steps == []


# -- collect --------------------------------------------------------------------------------------


def _collect(**fields: Any) -> Flow:
    node = {
        "type": "collect",
        "say": "enter",
        "var": "code",
        "invalid": {"say": "bad"},
        "no_input": {"say": "nothing"},
        "next": "ok",
        "fallback": "fb",
        **fields,
    }
    return _flow("c", {"c": node, **END})


async def test_collect_valid_sensitive_sets_the_variable_and_records_only_valid() -> None:
    call = await _call(_collect(min_digits=4, max_digits=4), ["1985"])
    assert call.result.last_step == "ok"
    assert call.result.variables["code"] == "1985"
    assert _step(call, "c") == Step("test", "c", "collect", "next", "valid")


async def test_collect_not_sensitive_records_the_digits() -> None:
    call = await _call(_collect(sensitive=False), ["42#"])
    assert _step(call, "c") == Step("test", "c", "collect", "next", "42")
    assert call.result.variables["code"] == "42"


async def test_collect_barge_in_key_is_the_first_digit() -> None:
    call = await _call(_collect(), ["123#"])
    assert call.result.variables["code"] == "123"
    # the first key interrupted the prompt; the rest came from read_digits, which was asked for one less
    assert ("read_digits", "15") in call.channel.operations


async def test_collect_terminator_ends_the_input() -> None:
    call = await _call(_collect(terminator="*", sensitive=False), ["12*34"])
    assert call.result.variables["code"] == "12"


async def test_collect_without_terminator_treats_hash_as_a_digit() -> None:
    call = await _call(_collect(terminator=None, max_digits=3, sensitive=False), ["1#2"])
    assert call.result.variables["code"] == "1#2"


async def test_collect_max_digits_truncates_and_min_digits_rejects() -> None:
    long = await _call(_collect(max_digits=3, sensitive=False), ["12345"])
    assert long.result.variables["code"] == "123"
    short = await _call(_collect(min_digits=3, retries=0), ["12#"])
    assert short.result.last_step == "fb"
    assert "code" not in short.result.variables
    assert _step(short, "c") == Step("test", "c", "collect", "fallback", "invalid")


async def test_collect_only_terminator_counts_as_no_input() -> None:
    call = await _call(_collect(retries=0), ["#"])
    assert _step(call, "c").input == "no_input"


async def test_collect_single_digit_by_barge_in_leaves_the_next_key_alone() -> None:
    flow = _flow(
        "c",
        {
            "c": {
                "type": "collect",
                "say": "day",
                "var": "day",
                "max_digits": 1,
                "terminator": None,
                "next": "m",
                "fallback": "fb",
            },
            "m": {"type": "menu", "say": "slot", "choices": {1: "ok"}, "fallback": "fb"},
            **END,
        },
    )
    call = await _call(flow, ["3", "1"])
    assert call.result.last_step == "ok"
    assert call.result.variables["day"] == "3"


async def test_collect_pattern_invalid_then_valid() -> None:
    call = await _call(_collect(pattern="(19|20)[0-9]{2}", min_digits=4, max_digits=4), ["1850", "1985"])
    assert call.result.last_step == "ok"
    assert call.result.variables["code"] == "1985"
    assert call.channel.sounds == ["tts/enter", "tts/bad", "tts/enter", "tts/ok"]


async def test_collect_retries_exhausted_take_fallback_without_setting_the_variable() -> None:
    call = await _call(_collect(pattern="[1-7]", max_digits=1, retries=1), ["9", None])
    assert call.result.last_step == "fb"
    assert "code" not in call.result.variables
    assert _step(call, "c").input == "no_input"
    assert call.channel.sounds == ["tts/enter", "tts/bad", "tts/enter", "tts/fallback"]


async def test_sensitive_digits_never_appear_in_any_step() -> None:
    flow = _flow(
        "c",
        {
            "c": {
                "type": "collect",
                "say": "year",
                "var": "year",
                "min_digits": 4,
                "max_digits": 4,
                "pattern": "19[0-9]{2}",
                "next": "again",
                "fallback": "fb",
            },
            "again": {"type": "collect", "say": "id", "var": "idno", "next": "ok", "fallback": "fb"},
            **END,
        },
    )
    call = await _call(flow, ["2077", "1961", "4401#"])
    assert call.result.variables == {"year": "1961", "idno": "4401"}
    for step in call.steps:
        for value in (step.edge, step.input):
            assert value is None or not any(secret in value for secret in ("2077", "1961", "4401"))
    assert not any("1961" in part for op in call.channel.operations for part in op)


# -- confirm --------------------------------------------------------------------------------------

CONFIRM = _flow(
    "k",
    {"k": {"type": "confirm", "say": "sure", "invalid": {"say": "bad"}, "next": "ok", "fallback": "fb"}, **END},
)


async def test_confirm_digit_goes_next() -> None:
    call = await _call(CONFIRM, ["1"])
    assert _step(call, "k") == Step("test", "k", "confirm", "confirmed", "1")
    assert call.result.last_step == "ok"


async def test_confirm_repeat_replays_the_prompt_without_counting_as_a_retry() -> None:
    call = await _call(CONFIRM, ["2", "2", "2", "1"])  # more repeats than retries (2)
    assert call.result.last_step == "ok"
    assert call.channel.sounds == ["tts/sure"] * 4 + ["tts/ok"]


async def test_confirm_repeats_beyond_max_repeats_count_as_invalid() -> None:
    call = await _call(CONFIRM, ["2"] * (MAX_REPEATS + 3))
    assert call.result.last_step == "fb"
    assert _step(call, "k").input == "invalid"
    # MAX_REPEATS free replays, then three invalid attempts (1 + retries), with two invalid prompts between
    assert call.channel.sounds.count("tts/sure") == MAX_REPEATS + 3
    assert call.channel.sounds.count("tts/bad") == 2


async def test_confirm_other_key_is_invalid_then_fallback() -> None:
    call = await _call(CONFIRM, ["5", "1"])
    assert call.result.last_step == "ok"
    assert call.channel.sounds == ["tts/sure", "tts/bad", "tts/sure", "tts/ok"]
    fallback = await _call(CONFIRM, ["5", "6", None])
    assert _step(fallback, "k") == Step("test", "k", "confirm", "fallback", "no_input")


async def test_confirm_custom_digits() -> None:
    flow = _flow(
        "k",
        {
            "k": {
                "type": "confirm",
                "say": "s",
                "confirm_digit": "#",
                "repeat_digit": "*",
                "next": "ok",
                "fallback": "fb",
            },
            **END,
        },
    )
    call = await _call(flow, ["*", "1", "#"])
    assert call.result.last_step == "ok"
    assert _step(call, "k").input == "#"


# -- listen ---------------------------------------------------------------------------------------

LISTEN = _flow(
    "l",
    {
        "l": {
            "type": "listen",
            "say": "speak",
            "no_input": {"say": "nothing heard"},
            "invalid": {"say": "bad key"},
            "categories": {"emergency": "er", "medication": "med"},
            "choices": {0: "er", 2: "med"},
            "default": "dflt",
            "fallback": "fb",
        },
        "er": {"type": "route", "category": "emergency"},
        "med": {"type": "route", "category": "medication"},
        "dflt": {"type": "route", "category": "general"},
        "fb": {"type": "hangup", "say": "fallback"},
    },
)


async def test_listen_without_recognizer_falls_back_without_playing() -> None:
    call = await _call(LISTEN, ["0"])
    assert call.result.last_step == "fb"
    assert _step(call, "l") == Step("test", "l", "listen", "fallback", "speech unavailable")
    assert call.channel.sounds == ["tts/fallback"]
    assert call.channel.keys == ["0"]


async def test_listen_unavailable_scripted_recognizer_is_like_none() -> None:
    call = await _call(LISTEN, recognizer=ScriptedRecognizer([Recognition("x", "medication")], available=False))
    assert call.result.last_step == "fb"


async def test_listen_emergency_speech_takes_the_category_edge_with_emergency_priority() -> None:
    heard = Recognition("胸口很痛，喘不上气", "emergency", emergency=True, matched=("胸痛",))
    call = await _call(LISTEN, recognizer=ScriptedRecognizer([heard]))
    assert call.result.outcome == "routed"
    assert call.result.route == RouteDecision("emergency", "emergency", "er")
    assert call.result.variables == {"transcript": "胸口很痛，喘不上气", "priority": "emergency"}
    assert _step(call, "l") == Step("test", "l", "listen", "heard emergency", "emergency: 胸痛")


class LossyChannel(InMemoryCallChannel):
    """A call whose listening tap loses audio (AudioLossReport): ``lose`` frames per recognition."""

    def __init__(self, before: AudioLosses) -> None:
        super().__init__()
        self.losses = before

    def audio_losses(self) -> AudioLosses:
        return self.losses


@dataclass
class LosingRecognizer:
    """Hears ``heard`` while the tap loses ``gaps`` frames to the network and ``overflow`` to a full queue."""

    heard: Recognition | None
    gaps: int
    overflow: int
    available: bool = True

    def available_for(self, channel: CallChannel) -> bool:
        return True

    def admit(self, channel: CallChannel) -> Any:
        return contextlib.nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        assert isinstance(channel, LossyChannel)
        channel.losses += AudioLosses(gaps=self.gaps, overflow=self.overflow, duplicates=5)
        return self.heard


async def test_listen_step_notes_the_audio_frames_the_recognizer_never_got() -> None:
    # Losses of an earlier listen node of the same call are not this node's: only the difference is noted.
    channel = LossyChannel(AudioLosses(gaps=7))
    heard = Recognition("胸口很痛，喘不上气", "emergency", emergency=True, matched=("胸痛",))
    call = await _call(LISTEN, recognizer=LosingRecognizer(heard, gaps=2, overflow=3), channel=channel)
    assert _step(call, "l") == Step("test", "l", "listen", "heard emergency", "emergency: 胸痛; rtp dropped 5")


async def test_listen_drop_note_keeps_whole_when_the_input_is_long_or_empty() -> None:
    long = Recognition("x", "emergency", emergency=True, matched=tuple(f"术语{i}" for i in range(40)))
    call = await _call(
        LISTEN, recognizer=LosingRecognizer(long, gaps=12, overflow=0), channel=LossyChannel(AudioLosses())
    )
    note = _step(call, "l").input
    assert note is not None
    assert len(note) <= 64
    assert note.startswith("emergency: 术语0,")
    assert note.endswith("; rtp dropped 12")
    # Duplicates lose no audio: no note.
    call = await _call(
        LISTEN, recognizer=LosingRecognizer(long, gaps=0, overflow=0), channel=LossyChannel(AudioLosses())
    )
    assert "rtp" not in (_step(call, "l").input or "")


async def test_listen_transcript_goes_to_the_named_variable() -> None:
    flow = _flow(
        "l",
        {
            "l": {
                "type": "listen",
                "var": "said",
                "categories": {"medication": "ok"},
                "default": "fb",
                "fallback": "fb",
            },
            **END,
        },
    )
    call = await _call(flow, recognizer=ScriptedRecognizer([Recognition("药怎么吃", "medication")]))
    assert call.result.variables == {"said": "药怎么吃"}
    assert "priority" not in call.result.variables
    assert call.channel.sounds == ["tts/ok"]  # a listen node without prompt plays nothing


@pytest.mark.parametrize("category", ["diagnosis", None])
async def test_listen_unknown_category_takes_default(category: str | None) -> None:
    call = await _call(LISTEN, recognizer=ScriptedRecognizer([Recognition("嗯", category)]))
    assert call.result.last_step == "dflt"
    assert _step(call, "l") == Step("test", "l", "listen", "default", f"{category or 'unclassified'}: ")
    assert call.result.variables["transcript"] == "嗯"


async def test_listen_silence_retries_then_falls_back() -> None:
    call = await _call(LISTEN, recognizer=ScriptedRecognizer([None, Recognition("", "medication"), None]))
    assert call.result.last_step == "fb"
    assert _step(call, "l") == Step("test", "l", "listen", "fallback", "no_input")
    assert call.channel.sounds == [
        "tts/speak",
        "tts/nothing heard",
        "tts/speak",
        "tts/nothing heard",
        "tts/speak",
        "tts/fallback",
    ]


async def test_listen_silence_then_speech_within_retries() -> None:
    call = await _call(LISTEN, recognizer=ScriptedRecognizer([None, Recognition("用药", "medication")]))
    assert call.result.route == RouteDecision("medication", "normal", "med")


async def test_listen_key_in_choices_takes_that_edge_without_listening() -> None:
    recognizer = ScriptedRecognizer([Recognition("用药", "medication")])
    call = await _call(LISTEN, ["0"], recognizer=recognizer)
    assert call.result.route == RouteDecision("emergency", "emergency", "er")
    assert _step(call, "l") == Step("test", "l", "listen", "press 0", "0")
    assert len(recognizer.results) == 1  # the recognizer was not asked


async def test_listen_key_not_in_choices_is_invalid() -> None:
    call = await _call(LISTEN, ["7", "2"], recognizer=ScriptedRecognizer([]))
    assert call.result.last_step == "med"
    assert call.channel.sounds[:3] == ["tts/speak", "tts/bad key", "tts/speak"]


# -- branch and set -------------------------------------------------------------------------------


def _branch(when: dict[str, Any], preset: dict[str, str] | None = None, **extra: Any) -> Flow:
    nodes: dict[str, dict[str, Any]] = {
        "b": {"type": "branch", "cases": [{"when": when, "next": "ok"}], "default": "fb"},
        **END,
    }
    start = "b"
    if preset:
        nodes["s"] = {"type": "set", "vars": preset, "next": "b"}
        start = "s"
    return _flow(start, nodes, **extra)


async def _branch_taken(when: dict[str, Any], preset: dict[str, str] | None = None, **extra: Any) -> bool:
    now = extra.pop("now", IN_HOURS)
    call = await _call(_branch(when, preset, **extra), now=now)
    assert call.result.last_step in ("ok", "fb")
    return call.result.last_step == "ok"


@pytest.mark.parametrize(
    ("when", "preset", "taken"),
    [
        ({"var": "lang", "equals": "zh"}, {"lang": "zh"}, True),
        ({"var": "lang", "equals": "zh"}, {"lang": "en"}, False),
        ({"var": "lang", "equals": "zh"}, None, False),
        ({"var": "lang", "one_of": ["zh", "yue"]}, {"lang": "yue"}, True),
        ({"var": "lang", "one_of": ["zh", "yue"]}, {"lang": "en"}, False),
        ({"var": "code", "matches": "[0-9]{3}"}, {"code": "123"}, True),
        ({"var": "code", "matches": "[0-9]{3}"}, {"code": "1234"}, False),  # a full match, not a search
        ({"var": "code", "matches": ".*"}, None, False),
        ({"var": "code", "is_set": True}, {"code": "1"}, True),
        ({"var": "code", "is_set": True}, None, False),
        ({"var": "code", "is_set": False}, None, True),
        ({"not": {"var": "code", "is_set": True}}, {"code": "1"}, False),
        ({"all": [{"var": "a", "equals": "1"}, {"var": "b", "equals": "2"}]}, {"a": "1", "b": "2"}, True),
        ({"all": [{"var": "a", "equals": "1"}, {"var": "b", "equals": "2"}]}, {"a": "1", "b": "3"}, False),
        ({"any": [{"var": "a", "equals": "1"}, {"var": "b", "equals": "2"}]}, {"a": "0", "b": "2"}, True),
        ({"any": [{"var": "a", "equals": "1"}, {"var": "b", "equals": "2"}]}, {"a": "0", "b": "0"}, False),
        (
            {"not": {"any": [{"var": "a", "equals": "1"}, {"all": [{"var": "b", "is_set": False}]}]}},
            {"a": "2", "b": "x"},
            True,
        ),
    ],
)
async def test_branch_var_conditions(when: dict[str, Any], preset: dict[str, str] | None, taken: bool) -> None:
    assert await _branch_taken(when, preset) is taken


async def test_branch_first_matching_case_wins_and_steps_name_the_case() -> None:
    flow = _flow(
        "s",
        {
            "s": {"type": "set", "vars": {"n": 2}, "next": "b"},
            "b": {
                "type": "branch",
                "cases": [
                    {"when": {"var": "n", "equals": "1"}, "next": "fb"},
                    {"when": {"var": "n", "equals": "2"}, "next": "ok"},
                    {"when": {"var": "n", "is_set": True}, "next": "fb"},
                ],
                "default": "fb",
            },
            **END,
        },
    )
    call = await _call(flow)
    assert call.result.variables == {"n": "2"}  # set values are text
    assert [(s.node, s.edge) for s in call.steps] == [("s", "next"), ("b", "case 2"), ("ok", None)]


async def test_set_overwrites_and_plays_no_prompt() -> None:
    flow = _flow(
        "a",
        {
            "a": {"type": "set", "vars": {"x": "1", "y": "keep"}, "next": "b"},
            "b": {"type": "set", "vars": {"x": "2"}, "next": "ok"},
            **END,
        },
    )
    call = await _call(flow)
    assert call.result.variables == {"x": "2", "y": "keep"}
    assert call.channel.sounds == ["tts/ok"]


HOURS = {
    "clinic": {
        "timezone": "Asia/Shanghai",
        "weekly": {"mon-fri": ["08:00-12:00", "13:30-17:30"], "sat": ["08:00-12:00"]},
        "holidays": ["2027-02-08"],
        "workdays": {"2027-02-14": "mon"},
    }
}


@pytest.mark.parametrize(
    ("now", "open_"),
    [
        (datetime(2027, 3, 3, 10, 0, tzinfo=SHANGHAI), True),  # Wednesday morning
        (datetime(2027, 3, 3, 8, 0, tzinfo=SHANGHAI), True),  # opening minute
        (datetime(2027, 3, 3, 12, 30, tzinfo=SHANGHAI), False),  # lunch
        (datetime(2027, 3, 3, 12, 0, tzinfo=SHANGHAI), False),  # a span's end is exclusive
        (datetime(2027, 3, 3, 17, 29, tzinfo=SHANGHAI), True),
        (datetime(2027, 3, 3, 7, 59, tzinfo=SHANGHAI), False),
        (datetime(2027, 3, 6, 11, 0, tzinfo=SHANGHAI), True),  # Saturday morning
        (datetime(2027, 3, 6, 14, 0, tzinfo=SHANGHAI), False),  # Saturday afternoon
        (datetime(2027, 3, 7, 10, 0, tzinfo=SHANGHAI), False),  # Sunday
        (datetime(2027, 2, 8, 10, 0, tzinfo=SHANGHAI), False),  # Monday, but a holiday
        (datetime(2027, 2, 14, 15, 0, tzinfo=SHANGHAI), True),  # Sunday worked as a Monday (调休), afternoon
        (datetime(2027, 3, 3, 1, 30, tzinfo=UTC), True),  # 09:30 in Shanghai
        (datetime(2027, 3, 3, 9, 30, tzinfo=UTC), False),  # 17:30 in Shanghai
        (datetime(2027, 2, 7, 16, 30, tzinfo=UTC), False),  # Sunday UTC, but already the holiday Monday 00:30 there
        (datetime(2027, 2, 8, 0, 30, tzinfo=UTC), False),  # 08:30 on the Shanghai holiday
        (datetime(2027, 2, 14, 0, 30, tzinfo=UTC), True),  # 08:30 on the 调休 Sunday in Shanghai
    ],
)
async def test_branch_open_hours(now: datetime, open_: bool) -> None:
    assert await _branch_taken({"open": "clinic"}, hours=HOURS, now=now) is open_
    assert is_open(Hours.model_validate(HOURS["clinic"]), now) is open_


async def test_branch_open_combined_with_not() -> None:
    lunch = datetime(2027, 3, 3, 12, 30, tzinfo=SHANGHAI)
    assert await _branch_taken({"not": {"open": "clinic"}}, hours=HOURS, now=lunch)


def test_hours_until_midnight_and_other_timezone() -> None:
    hours = Hours.model_validate({"timezone": "Europe/Berlin", "weekly": {"mon-sun": ["20:00-24:00"]}})
    assert is_open(hours, datetime(2027, 3, 3, 22, 59, tzinfo=UTC))  # 23:59 in Berlin
    assert not is_open(hours, datetime(2027, 3, 3, 23, 0, tzinfo=UTC))  # midnight in Berlin
    assert not is_open(hours, datetime(2027, 3, 3, 20, 0, tzinfo=SHANGHAI))  # 13:00 in Berlin


# -- lookup_patient -------------------------------------------------------------------------------

LOOKUP = _flow("p", {"p": {"type": "lookup_patient", "say": "one moment", "found": "ok", "not_found": "fb"}, **END})


async def test_lookup_found_sets_patient_ref() -> None:
    directory = Directory(PatientMatch("pt-0042"))
    call = await _call(LOOKUP, directory=directory)
    assert call.result.last_step == "ok"
    assert call.result.variables == {"patient_ref": "pt-0042"}
    assert _step(call, "p") == Step("test", "p", "lookup_patient", "found", None)
    assert directory.asked == 1
    assert call.channel.sounds == ["tts/one moment", "tts/ok"]


async def test_lookup_not_found() -> None:
    call = await _call(LOOKUP, directory=Directory(None))
    assert call.result.last_step == "fb"
    assert "patient_ref" not in call.result.variables
    assert _step(call, "p").edge == "not found"


async def test_default_runner_has_no_directory_and_no_speech() -> None:
    runner = FlowRunner({}, _sound_for)
    channel = InMemoryCallChannel()
    assert (await runner.run(LOOKUP, channel)).last_step == "fb"
    listen = await FlowRunner({}, _sound_for).run(LISTEN, InMemoryCallChannel())
    assert listen.last_step == "fb"


# -- subflow --------------------------------------------------------------------------------------

MAIN = _flow(
    "intro",
    {
        "intro": {"type": "play", "say": "main", "next": "sub"},
        "sub": {"type": "subflow", "flow": "child", "next": "after"},
        "after": {"type": "route", "category": "general", "say": "back"},
    },
)


def _child(nodes: dict[str, dict[str, Any]], start: str = "c1") -> Flow:
    return _flow(start, nodes, name="child")


async def test_subflow_runs_its_nodes_and_return_continues_at_next() -> None:
    child = _child(
        {
            "c1": {"type": "set", "vars": {"from_child": "yes"}, "next": "c2"},
            "c2": {"type": "play", "say": "child", "next": "c3"},
            "c3": {"type": "return"},
        }
    )
    call = await _call(MAIN, subflows=(child,))
    assert call.result.outcome == "routed"
    assert call.result.last_step == "after"
    assert call.result.variables == {"from_child": "yes"}
    assert call.path == ["intro", "sub", "child:c1", "child:c2", "child:c3", "after"]
    assert call.steps[1] == Step("test", "sub", "subflow", "subflow", "child")
    assert call.channel.sounds == ["tts/main", "tts/child", "tts/back"]


async def test_hangup_inside_subflow_ends_the_call() -> None:
    child = _child({"c1": {"type": "hangup", "say": "bye"}})
    call = await _call(MAIN, subflows=(child,))
    assert call.result == FlowResult("completed", "child:c1")
    assert call.channel.operations[-1] == ("hangup",)
    assert "tts/back" not in call.channel.sounds


async def test_caller_hangup_inside_subflow_reports_subflow_node() -> None:
    child = _child(
        {"c1": {"type": "menu", "say": "m", "choices": {1: "c2"}, "fallback": "c2"}, "c2": {"type": "return"}}
    )
    call = await _call(MAIN, [], subflows=(child,))
    assert call.result.outcome == "caller_hangup"
    assert call.result.last_step == "child:c1"


async def test_route_inside_subflow_reports_subflow_node() -> None:
    child = _child({"c1": {"type": "route", "category": "vaccination"}})
    call = await _call(MAIN, subflows=(child,))
    assert call.result.last_step == "child:c1"
    assert call.result.route == RouteDecision("vaccination", "normal", "c1")


async def test_nested_subflows_return_in_order() -> None:
    child = _child(
        {"c1": {"type": "subflow", "flow": "grandchild", "next": "c2"}, "c2": {"type": "return", "say": "c-back"}}
    )
    grandchild = _flow("g1", {"g1": {"type": "return", "say": "g-back"}}, name="grandchild")
    call = await _call(MAIN, subflows=(child, grandchild))
    assert call.result.last_step == "after"
    assert call.path == ["intro", "sub", "child:c1", "grandchild:g1", "child:c2", "after"]
    assert call.channel.sounds == ["tts/main", "tts/g-back", "tts/c-back", "tts/back"]


async def test_return_in_a_flow_run_on_its_own_completes() -> None:
    call = await _call(_flow("r", {"r": {"type": "return"}}))
    assert call.result == FlowResult("completed", "r")
    assert call.channel.operations[-1] == ("hangup",)


async def test_unknown_subflow_is_an_error_outcome_not_an_exception() -> None:
    call = await _call(MAIN)  # "child" not among the loaded flows
    assert call.result.outcome == "error"
    assert call.result.last_step == "sub"
    assert call.result.error is not None
    assert "child" in call.result.error
    assert call.channel.hung_up


# -- route and transfer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "priority", "expected"),
    [
        ("emergency", None, "emergency"),
        ("general", None, "normal"),
        ("general", "emergency", "emergency"),
        ("emergency", "normal", "normal"),
    ],
)
async def test_route_decision(category: str, priority: str | None, expected: str) -> None:
    node: dict[str, Any] = {"type": "route", "category": category, "say": "connecting"}
    if priority:
        node["priority"] = priority
    call = await _call(_flow("r", {"r": node}))
    assert call.result.outcome == "routed"
    assert call.result.route == RouteDecision(category, expected, "r")
    assert call.steps == [Step("test", "r", "route", category, expected)]
    assert call.channel.operations == [("answer",), ("play", "tts/connecting")]
    assert not call.channel.hung_up  # routing, not the interpreter, decides what happens to the call


@pytest.mark.parametrize(("trunk", "edge"), [(None, "internal"), ("pstn", "pstn")])
async def test_transfer(trunk: str | None, edge: str) -> None:
    node: dict[str, Any] = {"type": "transfer", "to": "+8610123", "file": "custom/transfer"}
    if trunk:
        node["trunk"] = trunk
    call = await _call(_flow("t", {"t": node}))
    assert call.result.outcome == "transferred"
    assert call.result.transfer_to == "+8610123"
    assert call.result.route is None
    assert call.channel.transferred_to == ("+8610123", trunk)
    assert call.channel.sounds == ["custom/transfer"]
    assert call.steps == [Step("test", "t", "transfer", edge, "+8610123")]


# -- the real dialplans ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dialplans() -> dict[str, Flow]:
    return {name: load_flow(DIALPLANS / f"{name}.yaml").flow for name in ("hotline", "vaccination", "followup")}


# The greeting and the scope notice may be interrupted: the first key pressed skips them and is kept as
# type-ahead for the menu, so a caller's keys choose directly.
SKIP_NOTICES: list[str | None] = []


@pytest.mark.parametrize(
    ("keys", "category", "node"),
    [
        (["0"], "emergency", "emergency"),
        (["1", "1"], "appointment", "appointment_route"),
        (["1", "2"], "appointment", "prescription_route"),
        (["2"], "medication", "medication"),
        (["3", "3"], "adverse_reaction", "adverse_reaction"),
        (["3", "7", "8", None], "vaccination", "vaccination_staff"),
        (["4"], "general", "chronic"),
        (["5"], "general", "general"),
        (["9", "2"], "medication", "medication"),
        (["7", "8", None], "general", "general"),
        ([None, None, None], "general", "general"),
    ],
)
async def test_hotline_main_menu(dialplans: dict[str, Flow], keys: list[str | None], category: str, node: str) -> None:
    call = await _call(dialplans["hotline"], SKIP_NOTICES + keys, subflows=(dialplans["vaccination"],), now=IN_HOURS)
    assert call.result.outcome == "routed"
    assert call.result.route is not None
    assert (call.result.route.category, call.result.route.node) == (category, node)
    assert call.result.route.priority == ("emergency" if category == "emergency" else "normal")
    assert call.steps[2] == Step("hotline", "ask", "listen", "fallback", "speech unavailable")
    assert call.channel.keys == []
    assert not call.channel.hung_up


async def test_zero_during_the_greeting_reaches_emergency_without_hearing_the_menu(
    dialplans: dict[str, Flow],
) -> None:
    call = await _call(dialplans["hotline"], ["0"])
    assert call.result.route == RouteDecision("emergency", "emergency", "emergency")
    greeting, emergency = (_sound_for(dialplans["hotline"].nodes[name].say or "") for name in ("greeting", "emergency"))
    assert call.channel.sounds == [greeting, emergency]  # no scope notice, no menu: straight through


async def test_hotline_nine_repeats_the_main_menu(dialplans: dict[str, Flow]) -> None:
    call = await _call(dialplans["hotline"], [*SKIP_NOTICES, "9", "9", "5"])
    assert [s.node for s in call.steps].count("main_menu") == 3
    assert call.result.last_step == "general"


async def test_hotline_invalid_keys_then_silence_fall_back_to_a_person(dialplans: dict[str, Flow]) -> None:
    call = await _call(dialplans["hotline"], [*SKIP_NOTICES, "7", "8", None])
    assert _step(call, "main_menu") == Step("hotline", "main_menu", "menu", "fallback", "no_input")
    assert call.result.route == RouteDecision("general", "normal", "general")


async def test_hotline_appointments_outside_hours_go_back_to_the_menu(dialplans: dict[str, Flow]) -> None:
    sunday = datetime(2027, 3, 7, 10, 0, tzinfo=SHANGHAI)
    call = await _call(dialplans["hotline"], [*SKIP_NOTICES, "1", "2"], now=sunday)
    nodes = [s.node for s in call.steps]
    assert nodes[-4:] == ["appointments", "appointments_closed", "main_menu", "medication"]
    assert _step(call, "appointments").edge == "default"


async def test_hotline_speech_emergency_routes_without_any_key(dialplans: dict[str, Flow]) -> None:
    heard = Recognition("我父亲突然胸痛，喘不上气", "emergency", emergency=True, matched=("胸痛",))
    call = await _call(dialplans["hotline"], None, recognizer=ScriptedRecognizer([heard]))
    assert call.result.route == RouteDecision("emergency", "emergency", "emergency")
    assert call.result.variables["priority"] == "emergency"
    assert call.result.variables["transcript"] == heard.transcript
    assert [s.node for s in call.steps] == ["greeting", "scope_notice", "ask", "emergency"]
    assert not any(op[0] == "read_digits" for op in call.channel.operations)


async def test_hotline_speech_silence_falls_back_to_the_key_menu(dialplans: dict[str, Flow]) -> None:
    call = await _call(dialplans["hotline"], [None, None, "2"], recognizer=ScriptedRecognizer([None, None]))
    assert _step(call, "ask") == Step("hotline", "ask", "listen", "fallback", "no_input")
    assert call.result.last_step == "medication"


async def test_hotline_vaccination_booking_through_the_subflow(dialplans: dict[str, Flow]) -> None:
    # 3 vaccination, 1 booking; the birth year (its first key skips the subflow's intro), 1 book; day 5;
    # 2 afternoon; 2 repeat, 1 confirm
    keys: list[str | None] = [*SKIP_NOTICES, "3", "1", "1956", "1", "5", "2", "2", "1"]
    outreach = MemoryOutreach()
    call = await _call(dialplans["hotline"], keys, subflows=(dialplans["vaccination"],), outreach=outreach)
    assert call.result == FlowResult(
        "completed",
        "goodbye",
        variables={"birth_year": "1956", "vaccination_day": "5", "vaccination_slot": "afternoon"},
    )
    assert "vaccination:confirm_booking" in call.path
    assert outreach.booked == [(5, "afternoon")]


async def test_vaccination_standalone_books_day_and_slot(dialplans: dict[str, Flow]) -> None:
    # the birth year (its first key skips the intro: type-ahead); 1 book; day 3; slot 1 (morning); confirm 1
    outreach = MemoryOutreach()
    call = await _call(dialplans["vaccination"], ["1956", "1", "3", "1", "1"], outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "done"
    assert call.result.variables == {"birth_year": "1956", "vaccination_day": "3", "vaccination_slot": "morning"}
    assert [s.node for s in call.steps] == [
        "identify",
        "intro",
        "identity",
        "verify",
        "choose_service",
        "choose_day",
        "choose_slot",
        "slot_morning",
        "confirm_booking",
        "book",
        "booked",
        "done",
    ]
    assert _step(call, "choose_day").input == "3"  # not sensitive
    assert outreach.booked == [(3, "morning")]


async def test_vaccination_invalid_day_twice_then_silence_is_not_booked(dialplans: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(dialplans["vaccination"], ["1956", "1", "8", "9", None], outreach=outreach)
    assert "vaccination_day" not in call.result.variables
    assert [s.node for s in call.steps][-3:] == ["choose_day", "not_booked", "done"]
    assert outreach.called("book_vaccination") == []


async def test_followup_birth_year_and_readings_never_appear_in_steps(dialplans: dict[str, Flow]) -> None:
    outreach = MemoryOutreach(identity={"birth_year": "1962"})
    call = await _call(dialplans["followup"], ["1899", "1962", "135#", "85#"], outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "thanks"
    assert call.result.variables["birth_year"] == "1962"
    assert _step(call, "identity") == Step("followup", "identity", "collect", "next", "valid")
    assert _step(call, "verify") == Step("followup", "verify", "verify_identity", "verified", None)
    assert _step(call, "systolic").input == "valid"
    assert _step(call, "save") == Step("followup", "save", "save_readings", "normal", None)
    assert outreach.called("save_readings") == [{"systolic": "135", "diastolic": "85"}]
    for step in call.steps:
        for value in ("1962", "1899", "135", "85"):
            assert value not in f"{step.edge}{step.input}"
