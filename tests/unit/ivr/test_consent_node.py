"""The ``consent`` node: the exchange, what counts as consent, the recording around it, and the loader's checks.

Driven over the in-memory channel with the shipped fakes of the consent ports (``MemoryRecorder``,
``MemoryConsentSink``); the main flow is the test desk ``tests/data/flows/consent_desk.yaml``.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ground.errors import MedhotlineError
from ivr.flow_loader import FlowError, LoadedFlow, check_paths, load_flow
from ivr.flow_model import ConsentNode, Flow
from ivr.interpreter import FlowResult, FlowRunner, Step
from ivr.memory_channel import InMemoryCallChannel, MemoryConsentSink, MemoryRecorder, Operation
from telephony.channel import CallChannel, ChannelError
from telephony.ports import CallRecorder, ConsentExchange, ConsentSink

REPO = Path(__file__).resolve().parents[3]
DESK = load_flow(REPO / "tests" / "data" / "flows" / "consent_desk.yaml")
NODE = DESK.flow.nodes["consent_remote"]
assert isinstance(NODE, ConsentNode)
TEXT = NODE.text
AGAIN = NODE.confirm_again
NO_INPUT = "没有收到您的按键。"
START = datetime(2027, 3, 3, 2, 0, tzinfo=UTC)
Keys = list[str | None] | None


def _sound_for(text: str) -> str:
    return f"tts/{text}"


def _tts(text: str) -> Operation:
    return ("play", f"tts/{text}")


class Clock:
    """A clock that moves one second on every reading, in a zone that is not UTC (the node must convert)."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def __call__(self) -> datetime:
        return (START + timedelta(seconds=next(self._ticks))).astimezone(timezone(timedelta(hours=8)))


@dataclass
class SnapshotSink(MemoryConsentSink):
    """Also keeps what the channel had done when the consent arrived (to see the recording was stopped)."""

    channel: InMemoryCallChannel | None = None
    seen: list[tuple[list[Operation], set[str]]] = field(default_factory=list)

    async def consent_given(self, exchange: ConsentExchange) -> None:
        assert self.channel is not None
        self.seen.append((list(self.channel.operations), set(self.channel.recording_now)))
        await super().consent_given(exchange)


@dataclass
class Call:
    result: FlowResult
    steps: list[Step]
    channel: InMemoryCallChannel
    sink: ConsentSink | None
    recorder: CallRecorder | None

    @property
    def path(self) -> list[str]:
        return [s.node for s in self.steps]

    @property
    def exchanges(self) -> list[ConsentExchange]:
        assert isinstance(self.sink, MemoryConsentSink)
        return self.sink.exchanges

    def step(self, node: str) -> Step:
        [found] = [s for s in self.steps if s.node == node]
        return found


_DEFAULT: Any = object()


async def _call(
    keys: Keys,
    *,
    flow: Flow = DESK.flow,
    sink: ConsentSink | None = _DEFAULT,
    recorder: CallRecorder | None = _DEFAULT,
    channel: InMemoryCallChannel | None = None,
) -> Call:
    channel = channel or InMemoryCallChannel(keys=keys)
    if sink is _DEFAULT:
        sink = SnapshotSink(channel=channel)
    if recorder is _DEFAULT:
        recorder = MemoryRecorder()
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    runner = FlowRunner(
        {flow.flow: LoadedFlow(flow, Path(f"{flow.flow}.yaml"), "v1")},
        _sound_for,
        on_step,
        now=Clock(),
        consent=sink,
        recorder=recorder,
    )
    with capture_logs():
        result = await asyncio.wait_for(runner.run(flow, channel), timeout=5)
    return Call(result, steps, channel, sink, recorder)


def _desk_variant(**changes: Any) -> Flow:
    """The desk flow with its consent node changed (keys with value None removed)."""
    data = DESK.flow.model_dump(mode="json", by_alias=True, exclude_none=True)
    node = data["nodes"]["consent_remote"]
    for key, value in changes.items():
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return Flow.model_validate(data)


# -- consent given --------------------------------------------------------------------------------------------


