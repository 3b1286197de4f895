"""Speech on speech servers: our server with the real Korean model and the client engine, over real sockets on
ephemeral ports; scripted servers for the failures (a close mid-utterance, a hang, a broken reply)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ground.config import ConfigError, SpeechServerConfig, load_config
from keywords.remote_speech import RemoteSettings, RemoteSpeech, RemoteSpeechStream
from keywords.speech import SpeechBusy, SpeechEvent, SpeechModel, SpeechStreamError
from keywords.speech_server import SpeechServer, serving
from keywords.vosk_protocol import EOF_MESSAGE, config_message

RATE = 8000
CHUNK = 320
# Real decoding fed faster than real time on a loaded machine: generous. Scripted servers answer at once: tight.
FAST = RemoteSettings(connect_timeout=1.0, reply_timeout=10.0, retry_after=30.0, chunk_ms=100)
TIGHT = RemoteSettings(connect_timeout=1.0, reply_timeout=0.5, retry_after=30.0, chunk_ms=100)


def servers(*urls: str, capacity: int = 2) -> list[SpeechServerConfig]:
    return [SpeechServerConfig(url=url, capacity=capacity) for url in urls]


async def feed(stream: RemoteSpeechStream, pcm: bytes) -> list[SpeechEvent]:
    events: list[SpeechEvent] = []
    for start in range(0, len(pcm), CHUNK):
        events += await stream.accept(pcm[start : start + CHUNK])
    return events


async def keep_feeding(
    stream: RemoteSpeechStream, chunk_seconds: float, pause: float, times: int, into: list[SpeechEvent] | None = None
) -> None:
    """Feed silence as a caller's line does, pausing between chunks, until the stream raises (or ``times``)."""
    for _ in range(times):
        events = await stream.accept(silence(chunk_seconds))
        if into is not None:
            into += events
        await asyncio.sleep(pause)


def silence(seconds: float) -> bytes:
    return b"\x00\x00" * int(seconds * RATE)


@asynccontextmanager
async def our_servers(model: SpeechModel, count: int) -> AsyncIterator[list[tuple[str, SpeechServer]]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serving(model)) for _ in range(count)]


# -- against our server and the real model -------------------------------------------------------------------------


async def test_a_remote_stream_recognises_what_the_in_process_one_does(model: SpeechModel, speech: bytes) -> None:
    local = model.stream(RATE)
    for start in range(0, len(speech), CHUNK):
        local.accept(speech[start : start + CHUNK])
    expected = local.finish().text
    async with serving(model) as (url, server):
        engine = RemoteSpeech(servers(url), FAST)
        stream = engine.async_stream(RATE, max_seconds=20)
        events = await feed(stream, speech)
        final = await stream.finish()
    assert expected
    assert final == SpeechEvent("final", expected)
    assert events
    assert {e.kind for e in events} == {"partial"}
    assert len({e.text for e in events}) == len(events)  # reported when the partial changes
    assert await stream.finish() is final  # idempotent
    assert await stream.accept(speech[:CHUNK]) == []  # a finished stream ignores late audio
    assert engine.servers[0].in_use == 0
    assert (server.stats.opened, server.stats.active) == (1, 0)


async def test_trailing_silence_gives_the_final_during_accept(model: SpeechModel, speech: bytes) -> None:
    async with serving(model) as (url, _):
        stream = RemoteSpeech(servers(url), FAST).async_stream(RATE)
        events = await feed(stream, speech + silence(1.5))
        for _ in range(50):  # answers come a little after the audio: the line goes on carrying silence
            if any(e.kind == "final" for e in events):
                break
            events += await stream.accept(silence(0.02))
            await asyncio.sleep(0.02)
        await stream.aclose()
    finals = [e for e in events if e.kind == "final"]
    assert finals
    assert finals[0].text


async def test_the_time_limit_finishes_the_stream(model: SpeechModel, speech: bytes) -> None:
    async with serving(model) as (url, _):
        engine = RemoteSpeech(servers(url), FAST)
        stream = engine.async_stream(RATE, max_seconds=1.0)
        events = await feed(stream, speech)
    assert events[-1].kind == "final"
    assert [e for e in events if e.kind == "final"] == [events[-1]]
    assert engine.servers[0].in_use == 0


