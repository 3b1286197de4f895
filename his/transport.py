"""MLLP over asyncio: the client the hotline talks to the HIS with, and the server that receives from it.

Both use :class:`his.mllp.MllpDecoder` for framing and :mod:`his.hl7` for messages; TLS is the standard library's
``ssl`` (mutual when the server is given a client CA). Library errors (``OSError``, ``ssl.SSLError``, timeouts) are
mapped here to :class:`HisUnavailable`, :class:`HisTimeout` and :class:`HisReplyError`.

Client. One request in flight per connection (HL7 original mode pairs a reply with the request before it), so
requests are serialised by a lock; a request that times out drops the connection, because a late reply would be
taken for the next request's. After a failed connect the client refuses at once until its backoff has passed
(doubling up to ``backoff_max``): while the HIS is down a caller waiting for an identity is told so in
microseconds instead of each paying a connect timeout.

Server. Every frame gets exactly one answer: the handler's reply, an AR naming the segment and field when the
message breaks the receiver's rules (or the frame was oversize), or an AE ("application internal error") when the
handler fails. Nothing a peer sends ends the server or another connection; a connection ends when its peer
closes it, after ``idle_timeout`` without a byte, or when the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from ground.errors import MedhotlineError
from ground.logs import get_logger
from his.hl7 import APPLICATION_INTERNAL_ERROR, Hl7Error, Message, Party, parse
from his.messages import build_ack, build_reject
from his.mllp import DEFAULT_MAX_SIZE, Frame, FramingError, MllpDecoder, encode_frame

log = get_logger("medhotline.his.transport")

_READ_CHUNK: Final = 65536


class HisError(MedhotlineError):
    """Talking to the HIS failed; the message says how (never what the message held)."""


class HisUnavailable(HisError):
    """No connection to the HIS (refused, reset, TLS failure, or waiting out the reconnect backoff)."""


class HisTimeout(HisError):
    """The HIS did not answer within the timeout; the connection was dropped."""


class HisReplyError(HisError):
    """The HIS answered with something that is not a usable HL7 message."""


# --- TLS -------------------------------------------------------------------------------------------------------


def client_tls(ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` only; with a certificate and key it can do mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return context


def server_tls(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A server context; with ``client_ca_file`` every client must present a certificate it signed (mutual)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    if client_ca_file is not None:
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# --- client ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial`` seconds after the first failure, doubling up to ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self.maximum, self.initial * 2 ** (failures - 1))


DEFAULT_BACKOFF: Final = Backoff()


class MllpClient:
    """A connection to one HIS endpoint, opened on first use and again after it broke (with backoff)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        connect_timeout: float = 2.0,
        reply_timeout: float = 10.0,
        max_size: int = DEFAULT_MAX_SIZE,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._server_name = server_name
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._max_size = max_size
        self._backoff = backoff
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = MllpDecoder(max_size)
        self._pending: list[Frame] = []
        self._failures = 0
        self._retry_at = 0.0

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` and return the reply frame, parsed; HisError subclasses on failure."""
        payload = encode_frame(message.encode())
        async with self._lock:
            reader, writer = await self._connection()
            try:
                writer.write(payload)
                async with asyncio.timeout(timeout if timeout is not None else self._reply_timeout):
                    await writer.drain()
                    frame = await self._read_frame(reader)
            except TimeoutError:
                await self._drop()
                raise HisTimeout(f"no reply to {message.type} within the timeout; connection dropped") from None
            except (OSError, EOFError, ssl.SSLError) as exc:
                await self._drop()
                self._failed()
                raise HisUnavailable(f"connection to the HIS lost while sending {message.type}: {_why(exc)}") from None
            except asyncio.CancelledError:
                # The caller gave up (a PDQ over its budget): the reply may still come, on this connection, and
                # would be taken for the next request's. Close it now, without awaiting anything more.
                self._drop_now()
                raise
        try:
            return parse(frame.payload)
        except Hl7Error as exc:
            raise HisReplyError(f"the HIS's reply to {message.type} is not valid HL7: {exc}") from None

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None and not self._writer.is_closing():
            return self._reader, self._writer
        loop = asyncio.get_running_loop()
        wait = self._retry_at - loop.time()
        if wait > 0:
            raise HisUnavailable(f"the HIS is unreachable; next connection attempt in {wait:.1f} s")
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=(self._server_name or self._host) if self._tls else None,
                    limit=self._max_size,
                )
        except TimeoutError:
            self._failed()
            raise HisUnavailable("connecting to the HIS timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._failed()
            raise HisUnavailable(f"cannot connect to the HIS: {_why(exc)}") from None
        self._failures = 0
        self._reader, self._writer = reader, writer
        self._decoder = MllpDecoder(self._max_size)
        self._pending.clear()
        log.info("his.connected", tls=self._tls is not None)
        return reader, writer

    def _failed(self) -> None:
        self._failures += 1
        delay = self._backoff.delay(self._failures)
        self._retry_at = asyncio.get_running_loop().time() + delay
        log.warning("his.unreachable", failures=self._failures, retry_in=round(delay, 3))

    async def _read_frame(self, reader: asyncio.StreamReader) -> Frame:
        while not self._pending:
            data = await reader.read(_READ_CHUNK)
            events = self._decoder.feed(data) if data else self._decoder.end()
            for event in events:
                if isinstance(event, Frame):
                    self._pending.append(event)
                else:
                    log.warning("his.reply_framing", offset=event.offset, reason=event.reason)
            if not data and not self._pending:
                raise EOFError("the HIS closed the connection")
        return self._pending.pop(0)

    def _drop_now(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        self._pending.clear()
        if writer is not None:
            writer.close()

    async def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        self._pending.clear()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()


def _why(exc: BaseException) -> str:
    """An OS or TLS error in words, without the peer's data (there is none in these errors, only codes)."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


# --- server ----------------------------------------------------------------------------------------------------

Handler = Callable[[Message], Awaitable[Message]]
# Told of every message answered: the message (None when it could not be parsed), the reply sent, and the error
# that made it a NAK. The audit hangs here (his.audit).
Observer = Callable[[Message | None, Message, Hl7Error | None], Awaitable[None]]


class MllpServer:
    """Answers every frame on every connection through ``handler``; see the module docstring for the rules."""

    def __init__(
        self,
        handler: Handler,
        *,
        sender: Party,
        tls: ssl.SSLContext | None = None,
        max_size: int = DEFAULT_MAX_SIZE,
        idle_timeout: float = 300.0,
        observer: Observer | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._handler = handler
        self._sender = sender
        self._tls = tls
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._observer = observer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port (0 picks a free one)."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self._tls, limit=self._max_size)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("his.server_listening", port=bound, tls=self._tls is not None)
        return bound

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        except (OSError, ssl.SSLError, EOFError) as exc:
            log.info("his.connection_lost", reason=_why(exc))
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = MllpDecoder(self._max_size)
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    data = await reader.read(_READ_CHUNK)
            except TimeoutError:
                log.info("his.connection_idle", seconds=self._idle_timeout)
                return
            for event in decoder.feed(data) if data else decoder.end():
                if isinstance(event, FramingError):
                    log.warning("his.framing_error", offset=event.offset, reason=event.reason)
                    if "larger than" in event.reason:
                        oversize = Hl7Error("MSH", f"message larger than {self._max_size} bytes, refused")
                        reject = build_reject("", oversize, sender=self._sender, at=self._clock())
                        await self._send(writer, reject)
                        await self._observe(None, reject, oversize)
                    continue
                reply, message, error = await self._answer(event.payload)
                await self._send(writer, reply)
                await self._observe(message, reply, error)
            if not data:
                return

    async def _send(self, writer: asyncio.StreamWriter, reply: Message) -> None:
        writer.write(encode_frame(reply.encode()))
        await writer.drain()

    async def _answer(self, payload: bytes) -> tuple[Message, Message | None, Hl7Error | None]:
        try:
            message = parse(payload)
        except Hl7Error as exc:
            log.warning("his.message_refused", location=exc.location, reason=exc.reason, code=exc.code)
            return build_reject(_raw_control_id(payload), exc, sender=self._sender, at=self._clock()), None, exc
        try:
            return await self._handler(message), message, None
        except Hl7Error as exc:
            # The message was readable but a field the hotline relies on is not: refused, naming it.
            log.warning("his.message_refused", type=message.type, location=exc.location, reason=exc.reason)
            return build_ack(message, "AR", sender=self._sender, at=self._clock(), error=exc), message, exc
        except Exception as exc:  # noqa: BLE001 (any handler failure becomes an AE; the server must go on)
            # Only the type: an exception's text may quote what the message held.
            log.error("his.handler_failed", type=message.type, error=type(exc).__name__)
            error = Hl7Error("MSH", "application internal error; send again later", APPLICATION_INTERNAL_ERROR)
            return build_ack(message, "AE", sender=self._sender, at=self._clock(), error=error), message, error

    async def _observe(self, message: Message | None, reply: Message, error: Hl7Error | None) -> None:
        if self._observer is None:
            return
        try:
            await self._observer(message, reply, error)
        except Exception as exc:  # noqa: BLE001 (an audit failure is logged; the peer already has its answer)
            log.error("his.observer_failed", error=type(exc).__name__)


def _raw_control_id(payload: bytes) -> str:
    """MSH-10 as far as it can be read from a message that did not parse (for MSA-2 of the NAK), else ""."""
    head = payload.split(b"\r", 1)[0].split(b"\n", 1)[0]
    if not head.startswith(b"MSH") or len(head) < 4:
        return ""
    fields = head.split(head[3:4])
    raw = fields[9] if len(fields) > 9 else b""
    text = raw.decode("utf-8", errors="replace")
    return text if text.isprintable() and len(text) <= 199 else ""
