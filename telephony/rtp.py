"""Caller audio over RTP (Asterisk ``externalMedia``): parsing, G.711 decoding, reordering, and a UDP receiver.

Everything above ``RtpReceiver`` is sans-I/O: plain functions and a small state machine over bytes.

- ``parse_rtp`` reads an RFC 3550 packet (CSRC list, header extension, padding) or raises ``RtpError``.
- ``decode_ulaw`` / ``decode_alaw`` turn G.711 payloads into 16-bit little-endian PCM through 256-entry tables
  built from the G.711 definitions (the stdlib ``audioop`` is deprecated and is not used).
- ``RtpReassembler`` puts packets back in sequence order within a small window, drops duplicates and packets
  that arrive after their turn, and counts losses; a sender restart (new SSRC, or a sequence jump confirmed by
  the next packet, as in RFC 3550 appendix A.1) starts a new sequence.
- ``RtpReceiver`` binds a UDP socket, keeps to the first sender, decodes and puts PCM chunks on a queue;
  iteration ends when no packet came for ``idle_timeout`` seconds or the receiver is closed.
- ``AudioLosses`` sums up what a stream lost: sequence gaps (packets that never came in time) and frames dropped
  because the consumer (a recognizer that fell behind) left the queue full. The call record and the metrics
  report it (docs/speech.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from ground.errors import MedhotlineError
from ground.logs import get_logger

log = get_logger(__name__)

RTP_VERSION: Final = 2
HEADER_BYTES: Final = 12
PT_PCMU: Final = 0
PT_PCMA: Final = 8
_SEQ_MOD: Final = 1 << 16
MAX_DROPOUT: Final = 3000  # RFC 3550 A.1: a forward jump beyond this is a restart candidate
MAX_MISORDER: Final = 100  # ... and so is a backward jump beyond this


class RtpError(MedhotlineError):
    """A datagram is not a usable RTP packet."""


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()


_FIXED = struct.Struct("!BBHII")


def parse_rtp(datagram: bytes) -> RtpPacket:
    """Parse one RTP packet; ``RtpError`` says what is wrong with a short or malformed one."""
    size = len(datagram)
    if size < HEADER_BYTES:
        raise RtpError(f"RTP packet of {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    first, second, sequence, timestamp, ssrc = _FIXED.unpack_from(datagram)
    version = first >> 6
    if version != RTP_VERSION:
        raise RtpError(f"RTP version {version}, expected {RTP_VERSION}")
    has_padding = bool(first & 0x20)
    has_extension = bool(first & 0x10)
    csrc_count = first & 0x0F
    offset = HEADER_BYTES + 4 * csrc_count
    if size < offset:
        raise RtpError(f"RTP packet of {size} bytes is too short for its {csrc_count} CSRC entries")
    csrcs = struct.unpack_from(f"!{csrc_count}I", datagram, HEADER_BYTES) if csrc_count else ()
    if has_extension:
        if size < offset + 4:
            raise RtpError(f"RTP packet of {size} bytes is too short for its header extension")
        (words,) = struct.unpack_from("!H", datagram, offset + 2)
        offset += 4 + 4 * words
        if size < offset:
            raise RtpError(f"RTP header extension of {words} words runs past the end of the {size}-byte packet")
    end = size
    if has_padding:
        padding = datagram[-1]
        if padding == 0 or padding > size - offset:
            raise RtpError(f"RTP padding count {padding} is invalid for a payload of {size - offset} bytes")
        end -= padding
    return RtpPacket(
        payload_type=second & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        payload=bytes(datagram[offset:end]),
        marker=bool(second & 0x80),
        csrcs=tuple(csrcs),
    )


# --- G.711 ------------------------------------------------------------------------------------------------


def _ulaw_to_linear(code: int) -> int:
    """ITU-T G.711 μ-law: complement, then sign, 3-bit segment and 4-bit step; bias 0x84 (132)."""
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def _alaw_to_linear(code: int) -> int:
    """ITU-T G.711 A-law: even bits inverted (xor 0x55); sign bit set means positive."""
    code ^= 0x55
    segment = (code >> 4) & 0x07
    magnitude = ((code & 0x0F) << 4) + 8 if segment == 0 else (((code & 0x0F) << 4) + 0x108) << (segment - 1)
    return magnitude if code & 0x80 else -magnitude


ULAW_TABLE: Final = tuple(_ulaw_to_linear(code) for code in range(256))
ALAW_TABLE: Final = tuple(_alaw_to_linear(code) for code in range(256))
_ULAW_BYTES: Final = tuple(value.to_bytes(2, "little", signed=True) for value in ULAW_TABLE)
_ALAW_BYTES: Final = tuple(value.to_bytes(2, "little", signed=True) for value in ALAW_TABLE)


def decode_ulaw(payload: bytes) -> bytes:
    """G.711 μ-law bytes to 16-bit little-endian PCM (two bytes per input byte)."""
    return b"".join(map(_ULAW_BYTES.__getitem__, payload))


def decode_alaw(payload: bytes) -> bytes:
    """G.711 A-law bytes to 16-bit little-endian PCM (two bytes per input byte)."""
    return b"".join(map(_ALAW_BYTES.__getitem__, payload))


def decode_payload(packet: RtpPacket) -> bytes | None:
    """PCM for a PCMU or PCMA packet; ``None`` for other payload types (DTMF events, comfort noise, ...)."""
    if packet.payload_type == PT_PCMU:
        return decode_ulaw(packet.payload)
    if packet.payload_type == PT_PCMA:
        return decode_alaw(packet.payload)
    return None


# --- reordering -------------------------------------------------------------------------------------------


@dataclass
class ReassemblyStats:
    received: int = 0
    released: int = 0
    duplicates: int = 0
    late: int = 0
    lost: int = 0
    restarts: int = 0


def _seq_delta(seq: int, reference: int) -> int:
    """``seq - reference`` in 16-bit serial arithmetic, in -32768..32767."""
    delta = (seq - reference) % _SEQ_MOD
    return delta - _SEQ_MOD if delta >= _SEQ_MOD // 2 else delta


@dataclass
class RtpReassembler:
    """Reorders packets by sequence number within ``window`` packets.

    ``push`` returns the packets that are now in order. A missing packet is waited for until ``window``
    later packets are buffered, then counted as lost and skipped; when it arrives after that it is ``late``
    and dropped. ``flush`` releases what is buffered (at the end of the stream).
    """

    window: int = 8
    stats: ReassemblyStats = field(default_factory=ReassemblyStats)
    _expected: int | None = field(default=None, init=False, repr=False)
    _ssrc: int | None = field(default=None, init=False, repr=False)
    _buffer: dict[int, RtpPacket] = field(default_factory=dict, init=False, repr=False)
    _recent: deque[int] = field(default_factory=lambda: deque(maxlen=64), init=False, repr=False)
    _probe: RtpPacket | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_MISORDER:
            raise ValueError(f"reassembly window {self.window} is outside 1..{MAX_MISORDER}")

    def push(self, packet: RtpPacket) -> list[RtpPacket]:
        self.stats.received += 1
        released: list[RtpPacket] = []
        if self._expected is None or packet.ssrc != self._ssrc:
            if self._expected is not None:
                released = self.flush()
                self.stats.restarts += 1
            self._restart(packet)
        assert self._expected is not None
        delta = _seq_delta(packet.sequence, self._expected)
        if delta > MAX_DROPOUT or delta < -MAX_MISORDER:
            probe = self._probe
            if probe is None or packet.sequence != (probe.sequence + 1) % _SEQ_MOD:
                self._probe = packet  # one packet far away: a stray, unless the next one follows it
                return released
            released += self.flush()  # two in a row: the sender restarted its sequence
            self.stats.restarts += 1
            self._restart(probe)
            self.stats.received -= 2  # both are counted again by the pushes below
            return released + self.push(probe) + self.push(packet)
        self._probe = None
        if delta < 0:
            if packet.sequence in self._recent:
                self.stats.duplicates += 1
            else:
                self.stats.late += 1
            return released
        if packet.sequence in self._buffer:
            self.stats.duplicates += 1
            return released
        self._buffer[packet.sequence] = packet
        return released + self._drain(force=False)

    def flush(self) -> list[RtpPacket]:
        """Release everything buffered, in order, counting the gaps as lost."""
        return self._drain(force=True)

    def _restart(self, packet: RtpPacket) -> None:
        self._expected = packet.sequence
        self._ssrc = packet.ssrc
        self._buffer.clear()
        self._recent.clear()
        self._probe = None

    def _drain(self, *, force: bool) -> list[RtpPacket]:
        out: list[RtpPacket] = []
        while self._buffer and self._expected is not None:
            packet = self._buffer.pop(self._expected, None)
            if packet is not None:
                out.append(packet)
                self._recent.append(packet.sequence)
            elif force or len(self._buffer) >= self.window:
                self.stats.lost += 1
            else:
                break
            self._expected = (self._expected + 1) % _SEQ_MOD
        self.stats.released += len(out)
        return out


# --- losses -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioLosses:
    """What the recognizer never got of a stream (or, added up, of a call's streams).

    ``gaps``: sequence numbers skipped in the audio given on (lost in the network, or arrived after their turn:
    those are ``late`` too, and not counted twice). ``overflow``: frames dropped because the consumer fell
    behind and the queue was full. ``duplicates`` and sender ``restarts`` lose no audio and are not drops.
    """

    gaps: int = 0
    late: int = 0
    duplicates: int = 0
    overflow: int = 0
    restarts: int = 0

    @property
    def dropped(self) -> int:
        """20 ms frames (at the usual packetisation) the recognizer did not hear."""
        return self.gaps + self.overflow

    @classmethod
    def of(cls, reassembly: ReassemblyStats, overflow: int = 0) -> AudioLosses:
        return cls(reassembly.lost, reassembly.late, reassembly.duplicates, overflow, reassembly.restarts)

    def __add__(self, other: AudioLosses) -> AudioLosses:
        return AudioLosses(
            self.gaps + other.gaps,
            self.late + other.late,
            self.duplicates + other.duplicates,
            self.overflow + other.overflow,
            self.restarts + other.restarts,
        )


# --- UDP receiver -----------------------------------------------------------------------------------------


@dataclass
class ReceiverStats:
    datagrams: int = 0
    malformed: int = 0
    foreign: int = 0  # from another address than the first sender
    unsupported: int = 0  # payload types other than PCMU/PCMA
    overflow: int = 0  # chunks dropped because the consumer fell behind


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: RtpReceiver) -> None:
        self._receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._receiver._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.warning("rtp.socket_error", error=str(exc))


class RtpReceiver:
    """Receives one RTP stream on ``host:port`` (port 0: the system picks one; see ``address``).

    Use as ``async with RtpReceiver(...) as receiver: async for pcm in receiver: ...``. PCM chunks
    (16-bit little-endian, 8 kHz for G.711) go through a bounded queue; ``None`` on the queue marks the end.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = 5.0,
        window: int = 8,
        queue_size: int = 500,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        self._host = host
        self._port = port
        self._idle_timeout = idle_timeout
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=queue_size)
        self.reassembler = RtpReassembler(window=window)
        self.stats = ReceiverStats()
        self.idle_timed_out = False
        self._transport: asyncio.DatagramTransport | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._peer: tuple[str | int, ...] | None = None
        self._last_packet = 0.0
        self._closed = False
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), known once started."""
        if self._address is None:
            raise RuntimeError("RtpReceiver is not started")
        return self._address

    def losses(self) -> AudioLosses:
        """What this stream lost so far (final once closed)."""
        return AudioLosses.of(self.reassembler.stats, self.stats.overflow)

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self._host, self._port)
            )
        except OSError as exc:
            raise RtpError(f"cannot listen for RTP on {self._host}:{self._port}: {exc.strerror or exc}") from exc
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self._address = (str(sockname[0]), int(sockname[1]))
        self._last_packet = loop.time()
        self._watchdog = asyncio.create_task(self._watch_idle(), name=f"rtp-idle-{self._address[1]}")
        return self._address

    async def close(self) -> None:
        """Stop receiving; what is still buffered for reordering is decoded and queued before the end mark."""
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        self._end()

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        for packet in self.reassembler.flush():
            self._enqueue(packet)
        while True:  # the end mark must get through even when the consumer fell behind
            try:
                self.queue.put_nowait(None)
                break
            except asyncio.QueueFull:
                self.queue.get_nowait()
                self.stats.overflow += 1

    async def _watch_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            remaining = self._last_packet + self._idle_timeout - loop.time()
            if remaining <= 0:
                self.idle_timed_out = True
                log.info("rtp.idle_timeout", port=self._address[1] if self._address else None)
                self._end()
                return
            await asyncio.sleep(remaining)

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self._closed:
            return
        self.stats.datagrams += 1
        if self._peer is None:
            self._peer = addr
        elif addr != self._peer:
            self.stats.foreign += 1
            return
        try:
            packet = parse_rtp(data)
        except RtpError:
            self.stats.malformed += 1
            return
        self._last_packet = asyncio.get_running_loop().time()
        for ordered in self.reassembler.push(packet):
            self._enqueue(ordered)

    def _enqueue(self, packet: RtpPacket) -> None:
        pcm = decode_payload(packet)
        if pcm is None:
            self.stats.unsupported += 1
            return
        try:
            self.queue.put_nowait(pcm)
        except asyncio.QueueFull:
            self.stats.overflow += 1

    async def __aenter__(self) -> RtpReceiver:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.queue.get()
            if chunk is None:
                return
            yield chunk
