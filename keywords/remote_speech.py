"""Speech recognition on speech servers: a ``SpeechEngine`` that speaks Vosk's WebSocket protocol.

The servers are ``vosk-server`` instances (a farm on their own hosts) or ``medhotline speech serve``; each is
configured with a capacity, the number of streams it decodes in real time (``python -m benchmarks.asr`` measures
it per core). A new stream goes to the least loaded server (streams in use / capacity) that is not full and not
resting after a failure; when there is none, ``async_stream`` raises ``SpeechBusy`` and the listen node takes its
key-menu fallback at once.

A stream connects on its first audio (a caller who never speaks costs no connection), sends the config, then the
audio in chunks of ``chunk_ms`` without waiting for each answer: a reader takes the answers as they come, so the
caller's audio never waits on the network. A server that can't be reached is skipped for the next one with room.
A server that fails once the stream is under way (it closes the connection, breaks the protocol, or lets an
answer wait longer than ``reply_timeout``) ends the stream with ``SpeechStreamError`` carrying what had been
recognised so far, so its keywords are still spotted; the server then rests ``retry_after`` seconds before it
gets new streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, WebSocketException

from ground.config import SpeechServerConfig
from ground.logs import get_logger
from keywords.speech import SpeechBusy, SpeechEvent, SpeechStreamError, join_cjk
from keywords.vosk_protocol import (
    EOF_MESSAGE,
    ProtocolError,
    ServerReply,
    check_sample_rate,
    config_message,
    parse_server_reply,
)

log = get_logger(__name__)

_BYTES_PER_SAMPLE = 2
# The most audio messages a stream leaves unanswered before it waits for the server: 1 s at the default chunk.
MAX_IN_FLIGHT = 10


@dataclass(frozen=True)
class RemoteSettings:
    connect_timeout: float = 2.0
    reply_timeout: float = 3.0
    retry_after: float = 5.0
    chunk_ms: int = 100


@dataclass
class ServerLoad:
    """One server's state in this process: how many streams it has now, and had in all."""

    url: str
    capacity: int
    in_use: int = 0
    streams: int = 0
    failures: int = 0
    resting_until: float = 0.0