async def test_no_audio_costs_no_connection(model: SpeechModel) -> None:
    async with serving(model) as (url, server):
        engine = RemoteSpeech(servers(url), FAST)
        stream = engine.async_stream(RATE)
        assert await stream.finish() == SpeechEvent("final", "")
    assert server.stats.opened == 0
    assert engine.servers[0].in_use == 0


async def test_streams_spread_over_the_servers_by_free_capacity_then_busy(model: SpeechModel, speech: bytes) -> None:
    async with our_servers(model, 2) as running:
        engine = RemoteSpeech(servers(*(url for url, _ in running)), FAST)
        streams = [engine.async_stream(RATE) for _ in range(4)]
        assert [s.server_url for s in streams] == [running[0][0], running[1][0]] * 2
        with pytest.raises(SpeechBusy, match="no speech server free: 2 of 2 full, 0 resting"):
            engine.async_stream(RATE)
        await asyncio.gather(*(feed(s, speech[: RATE * 2]) for s in streams))
        assert [server.stats.active for _, server in running] == [2, 2]
        await streams[1].aclose()  # given back at once: the next stream goes where there is room
        assert engine.async_stream(RATE).server_url == running[1][0]
        for stream in streams:
            await stream.aclose()
    assert [(s.in_use, s.streams) for s in engine.servers] == [(0, 2), (1, 3)]


def test_least_loaded_is_by_share_of_capacity() -> None:
    engine = RemoteSpeech(
        [SpeechServerConfig(url="ws://127.0.0.1:1", capacity=3), SpeechServerConfig(url="ws://127.0.0.1:2", capacity=1)]
    )
    picked = [engine.async_stream().server_url[-1] for _ in range(4)]
    # 0/3 vs 0/1: the first (more room); 1/3 vs 0/1: the second; then the first twice.
    assert picked == ["1", "2", "1", "1"]


async def test_an_unreachable_server_is_skipped_and_rested(model: SpeechModel, speech: bytes) -> None:
    now = [100.0]
    async with serving(model) as (url, server):
        dead = "ws://127.0.0.1:9"  # discard: nothing listens there
        engine = RemoteSpeech(servers(dead, url, capacity=1), FAST, clock=lambda: now[0])
        stream = engine.async_stream(RATE)
        assert stream.server_url == dead
        await feed(stream, speech[: RATE * 2])
        assert stream.server_url == url  # moved on before any audio was lost
        assert engine.servers[0].failures == 1
        assert engine.servers[0].in_use == 0
        await stream.aclose()
        assert engine.async_stream(RATE).server_url == url  # the dead one rests ...
        now[0] += 31
        assert engine.async_stream(RATE).server_url == dead  # ... for retry_after seconds
    assert server.stats.opened == 1


async def test_no_reachable_server_is_a_stream_error_with_nothing_heard() -> None:
    engine = RemoteSpeech(servers("ws://127.0.0.1:9"), FAST)
    stream = engine.async_stream(RATE)
    with pytest.raises(SpeechStreamError, match=r"could not be reached .*no speech server free") as caught:
        await feed(stream, silence(0.2))
    assert caught.value.heard == ""
    with pytest.raises(SpeechStreamError):  # it stays failed
        await stream.finish()
    await stream.aclose()
    assert engine.servers[0].in_use == 0


async def test_a_server_stopped_mid_utterance_fails_the_stream_with_what_was_heard(
    model: SpeechModel, speech: bytes
) -> None:
    cut = len(speech) * 2 // 3 // 2 * 2
    async with serving(model) as (url, _):
        engine = RemoteSpeech(servers(url), FAST)
        stream = engine.async_stream(RATE)
        events = await feed(stream, speech[:cut])
        await asyncio.sleep(0.3)  # the last answers arrive
    partials = [e.text for e in events if e.kind == "partial"]
    assert partials
    with pytest.raises(SpeechStreamError, match=r"closed the connection mid-utterance \(code 1001") as caught:
        await feed(stream, speech[cut:])
    assert caught.value.heard.startswith(partials[-1])
    assert caught.value.heard not in str(caught.value)  # clinical text stays out of messages and logs
    assert engine.servers[0].failures == 1
    assert engine.servers[0].in_use == 0
    with pytest.raises(SpeechBusy, match="1 resting"):
        engine.async_stream(RATE)


