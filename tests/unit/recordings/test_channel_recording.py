"""Recording part of a call through the ``CallChannel`` port: the ARI snoop + record requests, the FastAGI
MixMonitor commands (over a real socket, answered as Asterisk 22 answers), the in-memory channel, and the
recording-name rules every adapter shares."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from ivr.fastagi import MIXMONITOR_ID_VAR, FastAgiCallChannel
from ivr.flow_loader import load_flow
from ivr.interpreter import FlowRunner
from ivr.memory_channel import InMemoryCallChannel, MemoryConsentSink, MemoryRecorder
from telephony import ari_channel
from telephony.ari_channel import SNOOP_ARG, SNOOP_CHANNEL_PREFIX, AriCallChannel, AriDispatcher
from telephony.ari_client import AriClient, AriError
from telephony.channel import RECORDING_NAME, CallerHungUp, CallInfo, ChannelError, check_recording_name
from tests.unit.ivr.test_fastagi import Recorder, _asterisk, _server

CHANNEL_ID = "1700000000.1"
INFO = CallInfo(channel_id=CHANNEL_ID, channel_name="PJSIP/trunk-00000001", transport="ari", flow="hotline", dialed="")
NAME = "consent.hotline.ask-1"
SNOOP = f"snoop-{NAME}"
REPO = Path(__file__).resolve().parents[3]

# -- recording names ----------------------------------------------------------------------------------------------

BAD_NAMES = ["", "a/b", "../etc", ".hidden", "a..b", "x" * 121, "录音", "a b", "a;b", "a\nb", "a,i(X)"]
GOOD_NAMES = ["a", "consent.hotline.ask-1", "Call_2027-03-03.x", "x" * 120]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_recording_names_are_refused(name: str) -> None:
    with pytest.raises(ChannelError, match=r"recording name .* is invalid"):
        check_recording_name(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_recording_names_pass(name: str) -> None:
    assert check_recording_name(name) == name
    assert RECORDING_NAME.match(name)


# -- in-memory channel --------------------------------------------------------------------------------------------


async def test_memory_channel_records_start_and_stop_among_the_operations() -> None:
    channel = InMemoryCallChannel()
    await channel.start_recording(NAME)
    assert channel.recording_now == {NAME}
    await channel.play("x")
    await channel.stop_recording(NAME)
    await channel.stop_recording(NAME)  # idempotent
    assert channel.operations == [
        ("start_recording", NAME),
        ("play", "x"),
        ("stop_recording", NAME),
        ("stop_recording", NAME),
    ]
    assert channel.recordings == [("start_recording", NAME), ("stop_recording", NAME), ("stop_recording", NAME)]
    assert channel.recording_now == set()


async def test_memory_channel_never_reuses_a_name_and_refuses_bad_names() -> None:
    channel = InMemoryCallChannel()
    await channel.start_recording(NAME)
    await channel.stop_recording(NAME)
    with pytest.raises(ChannelError, match="already exists"):
        await channel.start_recording(NAME)
    for name in ("../x", ""):
        with pytest.raises(ChannelError, match="is invalid"):
            await channel.start_recording(name)
        with pytest.raises(ChannelError, match="is invalid"):
            await channel.stop_recording(name)


async def test_memory_channel_stop_after_hang_up_is_harmless_and_start_is_a_hang_up() -> None:
    channel = InMemoryCallChannel()
    await channel.start_recording(NAME)
    await channel.hangup()
    await channel.stop_recording(NAME)
    assert channel.recording_now == set()
    with pytest.raises(CallerHungUp):
        await channel.start_recording("other")


# -- ARI ------------------------------------------------------------------------------------------------------


Reply = httpx.Response | Callable[[], httpx.Response]


class ScriptedAri:
    """ARI's REST side: for a (method, path) the next scripted response (the last one repeats); 204 otherwise."""

    def __init__(self, script: dict[tuple[str, str], list[httpx.Response]] | None = None) -> None:
        self.script = {key: deque(responses) for key, responses in (script or {}).items()}
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.script.get((request.method, request.url.path.removeprefix("/ari")))
        if not queue:
            return httpx.Response(204)
        return queue.popleft() if len(queue) > 1 else queue[0]

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path.removeprefix("/ari")) for r in self.requests]

    def params(self, index: int) -> dict[str, str]:
        return dict(self.requests[index].url.params)


