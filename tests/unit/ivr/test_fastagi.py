"""FastAGI over a real socket: this test plays Asterisk, with responses as Asterisk 22 sends them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs

from ivr import fastagi
from ivr.fastagi import MAX_HEADER_BYTES, FastAgiCallChannel, read_agi_headers, script_name, start_server
from ivr.flow_model import Flow
from ivr.interpreter import Step, run_flow
from telephony.channel import CallerHungUp, CallerId, CallInfo, ChannelError

CALLER = "13912345678"
HEADERS = (
    "agi_network: yes\n"
    "agi_network_script: hotline\n"
    "agi_request: agi://127.0.0.1:4573/hotline\n"
    "agi_channel: PJSIP/trunk-00000001\n"
    "agi_language: en\n"
    "agi_type: PJSIP\n"
    "agi_uniqueid: 1700000000.1\n"
    "agi_version: 22.0.0\n"
    f"agi_callerid: {CALLER}\n"
    "agi_calleridname: unknown\n"
    "agi_dnid: 12320\n"
    "agi_context: hotline-fastagi\n"
    "agi_extension: s\n"
    "agi_priority: 1\n"
    "\n"
)

Handler = Callable[[FastAgiCallChannel], Awaitable[None]]


class Recorder:
    """A call handler that runs some operations and keeps what each returned or raised."""

    def __init__(self, *steps: Callable[[FastAgiCallChannel], Awaitable[Any]]) -> None:
        self.steps = steps
        self.info: CallInfo | None = None
        self.outcomes: list[Any] = []

    async def __call__(self, channel: FastAgiCallChannel) -> None:
        self.info = channel.info
        for step in self.steps:
            try:
                self.outcomes.append(await step(channel))
            except ChannelError as exc:
                self.outcomes.append(type(exc))


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[int]:
    server = await start_server("127.0.0.1", 0, handler)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _asterisk(port: int, script: Sequence[Sequence[str]], headers: str = HEADERS) -> list[str]:
    """Send the headers, then answer the n-th command with the n-th list of lines; return the commands seen.

    After the script, keep reading commands (answered "200 result=0") until the service closes the socket.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    commands: list[str] = []
    try:
        writer.write(headers.encode())
        responses = iter(script)
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            if not line:
                return commands
            commands.append(line.decode().rstrip("\n"))
            for response in next(responses, ["200 result=0"]):
                writer.write(response.encode() + b"\n")
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def _until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait (at most 5 s) until the service closes the connection; a reset (it closed with our bytes
    unread) counts as closed too."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _answer(ch: FastAgiCallChannel) -> None:
    await ch.answer()


async def _play(ch: FastAgiCallChannel) -> None:
    await ch.play("medhotline/ab12")


async def _hangup(ch: FastAgiCallChannel) -> None:
    await ch.hangup()


async def test_call_info_and_commands_with_recorded_responses() -> None:
    recorder = Recorder(_answer, _play, lambda ch: ch.command("GET VARIABLE X"), _hangup)
    with capture_logs() as logs:
        async with _server(recorder) as port:
            commands = await _asterisk(
                port,
                [
                    ["200 result=0"],
                    ["200 result=0 endpos=1234"],
                    ["100 result=0 Trying...", "200 result=1 (value)"],
                    ["200 result=1"],
                ],
            )
    assert recorder.info == CallInfo(
        channel_id="1700000000.1",
        channel_name="PJSIP/trunk-00000001",
        transport="fastagi",
        flow="hotline",
        dialed="12320",
        caller=CallerId("13912345678"),
    )
    # The caller number is wrapped: it can be handed to the patient lookup but never printed by accident.
    assert "13912345678" not in repr(recorder.info)
    assert commands == ["ANSWER", 'STREAM FILE medhotline/ab12 ""', "GET VARIABLE X", "HANGUP"]
    assert recorder.outcomes[:2] == [None, None]
    assert recorder.outcomes[2]["result"] == ("1", "value")  # the result after "100 Trying", not the 100
    assert CALLER not in repr(logs)


@pytest.mark.parametrize(
    ("response", "label"),
    [
        (["HANGUP", "200 result=-1 endpos=0"], "hangup-notice"),
        (["511 Command Not Permitted on a dead channel or intercepted channel"], "dead-channel"),
    ],
)
async def test_hangup_during_play_is_caller_hung_up(response: list[str], label: str) -> None:
    recorder = Recorder(_answer, _play, _play, _hangup)
    async with _server(recorder) as port:
        commands = await _asterisk(port, [["200 result=0"], response])
    assert recorder.outcomes == [None, CallerHungUp, CallerHungUp, None], label
    # After the hang-up nothing more is sent: no second STREAM FILE, no HANGUP to a dead channel.
    assert commands == ["ANSWER", 'STREAM FILE medhotline/ab12 ""']