# -- scripted servers: failures ------------------------------------------------------------------------------------

Script = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    async with serve(script, "127.0.0.1", 0, compression=None) as server:
        yield f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"


def answering(replies: Sequence[str | None]) -> Script:
    """Answer each audio message with the next reply; None: stop answering (hang); the end: drop the TCP
    connection without a close frame, as a killed process does."""

    async def script(ws: ServerConnection) -> None:
        await ws.recv()  # the config
        for reply in replies:
            await ws.recv()
            if reply is None:
                await ws.wait_closed()
                return
            await ws.send(reply)
        await ws.recv()
        ws.transport.abort()

    return script


async def test_a_connection_dropped_mid_utterance_keeps_finals_and_the_partial() -> None:
    replies = ['{"partial": "가슴"}', '{"text": "가슴 이 아파요"}', '{"partial": "숨 이"}']
    async with scripted(answering(replies)) as url:
        engine = RemoteSpeech(servers(url), TIGHT)
        stream = engine.async_stream(RATE)
        events: list[SpeechEvent] = []
        with pytest.raises(SpeechStreamError, match="closed the connection mid-utterance") as caught:
            await keep_feeding(stream, 0.1, 0.02, 50, events)  # 100 ms per accept: one message each
    assert events == [
        SpeechEvent("partial", "가슴"),
        SpeechEvent("final", "가슴 이 아파요"),
        SpeechEvent("partial", "숨 이"),
    ]
    assert caught.value.heard == "가슴 이 아파요 숨 이"
    assert engine.servers[0].in_use == 0


async def test_a_server_that_stops_answering_fails_the_stream_after_reply_timeout() -> None:
    async with scripted(answering(['{"partial": "가슴"}', None])) as url:
        engine = RemoteSpeech(servers(url), TIGHT)
        stream = engine.async_stream(RATE)
        started = asyncio.get_running_loop().time()
        with pytest.raises(SpeechStreamError, match=r"did not answer within 0.5 s") as caught:
            await keep_feeding(stream, 0.02, 0.02, 200)
        waited = asyncio.get_running_loop().time() - started
    assert caught.value.heard == "가슴"
    assert waited < 5  # bounded by reply_timeout, not by the caller's patience
    assert engine.servers[0].in_use == 0


async def test_a_server_that_never_answers_the_end_fails_finish() -> None:
    async with scripted(answering(['{"partial": "가슴"}', None])) as url:
        stream = RemoteSpeech(servers(url), TIGHT).async_stream(RATE)
        await stream.accept(silence(0.1))
        with pytest.raises(SpeechStreamError, match="did not answer") as caught:
            await stream.finish()
    assert caught.value.heard == "가슴"