async def test_key_twice_gives_consent_once_with_times_texts_and_recording() -> None:
    call = await _call(["1", "1"])
    assert call.result == FlowResult("completed", "bye")
    assert call.path == ["greeting", "consent_remote", "thanks", "bye"]
    assert call.step("consent_remote") == Step("consent_desk", "consent_remote", "consent", "given", "1,1")

    assert isinstance(call.recorder, MemoryRecorder)
    [recording] = call.recorder.started
    assert recording == "consent.consent_desk.consent_remote-1"
    assert call.recorder.stopped == [recording]
    [exchange] = call.exchanges
    assert exchange.flow == "consent_desk"
    assert exchange.node == "consent_remote"
    assert exchange.document == "remote_consultation"
    assert exchange.text == TEXT
    assert exchange.confirm_text == AGAIN
    assert exchange.key == "1"
    assert exchange.recording == recording
    # Readings of the clock: asked (1), first key (2), second key (3); all UTC although the clock is not.
    assert exchange.asked_at == START + timedelta(seconds=0)
    assert exchange.confirmed_at == (START + timedelta(seconds=1), START + timedelta(seconds=2))
    assert all(t.utcoffset() == timedelta(0) for t in (exchange.asked_at, *exchange.confirmed_at))


async def test_recording_wraps_the_exchange_and_is_stopped_before_the_sink_hears_of_it() -> None:
    call = await _call(["1", "1"])
    name = "consent.consent_desk.consent_remote-1"
    assert call.channel.operations == [
        ("answer",),
        _tts("您好，这里是远程会诊预约。"),
        ("start_recording", name),
        _tts(TEXT),
        ("read_digits", "1"),
        _tts(AGAIN),
        ("read_digits", "1"),
        ("stop_recording", name),
        _tts("您的同意已记录。"),
        _tts("再见。"),
        ("hangup",),
    ]
    assert isinstance(call.sink, SnapshotSink)
    [(operations_then, recording_then)] = call.sink.seen
    assert operations_then[-1] == ("stop_recording", name)
    assert recording_then == set()


async def test_a_key_pressed_during_an_earlier_prompt_is_not_taken_as_consent() -> None:
    # The greeting may be skipped with a key (type-ahead); that key must not answer the consent text unheard.
    flow = _desk_variant()
    data = flow.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["nodes"]["greeting"]["barge_in"] = True
    call = await _call(["1", "2"], flow=Flow.model_validate(data))
    assert call.step("consent_remote").edge == "refused"
    assert call.step("consent_remote").input == "2"
    assert call.exchanges == []
    assert _tts(TEXT) in call.channel.operations


async def test_timeout_at_the_confirmation_asks_the_whole_exchange_again() -> None:
    call = await _call(["1", None, "1", "1"])
    assert call.step("consent_remote").edge == "given"
    plays = [op for op in call.channel.operations if op[0] == "play"][1:-2]
    assert plays == [_tts(TEXT), _tts(AGAIN), _tts(NO_INPUT), _tts(TEXT), _tts(AGAIN)]
    [exchange] = call.exchanges
    # The times are those of the round that gave consent: asked at reading 3, confirmed at 4 and 5.
    assert exchange.asked_at == START + timedelta(seconds=2)
    assert exchange.confirmed_at == (START + timedelta(seconds=3), START + timedelta(seconds=4))


async def test_another_key_can_be_configured() -> None:
    flow = _desk_variant(key="9")
    assert (await _call(["9", "9"], flow=flow)).step("consent_remote").edge == "given"
    call = await _call(["1", "1"], flow=flow)
    assert call.step("consent_remote") == Step("consent_desk", "consent_remote", "consent", "refused", "1")
    assert call.exchanges == []


# -- refused ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "recorded", "heard_again"),
    [
        pytest.param(["1", "2"], "1,2", True, id="yes-then-another-key"),
        pytest.param(["1", "#"], "1,#", True, id="yes-then-hash"),
        pytest.param(["2"], "2", False, id="another-key-first"),
        pytest.param(["*"], "*", False, id="star-first"),
    ],
)
async def test_any_other_key_refuses_at_once(keys: list[str | None], recorded: str, heard_again: bool) -> None:
    call = await _call(list(keys))
    assert call.result.outcome == "completed"
    assert call.step("consent_remote") == Step("consent_desk", "consent_remote", "consent", "refused", recorded)
    assert call.path == ["greeting", "consent_remote", "not_given", "bye"]
    assert call.exchanges == []
    assert (_tts(AGAIN) in call.channel.operations) is heard_again
    assert _tts(NO_INPUT) not in call.channel.operations  # a "no" is not asked again
    assert isinstance(call.recorder, MemoryRecorder)
    assert call.recorder.stopped == call.recorder.started != []


