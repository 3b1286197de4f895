"""MLLP framing (HL7 v2 Minimal Lower Layer Protocol), sans-I/O.

A frame is ``0x0B`` (start block), the message bytes, ``0x1C`` (end block), ``0x0D``. :class:`MllpDecoder` turns
whatever arrives on a stream, in any chunking, into complete frames and framing errors; it never raises on input,
so a peer that sends garbage costs that garbage and nothing else: the decoder skips to the next start block and
the connection goes on. It keeps at most ``max_size`` bytes of one frame, so a peer that never sends an end block
cannot grow the receiver's memory without bound.

The asyncio client and server (``his.transport``) feed it; unit tests feed it byte strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

START_BLOCK: Final = 0x0B
END_BLOCK: Final = 0x1C
CARRIAGE_RETURN: Final = 0x0D
DEFAULT_MAX_SIZE: Final = 1 << 20  # 1 MiB: a PDQ answer or an ADT message is a few KiB


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message as received (bytes between the start and end blocks)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FramingError:
    """Input that is not a well-formed frame; ``offset`` counts bytes from the start of the stream."""

    offset: int
    reason: str

    def __str__(self) -> str:
        return f"MLLP framing at byte {self.offset}: {self.reason}"


FrameEvent = Frame | FramingError


def encode_frame(payload: bytes) -> bytes:
    """``payload`` in an MLLP frame; refuses a payload holding a block character (it would end the frame early)."""
    if START_BLOCK in payload or END_BLOCK in payload:
        raise ValueError("an HL7 message must not contain the MLLP block characters 0x0B or 0x1C")
    return bytes([START_BLOCK]) + payload + bytes([END_BLOCK, CARRIAGE_RETURN])


class MllpDecoder:
    """Incremental frame decoder: :meth:`feed` the bytes as they come, :meth:`end` when the stream closes."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 16:
            raise ValueError(f"max_size must be at least 16 bytes, got {max_size}")
        self._max = max_size
        self._buffer = bytearray()
        self._in_frame = False
        self._oversize = False  # discarding the rest of a frame that grew past max_size
        self._after_end = False  # an end block was seen; the next byte must be CR
        self._frame_start = 0
        self._offset = 0  # stream offset of the next byte fed
        self._garbage_start: int | None = None

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended (what :meth:`end` reports as a cut)."""
        return self._in_frame

    def feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        for byte in data:
            self._byte(byte, events)
            self._offset += 1
        return events

    def end(self) -> list[FrameEvent]:
        """The stream closed: a frame still open was cut, bytes outside a frame were garbage."""
        events: list[FrameEvent] = []
        self._flush_garbage(events)
        if self._in_frame:
            events.append(FramingError(self._frame_start, "stream closed in the middle of a frame (no end block)"))
        self._reset()
        return events

    def _byte(self, byte: int, events: list[FrameEvent]) -> None:
        if self._after_end:
            self._after_end = False
            if byte == CARRIAGE_RETURN:
                self._emit(events)
                return
            # Many senders omit the CR; accepting the frame keeps their messages, the error says what was wrong.
            events.append(FramingError(self._offset, "end block not followed by carriage return (0x0D)"))
            self._emit(events)
            # fall through: this byte starts whatever comes next
        if not self._in_frame:
            if byte == START_BLOCK:
                self._flush_garbage(events)
                self._start()
            elif byte not in (CARRIAGE_RETURN, 0x0A) and self._garbage_start is None:
                self._garbage_start = self._offset
            return
        if byte == START_BLOCK:
            events.append(FramingError(self._frame_start, "start block inside a frame: the frame before it is lost"))
            self._start()
        elif byte == END_BLOCK:
            self._after_end = True
        elif self._oversize:
            pass
        elif len(self._buffer) >= self._max:
            self._oversize = True
            self._buffer.clear()
        else:
            self._buffer.append(byte)

    def _start(self) -> None:
        self._in_frame = True
        self._oversize = False
        self._buffer.clear()
        self._frame_start = self._offset

    def _emit(self, events: list[FrameEvent]) -> None:
        if self._oversize:
            events.append(FramingError(self._frame_start, f"frame larger than {self._max} bytes, discarded"))
        else:
            events.append(Frame(bytes(self._buffer)))
        self._reset()

    def _flush_garbage(self, events: list[FrameEvent]) -> None:
        if self._garbage_start is not None:
            events.append(FramingError(self._garbage_start, "bytes outside a frame (no start block 0x0B), skipped"))
            self._garbage_start = None

    def _reset(self) -> None:
        self._in_frame = False
        self._oversize = False
        self._after_end = False
        self._buffer.clear()