def _json(status: int, body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(status, json=body)


LIVE = ("GET", f"/recordings/live/{NAME}")
RECORD = ("POST", f"/channels/{SNOOP}/record")
SNOOP_POST = ("POST", f"/channels/{CHANNEL_ID}/snoop")
STOP = ("POST", f"/recordings/live/{NAME}/stop")
DELETE_SNOOP = ("DELETE", f"/channels/{SNOOP}")
RECORDING = _json(200, {"name": NAME, "format": "wav", "state": "recording", "target_uri": f"channel:{SNOOP}"})
QUEUED = _json(200, {"name": NAME, "format": "wav", "state": "queued", "target_uri": f"channel:{SNOOP}"})
NOT_FOUND = _json(404, {"message": "Recording not found"})
NO_CHANNEL = _json(404, {"message": "Channel not found"})


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ari_channel, "_WAIT_PAUSE", 0.0)


@asynccontextmanager
async def _ari(fake: ScriptedAri) -> AsyncIterator[AriCallChannel]:
    client = AriClient("127.0.0.1", 8088, "medhotline", "secret", "medhotline", transport=httpx.MockTransport(fake))
    try:
        yield AriCallChannel(client, INFO)
    finally:
        await client.aclose()


async def test_ari_start_snoops_both_ways_records_the_snoop_and_waits_until_it_records() -> None:
    fake = ScriptedAri({LIVE: [QUEUED, RECORDING]})
    async with _ari(fake) as channel:
        await channel.start_recording(NAME)
    assert fake.calls() == [SNOOP_POST, RECORD, LIVE, LIVE]
    assert fake.params(0) == {
        "spy": "both",
        "whisper": "none",
        "app": "medhotline",
        "appArgs": SNOOP_ARG,
        "snoopId": SNOOP,
    }
    assert fake.params(1) == {
        "name": NAME,
        "format": "wav",
        "ifExists": "fail",
        "beep": "false",
        "terminateOn": "none",
    }


async def test_ari_start_retries_while_the_snoop_channel_is_not_in_stasis_yet() -> None:
    not_yet = _json(409, {"message": "Channel not in Stasis application"})
    fake = ScriptedAri({RECORD: [not_yet, not_yet, _json(201, {"name": NAME})], LIVE: [RECORDING]})
    async with _ari(fake) as channel:
        await channel.start_recording(NAME)
    assert fake.calls() == [SNOOP_POST, RECORD, RECORD, RECORD, LIVE]


@pytest.mark.parametrize(
    ("script", "error", "message"),
    [
        pytest.param(
            {RECORD: [_json(409, {"message": f"Recording '{NAME}' already exists and can not be overwritten"})]},
            AriError,
            "already exists",
            id="name-exists",
        ),
        pytest.param({LIVE: [QUEUED, _json(200, {"state": "failed"})]}, ChannelError, "did not start", id="failed"),
        pytest.param({LIVE: [QUEUED]}, ChannelError, "did not start \\(state 'queued'\\)", id="never-starts"),
        pytest.param({RECORD: [NO_CHANNEL]}, CallerHungUp, "caller hung up", id="snoop-gone"),
    ],
)
async def test_ari_start_that_fails_removes_the_snoop_channel(
    script: dict[tuple[str, str], list[httpx.Response]], error: type[ChannelError], message: str
) -> None:
    fake = ScriptedAri(script)
    async with _ari(fake) as channel:
        with pytest.raises(error, match=message):
            await channel.start_recording(NAME)
    assert fake.calls()[0] == SNOOP_POST
    assert fake.calls()[-1] == DELETE_SNOOP
    assert fake.calls().count(RECORD) == 1  # only "not in Stasis" is retried


async def test_ari_start_on_a_vanished_call_is_a_hang_up_and_creates_nothing() -> None:
    fake = ScriptedAri({SNOOP_POST: [_json(404, {"message": "Channel not found"})]})
    async with _ari(fake) as channel:
        with pytest.raises(CallerHungUp):
            await channel.start_recording(NAME)
        with pytest.raises(CallerHungUp):  # the call is gone: no second snoop attempt
            await channel.start_recording("again")
    assert fake.calls() == [SNOOP_POST]