async def test_silence_is_asked_again_per_retries_then_refused() -> None:
    call = await _call([None, None])  # the desk allows one retry
    assert call.step("consent_remote") == Step("consent_desk", "consent_remote", "consent", "refused", "no_input")
    plays = [op for op in call.channel.operations if op[0] == "play"]
    assert plays.count(_tts(TEXT)) == 2
    assert plays.count(_tts(NO_INPUT)) == 1
    assert call.exchanges == []
    assert call.channel.recording_now == set()


async def test_without_retries_one_silence_refuses() -> None:
    call = await _call([None], flow=_desk_variant(retries=0, no_input=None))
    assert call.step("consent_remote").input == "no_input"
    assert [op for op in call.channel.operations if op == _tts(TEXT)] == [_tts(TEXT)]


# -- the caller hangs up ------------------------------------------------------------------------------------------


async def test_hang_up_after_the_first_key_stops_the_recording_and_gives_no_consent() -> None:
    call = await _call(["1"])  # the script ends: the caller hangs up while asked to confirm
    assert call.result.outcome == "caller_hangup"
    assert call.result.last_step == "consent_remote"
    assert call.exchanges == []
    assert "consent_remote" not in call.path
    name = "consent.consent_desk.consent_remote-1"
    assert call.channel.recordings == [("start_recording", name), ("stop_recording", name)]
    assert call.channel.recording_now == set()


async def test_hang_up_during_the_consent_text_stops_the_recording() -> None:
    channel = InMemoryCallChannel(keys=["1", "1"], hang_up_at=4)  # answer, greeting, start, text ← hang-up
    call = await _call(None, channel=channel)
    assert call.result.outcome == "caller_hangup"
    assert channel.operations[3] == _tts(TEXT)
    assert [op[0] for op in channel.recordings] == ["start_recording", "stop_recording"]
    assert call.exchanges == []


@dataclass
class BrokenStop(MemoryRecorder):
    """A recorder whose stop fails (e.g. Asterisk answers the stop with HTTP 500)."""

    async def stop(self, channel: CallChannel, name: str) -> None:
        await super().stop(channel, name)
        raise ChannelError("recording stop failed with HTTP 500")


async def test_a_failing_stop_after_a_hang_up_is_logged_and_the_hang_up_is_the_outcome() -> None:
    channel = InMemoryCallChannel(keys=["1"])
    recorder = BrokenStop()
    sink = MemoryConsentSink()
    runner = FlowRunner({}, _sound_for, consent=sink, recorder=recorder)
    with capture_logs() as logs:
        result = await asyncio.wait_for(runner.run(DESK.flow, channel), timeout=5)
    assert result.outcome == "caller_hangup"
    assert [e["event"] for e in logs] == ["consent.recording_stop_failed"]
    assert logs[0]["node"] == "consent_remote"
    assert sink.exchanges == []


# -- what is not configured or fails is an error, never a consent ---------------------------------------------


async def test_without_a_consent_store_the_flow_ends_in_error_naming_flow_and_node() -> None:
    call = await _call(["1", "1"], sink=None)
    assert call.result.outcome == "error"
    assert call.result.last_step == "consent_remote"
    assert call.result.error == (
        "flow 'consent_desk' node 'consent_remote': no consent store configured, so no consent can be taken"
    )
    assert call.channel.recordings == []  # nothing recorded, nothing asked
    assert _tts(TEXT) not in call.channel.operations
    assert call.channel.operations[-1] == ("hangup",)
    assert call.path == ["greeting"]


async def test_a_recorded_consent_without_a_recorder_is_an_error() -> None:
    call = await _call(["1", "1"], recorder=None)
    assert call.result.outcome == "error"
    assert call.result.error is not None
    assert "flow 'consent_desk' node 'consent_remote': no call recorder configured" in call.result.error
    assert call.exchanges == []
    assert _tts(TEXT) not in call.channel.operations