class RemoteSpeech:
    """The engine: spreads streams over the configured servers by their free capacity. One per process."""

    def __init__(
        self,
        servers: Sequence[SpeechServerConfig],
        settings: RemoteSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not servers:
            raise ValueError("RemoteSpeech needs at least one speech server")
        self.settings = settings or RemoteSettings()
        self._clock = clock
        self._servers = [ServerLoad(s.url, s.capacity) for s in servers]

    @property
    def servers(self) -> list[ServerLoad]:
        return list(self._servers)

    def async_stream(self, sample_rate: int = 8000, *, max_seconds: float = 20.0) -> RemoteSpeechStream:
        """A stream on the least loaded server; ``SpeechBusy`` when every server is full or resting."""
        try:
            check_sample_rate(sample_rate)
        except ProtocolError as exc:
            raise SpeechStreamError(str(exc)) from None
        if max_seconds <= 0:
            raise SpeechStreamError(f"max_seconds must be positive, not {max_seconds}")
        return RemoteSpeechStream(self, self.lease(), sample_rate, max_seconds)

    def lease(self, exclude: Sequence[ServerLoad] = ()) -> ServerLoad:
        now = self._clock()
        free = [s for s in self._servers if s.in_use < s.capacity and s.resting_until <= now and s not in exclude]
        if not free:
            full = sum(1 for s in self._servers if s.in_use >= s.capacity)
            resting = sum(1 for s in self._servers if s.resting_until > now)
            raise SpeechBusy(
                f"no speech server free: {full} of {len(self._servers)} full, {resting} resting after a failure"
            )
        # Least loaded first; on a tie the one with more room, then the configured order.
        best = min(free, key=lambda s: (s.in_use / s.capacity, s.in_use - s.capacity))
        best.in_use += 1
        best.streams += 1
        return best

    def release(self, server: ServerLoad) -> None:
        server.in_use -= 1

    def failed(self, server: ServerLoad, reason: str) -> None:
        server.failures += 1
        server.resting_until = self._clock() + self.settings.retry_after
        log.warning("speech.server_failed", server=server.url, reason=reason, rest=self.settings.retry_after)

    def close(self) -> None:
        """Streams close themselves; nothing is held between them."""


class RemoteSpeechStream:
    """One utterance on one server; ``accept`` and ``finish`` as ``AsyncSpeechStream``'s.

    Not safe for two tasks at once (nor is a caller's audio): one ``accept`` or ``finish`` at a time.
    """

    def __init__(self, pool: RemoteSpeech, server: ServerLoad, sample_rate: int, max_seconds: float) -> None:
        self._pool = pool
        self._server: ServerLoad | None = server
        self._url = server.url
        self._settings = pool.settings
        self._sample_rate = sample_rate
        self._max_bytes = int(max_seconds * sample_rate) * _BYTES_PER_SAMPLE
        self._chunk_bytes = max(1, sample_rate * self._settings.chunk_ms // 1000) * _BYTES_PER_SAMPLE
        self._fed = 0
        self._buffer = bytearray()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._unanswered: deque[float] = deque()  # when each unanswered message was sent
        self._progress = asyncio.Event()
        self._events: list[SpeechEvent] = []
        self._finals: list[str] = []
        self._partial = ""
        self._eof_sent = False
        self._eof_text: str | None = None
        self._broken: str | None = None
        self._error: SpeechStreamError | None = None
        self._final: SpeechEvent | None = None

    @property
    def server_url(self) -> str:
        """The server this stream runs on (after a failed connect, the one it moved to)."""
        return self._url

    @property
    def heard(self) -> str:
        """Everything recognised so far: the finished utterances and the one under way."""
        return join_cjk(" ".join(t for t in (*self._finals, self._partial) if t))

    async def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        if len(pcm16) % _BYTES_PER_SAMPLE:
            raise SpeechStreamError(f"PCM chunk of {len(pcm16)} bytes is not whole 16-bit samples")
        if self._final is not None:
            return []
        await self._check()
        chunk = pcm16[: self._max_bytes - self._fed]
        self._fed += len(chunk)
        self._buffer += chunk
        if len(self._buffer) >= self._chunk_bytes:
            await self._send_audio()
        if len(self._unanswered) > MAX_IN_FLIGHT:
            await self._wait(lambda: len(self._unanswered) <= MAX_IN_FLIGHT)
        events, self._events = self._events, []
        if self._fed >= self._max_bytes:
            events.append(await self.finish())
        return events

    async def finish(self) -> SpeechEvent:
        """The final result of the audio not yet finalised; the stream then closes. Idempotent."""
        if self._final is not None:
            return self._final
        await self._check()
        if self._ws is None and not self._buffer:
            text = ""  # no audio, no connection: nothing to ask a server
        else:
            await self._send_audio()
            await self._send(EOF_MESSAGE)
            self._eof_sent = True
            await self._wait(lambda: self._eof_text is not None)
            # Utterances the server finished after the last accept returned belong to this final result.
            unreturned = [e.text for e in self._events if e.kind == "final"]
            text = join_cjk(" ".join(t for t in (*unreturned, self._eof_text or "") if t))
        self._final = SpeechEvent("final", text)
        await self.aclose()
        return self._final

    async def aclose(self) -> None:
        """Give the server back (at once) and close the connection; idempotent, also after a failure."""
        self._give_back()
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(WebSocketException, OSError):
                await ws.close()
        await self._stop_reader()

    # -- internals ---------------------------------------------------------------------------------------------

    def _give_back(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._pool.release(server)

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._broken is not None:
            await self._fail(self._broken)
        if self._unanswered and self._now() - self._unanswered[0] > self._settings.reply_timeout:
            await self._fail(f"did not answer within {self._settings.reply_timeout:g} s")

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _fail(self, reason: str) -> None:
        """The server failed this stream: rest it, drop the connection, and raise with what was heard."""
        server = self._server
        if server is not None:
            self._pool.failed(server, reason)
        self._give_back()
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()  # no closing handshake with a server that just failed: the caller is waiting
        await self._stop_reader()
        self._error = SpeechStreamError(f"speech server {self._url} {reason}", heard=self.heard)
        raise self._error

    async def _connect(self) -> ClientConnection:
        """Open the stream on its server; one that can't be reached is rested and the next free one tried."""
        tried: list[ServerLoad] = []
        while True:
            server = self._server
            assert server is not None  # _check raised before a stream without a server gets here
            try:
                ws = await asyncio.wait_for(
                    connect(
                        server.url,
                        compression=None,
                        open_timeout=None,  # bounded by wait_for, TCP connect included
                        close_timeout=0.5,
                        max_size=2**20,
                    ),
                    self._settings.connect_timeout,
                )
                await ws.send(config_message(self._sample_rate))
            except (OSError, TimeoutError, WebSocketException) as exc:
                reason = f"could not be reached ({type(exc).__name__}: {exc})"[:200]
            else:
                return ws
            self._pool.failed(server, reason)
            self._give_back()
            tried.append(server)
            try:
                self._server = self._pool.lease(exclude=tried)
            except SpeechBusy as busy:
                self._error = SpeechStreamError(f"speech server {self._url} {reason}; {busy}")
                raise self._error from None
            self._url = self._server.url

    async def _send_audio(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        await self._send(data)

    async def _send(self, message: str | bytes) -> None:
        if self._ws is None:
            self._ws = await self._connect()
            self._reader = asyncio.create_task(self._read(self._ws), name=f"speech-reply {self._url}")
        # Counted before it is sent: the answer may be read while ``send`` still waits for the socket to drain.
        self._unanswered.append(self._now())
        try:
            await asyncio.wait_for(self._ws.send(message), self._settings.reply_timeout)
        except TimeoutError:
            await self._fail(f"took no audio for {self._settings.reply_timeout:g} s")
        except ConnectionClosed as exc:
            await self._fail(self._broken or f"closed the connection mid-utterance ({_close_text(exc)})")

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._check()
            oldest = self._unanswered[0] if self._unanswered else self._now()
            left = self._settings.reply_timeout - (self._now() - oldest)
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), max(left, 0.0))

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                self._on_reply(parse_server_reply(message))
                self._progress.set()
            if self._eof_text is None:
                self._broken = f"closed the connection mid-utterance ({_close_text(None, ws)})"
        except ConnectionClosedOK:
            if self._eof_text is None:
                self._broken = f"closed the connection mid-utterance ({_close_text(None, ws)})"
        except ConnectionClosed as exc:
            self._broken = f"closed the connection mid-utterance ({_close_text(exc)})"
        except ProtocolError as exc:
            self._broken = f"broke the protocol: {exc}"
        finally:
            self._progress.set()

    def _on_reply(self, reply: ServerReply) -> None:
        if not self._unanswered:
            raise ProtocolError("a reply to no message")
        self._unanswered.popleft()
        if self._eof_sent and not self._unanswered:
            self._eof_text = reply.text or ""
            return
        if reply.text is not None:
            self._partial = ""
            if reply.text:
                self._finals.append(reply.text)
                self._events.append(SpeechEvent("final", reply.text))
        elif reply.partial and reply.partial != self._partial:
            self._partial = reply.partial
            self._events.append(SpeechEvent("partial", reply.partial))


def _close_text(exc: ConnectionClosed | None, ws: ClientConnection | None = None) -> str:
    frame = exc.rcvd if exc is not None else (ws.close_code if ws is not None else None)
    if frame is None:
        return "no close frame"
    if isinstance(frame, int):
        return f"code {frame}"
    return f"code {frame.code}{': ' + frame.reason if frame.reason else ''}"
