"""When recognition breaks off mid-utterance (a speech server failed) or can't start (every server full), the
shipped hotline gives the caller the key menu with its key prompt, and what had been said is still classified:
an emergency in it is routed as one, anything else is recorded with the key-menu fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve

from ground.config import SpeechServerConfig
from ivr import InMemoryCallChannel
from ivr.flow_loader import load_flow
from ivr.interpreter import FlowResult, FlowRunner, Step
from keywords.lexicon import DEFAULT_LEXICON_DIR
from keywords.recognizer import StreamingRecognizer, registry_classifier
from keywords.registry import LexiconRegistry
from keywords.remote_speech import RemoteSettings, RemoteSpeech
from keywords.speech import SpeechBusy, SpeechEvent, SpeechStreamError

HOTLINE = load_flow(Path(__file__).resolve().parents[3] / "dialplans" / "hotline.yaml")
ASK = f"tts/{HOTLINE.flow.nodes['ask'].say}"
KEY_MENU = f"tts/{HOTLINE.flow.nodes['main_menu'].say}"
MEDICATION = "我想问一下这个药一天吃几次"
EMERGENCY = "我爸胸口疼得厉害喘不上气"


@dataclass
class AudioCall(InMemoryCallChannel):
    """An in-memory call with a line: 20 ms of silence every 20 ms, for as long as the recognizer listens."""

    @asynccontextmanager
    async def caller_audio(self, max_seconds: float = 30.0) -> AsyncIterator[AsyncIterator[bytes]]:
        async def frames() -> AsyncIterator[bytes]:
            for _ in range(int(max_seconds * 50)):
                await asyncio.sleep(0.02)
                yield b"\x00\x00" * 160

        yield frames()


@dataclass
class BreakingStream:
    """Hears ``partials`` one per frame, then breaks as a failed server does, with ``heard``."""

    partials: list[str]
    heard: str
    closed: bool = False

    async def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        if self.partials:
            return [SpeechEvent("partial", self.partials.pop(0))]
        raise SpeechStreamError("speech server ws://127.0.0.1:1 closed the connection mid-utterance", heard=self.heard)

    async def finish(self) -> SpeechEvent:
        raise AssertionError("a broken stream is not finished")

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Engine:
    streams: list[BreakingStream] = field(default_factory=list)
    busy: bool = False

    def async_stream(self, sample_rate: int = 8000, *, max_seconds: float = 20.0) -> BreakingStream:
        if self.busy:
            raise SpeechBusy("no speech server free: 2 of 2 full, 0 resting after a failure")
        return self.streams.pop(0)


def recognizer(engine: Engine | RemoteSpeech) -> StreamingRecognizer:
    lexicon = LexiconRegistry(DEFAULT_LEXICON_DIR)
    lexicon.refresh()
    return StreamingRecognizer(engine, registry_classifier(lexicon))


async def run(engine: Engine | RemoteSpeech) -> tuple[FlowResult, list[Step], AudioCall]:
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    runner = FlowRunner({"hotline": HOTLINE}, lambda text: f"tts/{text}", on_step, recognizer=recognizer(engine))
    channel = AudioCall()
    with capture_logs():
        result = await asyncio.wait_for(runner.run(HOTLINE.flow, channel), timeout=10)
    return result, steps, channel


def ask_step(steps: list[Step]) -> Step:
    [step] = [s for s in steps if s.node == "ask"]
    return step


def after_ask(steps: list[Step]) -> str:
    nodes = [s.node for s in steps]
    return nodes[nodes.index("ask") + 1]


def heard_the_key_menu_right_after_asking(channel: AudioCall) -> bool:
    sounds = channel.sounds
    return sounds[sounds.index(ASK) + 1] == KEY_MENU


async def test_a_break_mid_utterance_gives_the_key_menu_and_records_what_was_spotted() -> None:
    stream = BreakingStream(["我想问一下", "我想问一下这个药"], MEDICATION)
    result, steps, channel = await run(Engine([stream]))
    step = ask_step(steps)
    assert (step.edge, after_ask(steps)) == ("fallback", "main_menu")
    assert step.input is not None
    assert step.input.startswith("speech failed; heard medication: ")
    assert heard_the_key_menu_right_after_asking(channel)
    assert result.variables["transcript"] == MEDICATION
    assert stream.closed


async def test_an_emergency_in_what_was_heard_is_routed_as_one() -> None:
    # The break came with text the partials had not shown yet: it is still spotted.
    result, steps, channel = await run(Engine([BreakingStream(["我爸"], EMERGENCY)]))
    assert ask_step(steps).edge == "heard emergency"
    assert result.route is not None
    assert (result.route.category, result.route.priority) == ("emergency", "emergency")
    assert KEY_MENU not in channel.sounds


async def test_a_break_before_anything_was_heard_is_a_plain_failure() -> None:
    _, steps, channel = await run(Engine([BreakingStream([], "")]))
    step = ask_step(steps)
    assert (step.edge, step.input, after_ask(steps)) == ("fallback", "speech failed", "main_menu")
    assert heard_the_key_menu_right_after_asking(channel)


async def test_every_recognizer_busy_gives_the_key_menu() -> None:
    _, steps, channel = await run(Engine(busy=True))
    step = ask_step(steps)
    assert (step.edge, after_ask(steps)) == ("fallback", "main_menu")
    assert heard_the_key_menu_right_after_asking(channel)


# -- the same through a real socket: a server that sends partials and then drops the connection -----------------


DROPPED = [("我想问一下 这个 药 一天 吃 几 次", "fallback"), ("我 爸 喘 不 上 气", None)]


@pytest.mark.parametrize(("partial", "edge"), DROPPED)
async def test_a_speech_server_dropping_the_call_mid_utterance(partial: str, edge: str | None) -> None:
    async def dies(ws: ServerConnection) -> None:
        await ws.recv()  # config
        for _ in range(2):
            await ws.recv()
            await ws.send('{"partial" : "我 想"}')
        await ws.recv()
        await ws.send(f'{{"partial" : "{partial}"}}')
        await ws.recv()
        ws.transport.abort()

    async with serve(dies, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        engine = RemoteSpeech([SpeechServerConfig(url=url, capacity=2)], RemoteSettings(reply_timeout=2.0))
        _, steps, channel = await run(engine)
    step = ask_step(steps)
    if edge == "fallback":
        assert (step.edge, after_ask(steps)) == ("fallback", "main_menu")
        assert step.input is not None
        assert step.input.startswith("speech failed; heard medication")
        assert heard_the_key_menu_right_after_asking(channel)
    else:  # an emergency term in a partial decides at once, before the server dies
        assert step.edge == "heard emergency"
    assert engine.servers[0].in_use == 0  # given back, also after the early decision
