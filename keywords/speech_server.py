"""A speech server: the in-process Vosk model behind Vosk's WebSocket protocol (``keywords.vosk_protocol``).

For the sandbox, the tests and the demo (``medhotline speech serve``), and a small deployment: it answers exactly
as ``vosk-server``'s ``asr_server.py`` does (one reply per audio message, Vosk's own JSON, the final result after
``{"eof" : 1}`` and then a normal close), so the service's client can't tell the two apart. A production farm
runs ``vosk-server`` itself.

Each connection is one stream with its own recogniser; decoding runs on the model's thread pool, one message of a
stream after another. A message that breaks the protocol closes that connection with a WebSocket close code and a
reason; the server and its other streams go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from keywords.speech import SpeechModel
from keywords.vosk_protocol import (
    CLOSE_POLICY,
    AudioMessage,
    ConfigMessage,
    EofMessage,
    ProtocolError,
    parse_client_message,
)

# The largest audio message taken: 10 s at 48 kHz. vosk-server's clients send 0.1-0.2 s per message.
MAX_MESSAGE_BYTES = 10 * 48000 * 2
_EMPTY_FINAL = '{"text" : ""}'

Report = Callable[[str], None]


def _decode(recognizer: Any, pcm16: bytes) -> str:
    # As asr_server.py's process_chunk: a final result at the end of an utterance, else the partial one.
    if recognizer.AcceptWaveform(pcm16):
        return str(recognizer.Result())
    return str(recognizer.PartialResult())


def _final(recognizer: Any) -> str:
    return str(recognizer.FinalResult())


@dataclass
class SpeechServerStats:
    active: int = 0
    opened: int = 0
    refused: int = 0


class SpeechServer:
    """The connection handler; ``report`` gets one line per stream opened and closed (no audio, no text)."""

    def __init__(self, model: SpeechModel, *, sample_rate: int = 8000, report: Report | None = None) -> None:
        self._model = model
        self._sample_rate = sample_rate
        self._report = report or (lambda line: None)
        self._ids = itertools.count(1)
        self.stats = SpeechServerStats()

    async def handle(self, ws: ServerConnection) -> None:
        number = next(self._ids)
        self.stats.active += 1
        self.stats.opened += 1
        self._report(f"stream {number} opened")
        how = "closed by the client"
        try:
            how = await self._serve(ws)
        except ConnectionClosed:
            how = "connection lost"
        finally:
            self.stats.active -= 1
            self._report(f"stream {number} {how}")

    async def _serve(self, ws: ServerConnection) -> str:
        loop = asyncio.get_running_loop()
        sample_rate = self._sample_rate
        recognizer: Any = None
        async for message in ws:
            try:
                parsed = parse_client_message(message)
                if isinstance(parsed, ConfigMessage) and recognizer is not None:
                    raise ProtocolError("config after audio: the stream's settings are fixed", CLOSE_POLICY)
            except ProtocolError as exc:
                self.stats.refused += 1
                await ws.close(exc.close_code, str(exc)[:120])
                return f"refused: {exc}"
            match parsed:
                case ConfigMessage(sample_rate=rate):
                    sample_rate = rate or sample_rate
                case AudioMessage(pcm16=pcm):
                    if recognizer is None:
                        recognizer = self._model.kaldi_recognizer(sample_rate)
                    await ws.send(await loop.run_in_executor(self._model.executor, _decode, recognizer, pcm))
                case EofMessage():
                    final = _EMPTY_FINAL
                    if recognizer is not None:
                        final = await loop.run_in_executor(self._model.executor, _final, recognizer)
                    await ws.send(final)
                    return "finished"  # returning closes the connection normally (1000), as vosk-server does
        return "closed by the client"


@contextlib.asynccontextmanager
async def serving(
    model: SpeechModel, host: str = "127.0.0.1", port: int = 0, *, report: Report | None = None
) -> AsyncIterator[tuple[str, SpeechServer]]:
    """A running server (``port`` 0: an ephemeral one) and its ``ws://`` URL, until the block ends."""
    handler = SpeechServer(model, report=report)
    # No compression: PCM hardly compresses, and deflate would cost the CPU the recognisers need.
    async with serve(handler.handle, host, port, compression=None, max_size=MAX_MESSAGE_BYTES) as server:
        bound = next(iter(server.sockets)).getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield f"ws://{shown}:{bound[1]}", handler


async def run_until_stopped(model: SpeechModel, host: str, port: int, *, report: Report) -> None:
    """Serve until SIGTERM or SIGINT; ``report`` gets the URL first (``listening on ws://…``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serving(model, host, port, report=report) as (url, _):
        report(f"listening on {url}")
        await stop.wait()