async def test_ari_stop_waits_until_the_file_is_closed_then_removes_the_snoop_channel() -> None:
    fake = ScriptedAri({LIVE: [RECORDING, RECORDING, NOT_FOUND]})
    async with _ari(fake) as channel:
        await channel.stop_recording(NAME)
    assert fake.calls() == [STOP, LIVE, LIVE, LIVE, DELETE_SNOOP]


async def test_ari_stop_is_idempotent_and_works_after_the_caller_hung_up() -> None:
    gone = {
        STOP: [NOT_FOUND],
        LIVE: [NOT_FOUND],
        DELETE_SNOOP: [_json(404, {"message": "Channel not found"})],
    }
    fake = ScriptedAri(gone)
    async with _ari(fake) as channel:
        channel.deliver({"type": "StasisEnd", "channel": {"id": CHANNEL_ID}})
        with pytest.raises(CallerHungUp):
            await channel.play("x")  # learns of the hang-up
        await channel.stop_recording(NAME)
        await channel.stop_recording(NAME)
    assert fake.calls()[0][1].startswith(f"/channels/{CHANNEL_ID}/play/")
    assert fake.calls()[1:] == [STOP, LIVE, DELETE_SNOOP] * 2


async def test_ari_stop_of_a_recording_that_just_ended_waits_for_it_to_close() -> None:
    fake = ScriptedAri({STOP: [_json(409, {"message": "Recording not in session"})], LIVE: [RECORDING, NOT_FOUND]})
    async with _ari(fake) as channel:
        await channel.stop_recording(NAME)
    assert fake.calls() == [STOP, LIVE, LIVE, DELETE_SNOOP]


async def test_ari_stop_that_never_sees_the_file_closed_logs_and_still_cleans_up() -> None:
    fake = ScriptedAri({LIVE: [RECORDING]})
    async with _ari(fake) as channel:
        with capture_logs() as logs:
            await channel.stop_recording(NAME)
    assert fake.calls()[-1] == DELETE_SNOOP
    assert fake.calls().count(LIVE) == ari_channel._WAIT_ATTEMPTS
    assert logs == [{"event": "ari.recording_still_live", "recording": NAME, "log_level": "warning"}]


async def test_ari_stop_refused_by_asterisk_is_an_error() -> None:
    fake = ScriptedAri({STOP: [_json(500, {"message": "Internal Server Error"})]})
    async with _ari(fake) as channel:
        with pytest.raises(AriError, match="HTTP 500"):
            await channel.stop_recording(NAME)


@pytest.mark.parametrize("name", ["../x", "", "a b"])
async def test_ari_refuses_bad_names_without_asking_asterisk(name: str) -> None:
    fake = ScriptedAri()
    async with _ari(fake) as channel:
        with pytest.raises(ChannelError, match="is invalid"):
            await channel.start_recording(name)
        with pytest.raises(ChannelError, match="is invalid"):
            await channel.stop_recording(name)
    assert fake.calls() == []


def test_snoop_channel_events_are_dropped_without_a_warning() -> None:
    dispatcher = AriDispatcher()
    snoop = {"id": SNOOP, "name": f"{SNOOP_CHANNEL_PREFIX}{CHANNEL_ID}-00000001"}
    with capture_logs() as logs:
        assert not dispatcher.dispatch({"type": "ChannelVarset", "channel": snoop})
        assert not dispatcher.dispatch({"type": "StasisStart", "channel": snoop, "args": [SNOOP_ARG]})
        assert not dispatcher.dispatch({"type": "RecordingFinished", "recording": {"target_uri": f"channel:{SNOOP}"}})
        assert not dispatcher.dispatch({"type": "ChannelVarset", "channel": {"id": "x.2", "name": "PJSIP/x"}})
    assert [e["channel_id"] for e in logs] == ["x.2"]  # a real unknown channel is still reported


# -- FastAGI ------------------------------------------------------------------------------------------------------

MIXMON_ID = "0x7f3c2c01a2b0"
START_COMMANDS = [
    f'SET VARIABLE {MIXMONITOR_ID_VAR} ""',
    f"EXEC MixMonitor ../recording/{NAME}.wav,i({MIXMONITOR_ID_VAR})",
    f"GET VARIABLE {MIXMONITOR_ID_VAR}",
]
START_REPLIES = [["200 result=1"], ["200 result=0"], [f"200 result=1 ({MIXMON_ID})"]]