async def test_record_false_takes_consent_without_a_recording() -> None:
    call = await _call(["1", "1"], flow=_desk_variant(record=False), recorder=None)
    assert call.step("consent_remote").edge == "given"
    assert call.channel.recordings == []
    [exchange] = call.exchanges
    assert exchange.recording is None


async def test_record_false_does_not_use_a_configured_recorder() -> None:
    call = await _call(["1", "1"], flow=_desk_variant(record=False))
    assert isinstance(call.recorder, MemoryRecorder)
    assert call.recorder.started == []
    assert call.exchanges[0].recording is None


async def test_a_recorder_that_cannot_start_is_an_error_and_nothing_is_asked() -> None:
    recorder = MemoryRecorder(fail_start=MedhotlineError("recording store is full"))
    call = await _call(["1", "1"], recorder=recorder)
    assert call.result.outcome == "error"
    assert call.result.error == (
        "flow 'consent_desk' node 'consent_remote': the consent exchange can't be recorded: recording store is full"
    )
    assert _tts(TEXT) not in call.channel.operations
    assert call.exchanges == []


async def test_a_channel_that_refuses_to_record_is_an_error() -> None:
    channel = InMemoryCallChannel(keys=["1", "1"], fail_at=3)  # answer, greeting, start_recording ← fails
    call = await _call(None, channel=channel)
    assert call.result.outcome == "error"
    assert call.result.error is not None
    assert "can't be recorded: channel operation failed (scripted)" in call.result.error
    assert call.exchanges == []


async def test_a_stop_that_fails_after_consent_gives_no_consent() -> None:
    call = await _call(["1", "1"], recorder=BrokenStop())
    assert call.result.outcome == "error"
    assert call.result.error == (
        "flow 'consent_desk' node 'consent_remote': the recording could not be stopped: "
        "recording stop failed with HTTP 500"
    )
    assert call.exchanges == []


async def test_a_store_that_refuses_the_consent_is_an_error_after_the_recording_stopped() -> None:
    channel = InMemoryCallChannel(keys=["1", "1"])
    sink = MemoryConsentSink(fail=MedhotlineError("database unavailable"))
    call = await _call(None, channel=channel, sink=sink)
    assert call.result.outcome == "error"
    assert call.result.error == (
        "flow 'consent_desk' node 'consent_remote': the consent was given but could not be stored: database unavailable"
    )
    assert [op[0] for op in channel.recordings] == ["start_recording", "stop_recording"]
    assert "thanks" not in call.path  # the caller is not told the consent was recorded


# -- the flow language ------------------------------------------------------------------------------------------


def test_consent_texts_are_rendered_by_prompts_build() -> None:
    texts = DESK.flow.prompt_texts()
    assert TEXT in texts
    assert AGAIN in texts
    assert NO_INPUT in texts


def test_defaults() -> None:
    node = Flow.model_validate(
        {
            "flow": "t",
            "start": "c",
            "nodes": {
                "c": {
                    "type": "consent",
                    "document": "remote_consultation",
                    "text": "同意请按1。",
                    "confirm_again": "确认请按1。",
                    "next": {"given": "bye", "refused": "bye"},
                },
                "bye": {"type": "hangup"},
            },
        }
    ).nodes["c"]
    assert isinstance(node, ConsentNode)
    assert (node.key, node.record, node.timeout, node.retries, node.barge_in) == ("1", True, 6.0, 2, False)
    assert node.targets() == {"given": "bye", "refused": "bye"}


HEAD = "flow: t\nstart: c\nnodes:\n"
BYE = "  bye:\n    type: hangup\n"


def _consent(**fields: str) -> str:
    base = {
        "type": "consent",
        "document": "remote_consultation",
        "text": "同意请按1。",
        "confirm_again": "确认请按1。",
        "next": "{given: bye, refused: bye}",
    }
    base.update(fields)
    return "  c:\n" + "".join(f"    {k}: {v}\n" for k, v in base.items() if v != "-")