async def test_failed_command_is_channel_error_not_hangup() -> None:
    recorder = Recorder(_play, _hangup)
    async with _server(recorder) as port:
        commands = await _asterisk(port, [["510 Invalid or unknown command"], ["200 result=1"]])
    assert recorder.outcomes == [ChannelError, None]
    assert commands[-1] == "HANGUP"  # not a hang-up, so the service still hangs up itself


@pytest.mark.parametrize("partial", [b"", b"200 res"], ids=["no-response", "truncated-line"])
async def test_eof_in_the_middle_of_a_command_is_caller_hung_up(partial: bytes) -> None:
    recorder = Recorder(_play, _hangup)
    async with _server(recorder) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEADERS.encode())
        assert await asyncio.wait_for(reader.readline(), 5) == b'STREAM FILE medhotline/ab12 ""\n'
        writer.write(partial)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # session over, no HANGUP sent
        writer.close()
        await writer.wait_closed()
    assert recorder.outcomes == [CallerHungUp, None]


async def test_run_flow_over_fastagi() -> None:
    flow = Flow.model_validate(
        {
            "flow": "hotline",
            "start": "hello",
            "nodes": {
                "hello": {"type": "play", "file": "custom/hello", "next": "bye"},
                "bye": {"type": "hangup"},
            },
        }
    )
    results = []

    async def handler(channel: FastAgiCallChannel) -> None:
        async def on_step(step: Step) -> None:
            pass

        results.append(await run_flow(flow, channel, str, on_step))

    async with _server(handler) as port:
        commands = await _asterisk(port, [])
    assert commands == ["ANSWER", 'STREAM FILE custom/hello ""', "HANGUP"]
    assert [r.outcome for r in results] == ["completed"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"agi_channel: PJSIP/x\nagi_uniqueid: 1.1\n", "closed before the AGI headers ended", id="eof"),
        pytest.param(b"", "closed before the AGI headers ended", id="port-scan"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "line 1 of the AGI headers", id="garbage"),
        pytest.param(
            b"agi_network: yes\nagi_callerid " + CALLER.encode() + b"\n\n", "line 2 of the AGI headers", id="no-colon"
        ),
        pytest.param(b"agi_network: yes\n\n", "lack agi_channel/agi_uniqueid", id="incomplete"),
        pytest.param(b"agi_x: y\n" * (MAX_HEADER_BYTES // 9 + 1), "exceed", id="too-many-lines"),
        pytest.param(b"agi_x: " + b"y" * 100_000 + b"\n", "exceed", id="one-huge-line"),
    ],
)
async def test_bad_sessions_end_and_are_logged(data: bytes, reason: str) -> None:
    recorder = Recorder()
    with capture_logs() as logs:
        async with _server(recorder) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            writer.write_eof()
            # The service closes its side promptly: it neither spins nor waits for more.
            await _until_closed(reader, writer)
    assert recorder.info is None  # the handler never ran
    assert [e["event"] for e in logs] == ["fastagi.bad_session"]
    assert logs[0]["log_level"] == "warning"
    assert reason in logs[0]["reason"]
    assert CALLER not in repr(logs)


async def test_header_timeout_ends_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastagi, "read_agi_headers", functools.partial(read_agi_headers, limit_seconds=0.2))
    recorder = Recorder()
    with capture_logs() as logs:
        async with _server(recorder) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"agi_channel: PJSIP/x\n")  # ... and then nothing, with the socket left open
            await _until_closed(reader, writer)
    assert [(e["event"], e["reason"]) for e in logs] == [("fastagi.bad_session", "TimeoutError")]


async def test_read_agi_headers_limit_seconds() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"agi_channel: PJSIP/x\n")
    with pytest.raises(TimeoutError):
        await read_agi_headers(reader, limit_seconds=0.05)


@pytest.mark.parametrize(
    ("script", "expected"),
    [("hotline", "hotline"), ("/hotline", "hotline"), ("hotline?x=1", "hotline"), ("", "")],
)
def test_script_name(script: str, expected: str) -> None:
    assert script_name({"agi_network_script": script}) == expected


async def test_port_in_use_is_a_channel_error_naming_the_key() -> None:
    async with _server(Recorder()) as port:
        with pytest.raises(ChannelError, match=rf"127\.0\.0\.1:{port} \(fastagi\.port\)"):
            await start_server("127.0.0.1", port, Recorder())