def _start(name: str = NAME) -> Callable[[FastAgiCallChannel], Awaitable[None]]:
    async def step(channel: FastAgiCallChannel) -> None:
        await channel.start_recording(name)

    return step


def _stop(name: str = NAME) -> Callable[[FastAgiCallChannel], Awaitable[None]]:
    async def step(channel: FastAgiCallChannel) -> None:
        await channel.stop_recording(name)

    return step


async def _play(channel: FastAgiCallChannel) -> None:
    await channel.play("medhotline/ab12")


async def test_fastagi_mixmonitor_into_the_recording_spool_and_stop_by_id() -> None:
    recorder = Recorder(_start(), _play, _stop(), _stop())
    async with _server(recorder) as port:
        commands = await _asterisk(port, [*START_REPLIES, ["200 result=0 endpos=1234"], ["200 result=0"]])
    assert commands == [*START_COMMANDS, 'STREAM FILE medhotline/ab12 ""', f"EXEC StopMixMonitor {MIXMON_ID}"]
    assert recorder.outcomes == [None, None, None, None]  # the second stop sends nothing


async def test_fastagi_mixmonitor_that_did_not_start_is_an_error() -> None:
    recorder = Recorder(_start(), _stop())
    async with _server(recorder) as port:
        commands = await _asterisk(port, [["200 result=1"], ["200 result=0"], ["200 result=0"]])
    assert commands == START_COMMANDS
    assert recorder.outcomes == [ChannelError, None]  # nothing to stop


async def test_fastagi_stop_after_a_hang_up_sends_nothing() -> None:
    recorder = Recorder(_start(), _play, _stop())
    async with _server(recorder) as port:
        commands = await _asterisk(port, [*START_REPLIES, ["HANGUP", "200 result=-1 endpos=0"]])
    assert commands == [*START_COMMANDS, 'STREAM FILE medhotline/ab12 ""']
    assert recorder.outcomes == [None, CallerHungUp, None]


async def test_fastagi_refuses_bad_names_and_a_name_already_running() -> None:
    recorder = Recorder(_start("../x"), _stop("a b"), _start(), _start())
    async with _server(recorder) as port:
        commands = await _asterisk(port, START_REPLIES)
    assert commands == START_COMMANDS
    assert recorder.outcomes == [ChannelError, ChannelError, None, ChannelError]


async def test_consent_desk_over_fastagi_records_around_the_exchange() -> None:
    """The interpreter, the shipped recorder fake and MixMonitor together: the recording starts before the consent
    text and is stopped (file closed) before the consent is handed over."""
    desk = load_flow(REPO / "tests" / "data" / "flows" / "consent_desk.yaml")
    sink = MemoryConsentSink()
    outcomes: list[str] = []

    async def handler(channel: FastAgiCallChannel) -> None:
        runner = FlowRunner({}, lambda text: f"t/{len(text)}", consent=sink, recorder=MemoryRecorder())
        outcomes.append((await runner.run(desk.flow, channel)).outcome)

    name = "consent.consent_desk.consent_remote-1"
    key_1 = ["200 result=49"]  # WAIT FOR DIGIT: the ASCII code of "1"
    async with _server(handler) as port:
        commands = await _asterisk(
            port,
            [
                ["200 result=0"],  # ANSWER
                ["200 result=0 endpos=1"],  # greeting
                ["200 result=1"],  # SET VARIABLE
                ["200 result=0"],  # EXEC MixMonitor
                [f"200 result=1 ({MIXMON_ID})"],  # GET VARIABLE
                ["200 result=0 endpos=1"],  # consent text
                key_1,
                ["200 result=0 endpos=1"],  # confirm again
                key_1,
                ["200 result=0"],  # StopMixMonitor
            ],
        )
    assert outcomes == ["completed"]
    stop = commands.index(f"EXEC StopMixMonitor {MIXMON_ID}")
    start = commands.index(f"EXEC MixMonitor ../recording/{name}.wav,i({MIXMONITOR_ID_VAR})")
    waits = [i for i, c in enumerate(commands) if c.startswith("WAIT FOR DIGIT")]
    assert start < waits[0] < waits[1] < stop
    assert commands[-1] == "HANGUP"
    [exchange] = sink.exchanges
    assert exchange.recording == name