def _problems(path: Path) -> list[str]:
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        pytest.param(
            _consent(document="Remote-Consultation"),
            "6:5: nodes.c.document: document must name a consent form with lower-case letters, digits and _, "
            "starting with a letter, at most 48 characters (got 'Remote-Consultation')",
            id="bad-document",
        ),
        pytest.param(
            _consent(document="d" * 49),
            "6:5: nodes.c.document: document must name a consent form with lower-case letters, digits and _, "
            f"starting with a letter, at most 48 characters (got {'d' * 49!r})",
            id="long-document",
        ),
        pytest.param(
            _consent(next="{refused: bye}"),
            "9:5: nodes.c.next: missing required key `given`",
            id="missing-given",
        ),
        pytest.param(
            _consent(next="-"),
            "4:3: nodes.c: missing required key `next`",
            id="missing-next",
        ),
        pytest.param(
            _consent(key="12"),
            "10:5: nodes.c.key: key must be one key of the phone: 0-9, * or # (got '12')",
            id="two-digit-key",
        ),
        pytest.param(
            _consent(text="-"),
            "4:3: nodes.c: missing required key `text`",
            id="missing-text",
        ),
        pytest.param(
            _consent(say="请听"),
            "4:3: nodes.c: a consent node reads `text` and `confirm_again`; put any other announcement in a play "
            "node before it",
            id="say-on-consent",
        ),
        pytest.param(
            _consent(barge_in="true"),
            "4:3: nodes.c: a consent text is always heard in full: barge_in can't be true on a consent node",
            id="barge-in",
        ),
        pytest.param(
            _consent(fallback="bye"),
            "10:5: nodes.c.fallback: unknown key `fallback`",
            id="fallback-is-not-a-consent-key",
        ),
    ],
)
def test_loader_names_file_line_node_and_field(tmp_path: Path, node: str, expected: str) -> None:
    path = tmp_path / "consent.yaml"
    path.write_text(HEAD + node + BYE, encoding="utf-8")
    assert _problems(path) == [f"{path}:{expected}"]


def test_unknown_targets_of_a_consent_node_are_reported_at_their_key(tmp_path: Path) -> None:
    path = tmp_path / "consent.yaml"
    path.write_text(HEAD + _consent(next="\n      given: nowhere\n      refused: bye") + BYE, encoding="utf-8")
    assert _problems(path) == [f"{path}:10:7: nodes.c.next.given: node 'nowhere' is not defined"]


def test_unknown_targets_are_reported_even_when_the_node_has_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "consent.yaml"
    path.write_text(HEAD + _consent(key="12", next="{given: nowhere, refused: bye}") + BYE, encoding="utf-8")
    problems = _problems(path)
    assert problems == [
        f"{path}:9:12: nodes.c.next.given: node 'nowhere' is not defined",
        f"{path}:10:5: nodes.c.key: key must be one key of the phone: 0-9, * or # (got '12')",
    ]


def test_graph_checks_follow_given_and_refused(tmp_path: Path) -> None:
    # refused leads into a loop of plays that never ends: a dead end the checks must see through the new edges.
    path = tmp_path / "consent.yaml"
    path.write_text(
        HEAD
        + _consent(next="{given: bye, refused: sorry}")
        + "  sorry:\n    type: play\n    say: 抱歉\n    next: again\n"
        + "  again:\n    type: play\n    say: 再说一次\n    next: sorry\n"
        + BYE
        + "  lost:\n    type: hangup\n",
        encoding="utf-8",
    )
    problems = [p.removeprefix(f"{path}:") for p in _problems(path)]
    assert (
        "10:3: nodes.sorry: loop that never waits for the caller: sorry → again → sorry (put a menu, collect, "
        "listen or confirm node in it)" in problems
    )
    assert "20:3: nodes.lost: node 'lost' is unreachable from start 'c'" in problems
    assert not any("nodes.c" in p for p in problems)  # the consent node itself is fine


def test_a_missing_no_input_sound_of_a_consent_node_is_reported(tmp_path: Path) -> None:
    sounds = tmp_path / "sounds"
    (sounds / "custom").mkdir(parents=True)
    (sounds / "custom" / "present.wav").write_bytes(b"RIFF")
    path = tmp_path / "consent.yaml"
    for name, expected in (("present", []), ("missing", ["nodes.c.no_input.file"])):
        path.write_text(HEAD + _consent(no_input=f"{{file: custom/{name}}}") + BYE, encoding="utf-8")
        assert [p.where for p in check_paths([path], sounds)] == expected
