"""Test tools for telephony faults: an HTTP proxy in front of Asterisk's ARI port that fails chosen REST requests,
and a sniffer that sees the RTP a SIPp phone receives.

The proxy passes the event WebSocket through (a REST failure is not a lost event stream) and, for REST requests
matching a ``Fault``, answers 500, resets the connection, or never answers (the client times out). REST requests
sent over the event WebSocket (``RESTRequest`` messages) are read from the client's frames and matched the same
way, as ``METHOD /ari/uri?query``: a 500 is answered with a ``RESTResponse`` frame, a timeout drops the frame; a
reset has no counterpart there (dropping the socket would lose the event stream, a different fault). It runs on
its own event loop in a thread, so the blocking SIPp phones of the tests can run meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

FaultKind = Literal["timeout", "500", "reset"]


@dataclass
class Fault:
    """Fail the first ``times`` REST requests whose ``METHOD path?query`` matches ``pattern``."""

    pattern: str
    kind: FaultKind
    times: int = 1
    # When each injected failure happened (time.time()).
    at: list[float] = field(default_factory=list)

    def matches(self, request_line: str) -> bool:
        return len(self.at) < self.times and re.search(self.pattern, request_line) is not None


class AriFaultProxy:
    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.upstream_port = 0
        self.requests: list[str] = []
        # The REST requests that came over the event WebSocket (also in ``requests``).
        self.ws_requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ari-fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> AriFaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the ARI fault proxy did not start")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader: asyncio.StreamReader | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                headers = _headers(head)
                if headers.get("upgrade", "").lower() == "websocket":
                    up_writer.write(head)
                    # Asterisk's handshake answer (101) goes through as it is; frames follow it.
                    writer.write(await up_reader.readuntil(b"\r\n\r\n"))
                    await writer.drain()
                    await _pipe_both(reader, writer, up_reader, up_writer, self._client_frame)
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                method, target = request_line.split(" ")[:2]
                line = f"{method} {target}"
                self.requests.append(line)
                fault = next((f for f in self.faults if f.matches(line)), None)
                if fault is not None:
                    fault.at.append(time.time())
                    if fault.kind == "timeout":
                        await reader.read()  # never answer; the client gives up and closes
                        return
                    if fault.kind == "reset":
                        return
                    payload = b'{"message": "injected fault"}'
                    writer.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                        + payload
                    )
                    await writer.drain()
                    continue
                up_writer.write(head + body)
                await up_writer.drain()
                response_head = await up_reader.readuntil(b"\r\n\r\n")
                length = int(_headers(response_head).get("content-length", "0"))
                writer.write(response_head + await up_reader.readexactly(length))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    def _client_frame(self, payload: bytes) -> bytes | None:
        """A text message from the client on the event socket: None to forward it, b"" to drop it, or a frame
        to send back to the client instead of forwarding it."""
        try:
            message: Any = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(message, dict) or message.get("type") != "RESTRequest":
            return None
        query = urlencode([(q["name"], q["value"]) for q in message.get("query_strings") or ()])
        line = f"{message['method']} /ari/{message['uri']}" + (f"?{query}" if query else "")
        self.requests.append(line)
        self.ws_requests.append(line)
        fault = next((f for f in self.faults if f.kind != "reset" and f.matches(line)), None)
        if fault is None:
            return None
        fault.at.append(time.time())
        if fault.kind == "timeout":
            return b""
        response = {
            "type": "RESTResponse",
            "request_id": message.get("request_id", ""),
            "status_code": 500,
            "reason_phrase": "Internal Server Error",
            "uri": message["uri"],
            "content_type": "application/json",
            "message_body": '{"message": "injected fault"}',
        }
        return _server_text_frame(json.dumps(response).encode())


def _server_text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (server to client)."""
    size = len(payload)
    if size < 126:
        return bytes([0x81, size]) + payload
    if size < 65536:
        return bytes([0x81, 126]) + struct.pack("!H", size) + payload
    return bytes([0x81, 127]) + struct.pack("!Q", size) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, int, bool, bytes]:
    """One client frame: its raw bytes (to forward unchanged), opcode, FIN and unmasked payload."""
    head = await reader.readexactly(2)
    fin, opcode, masked, size = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
    extra = b""
    if size == 126:
        extra = await reader.readexactly(2)
        size = struct.unpack("!H", extra)[0]
    elif size == 127:
        extra = await reader.readexactly(8)
        size = struct.unpack("!Q", extra)[0]
    mask = await reader.readexactly(4) if masked else b""
    data = await reader.readexactly(size)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data)) if masked else data
    return head + extra + mask + data, opcode, bool(fin), payload


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if ":" in line)}


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    on_client_text: Callable[[bytes], bytes | None],
) -> None:
    async def server_frames() -> None:
        # Whole frames too, so an injected answer never lands inside one of Asterisk's frames.
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                raw, _, _, _ = await _read_frame(up_reader)
                writer.write(raw)
                await writer.drain()

    async def client_frames() -> None:
        # Frame by frame, so a RESTRequest can be failed; only whole (FIN) text frames are inspected, which is
        # what a client sends for a JSON message.
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                raw, opcode, fin, payload = await _read_frame(reader)
                verdict = on_client_text(payload) if opcode == 0x1 and fin else None
                if verdict is None:
                    up_writer.write(raw)
                    await up_writer.drain()
                elif verdict:
                    writer.write(verdict)
                    await writer.drain()

    tasks = [asyncio.ensure_future(client_frames()), asyncio.ensure_future(server_frames())]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


@dataclass
class RtpSniffer:
    """Arrival times (time.time()) of the UDP packets sent to ``port`` on loopback: what a phone hears.

    A raw packet socket (root) sees them without taking the port from the phone, which binds it itself.
    """

    port: int
    arrivals: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def running(self) -> Iterator[RtpSniffer]:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind(("lo", 0))
        sock.settimeout(0.2)
        stop = threading.Event()

        def sniff() -> None:
            while not stop.is_set():
                try:
                    frame, address = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                if address[2] == socket.PACKET_OUTGOING:  # loopback shows each packet twice
                    continue
                ip = frame[14:]
                if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
                    continue
                udp = ip[(ip[0] & 0x0F) * 4 :]
                if struct.unpack("!H", udp[2:4])[0] == self.port:
                    self.arrivals.append(time.time())

        thread = threading.Thread(target=sniff, name=f"rtp-sniffer-{self.port}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)
            sock.close()

    def after(self, moment: float) -> int:
        return sum(1 for at in self.arrivals if at > moment)