async def test_a_reply_that_breaks_the_protocol_fails_the_stream() -> None:
    async def binary(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.recv()
        await ws.send(b"\x00\x00")
        await ws.wait_closed()

    async with scripted(binary) as url:
        stream = RemoteSpeech(servers(url), TIGHT).async_stream(RATE)
        with pytest.raises(SpeechStreamError, match="broke the protocol: binary message"):
            await keep_feeding(stream, 0.1, 0.05, 20)


async def test_the_end_is_sent_as_vosk_server_expects_it() -> None:
    seen: list[str | bytes] = []

    async def recorder(ws: ServerConnection) -> None:
        async for message in ws:
            seen.append(message)
            if message == '{"eof" : 1}':  # asr_server.py's exact comparison
                await ws.send('{"text" : "끝"}')
                return
            if isinstance(message, bytes):
                await ws.send('{"partial" : ""}')

    async with scripted(recorder) as url:
        stream = RemoteSpeech(servers(url), FAST).async_stream(RATE)
        await feed(stream, silence(0.25))
        assert await stream.finish() == SpeechEvent("final", "끝")
    assert seen[0] == config_message(RATE)
    assert [len(m) for m in seen[1:-1]] == [1600, 1600, 800]  # 100 ms chunks, the rest before the end
    assert seen[-1] == EOF_MESSAGE


# -- our server refuses what breaks the protocol ------------------------------------------------------------------


async def drain(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


@pytest.mark.parametrize(
    ("messages", "code", "reason"),
    [
        ([b"\x00\x00\x00"], 1007, "not whole 16-bit samples"),
        (["hello"], 1007, "not JSON"),
        ([config_message(RATE), b"\x00\x00" * 80, config_message(16000)], 1008, "config after audio"),
    ],
)
async def test_our_server_closes_a_bad_stream_with_a_code_and_goes_on(
    model: SpeechModel, messages: list[str | bytes], code: int, reason: str
) -> None:
    async with serving(model) as (url, server), connect(url, compression=None) as ws:
        for message in messages:
            await ws.send(message)
        with pytest.raises(ConnectionClosed) as caught:
            await drain(ws)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == code
        assert reason in caught.value.rcvd.reason
        async with connect(url, compression=None) as good:
            await good.send(config_message(RATE))
            await good.send(b"\x00\x00" * 800)
            assert "partial" in json.loads(await good.recv())
            await good.send(EOF_MESSAGE)
            assert json.loads(await good.recv()) == {"text": ""}
    assert server.stats.refused == 1


# -- configuration ---------------------------------------------------------------------------------------------------


def _config_error(tmp_path: Path, speech: str) -> str:
    path = tmp_path / "medhotline.toml"
    path.write_text("[speech]\n" + speech, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    return str(caught.value)


def test_servers_load_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text(
        '[speech]\nengine = "servers"\nreply_timeout = 1.5\n'
        'servers = [{url = "ws://127.0.0.1:2700", capacity = 6}, {url = "wss://10.0.0.2:2700/asr", capacity = 2}]\n',
        encoding="utf-8",
    )
    speech = load_config(path, {}).speech
    assert [(s.url, s.capacity) for s in speech.servers] == [("ws://127.0.0.1:2700", 6), ("wss://10.0.0.2:2700/asr", 2)]
    assert speech.reply_timeout == 1.5


SERVERS = 'engine = "servers"\nservers = '
ONE = "ws://127.0.0.1:2700"


@pytest.mark.parametrize(
    ("speech", "where", "why"),
    [
        ('engine = "servers"\n', "speech", 'engine "servers" needs servers'),
        (f'servers = [{{url = "{ONE}", capacity = 1}}]\n', "speech", 'only used with engine = "servers"'),
        (SERVERS + '[{url = "http://127.0.0.1:2700", capacity = 1}]', "speech.servers.0.url", "not a ws://"),
        (SERVERS + '[{url = "ws://:2700", capacity = 1}]', "speech.servers.0.url", "names no host"),
        (SERVERS + '[{url = "ws://u:p@127.0.0.1:2700", capacity = 1}]', "speech.servers.0.url", "credentials"),
        (SERVERS + '[{url = "ws://127.0.0.1:99999", capacity = 1}]', "speech.servers.0.url", "not a URL"),
        (SERVERS + '[{url = "ws://127.0.0.1:2700/?k=1", capacity = 1}]', "speech.servers.0.url", "query"),
        (SERVERS + f'[{{url = "{ONE}", capacity = 0}}]', "speech.servers.0.capacity", "greater than or equal to 1"),
        (SERVERS + f'[{{url = "{ONE}"}}]', "speech.servers.0.capacity", "required"),
        (SERVERS + f'[{{url = "{ONE}", capacity = 1}}, {{url = "{ONE}", capacity = 2}}]', "speech", "more than once"),
    ],
)
def test_bad_servers_name_the_key_and_why(tmp_path: Path, speech: str, where: str, why: str) -> None:
    message = _config_error(tmp_path, speech)
    assert f": {where}: " in message
    assert why in message
