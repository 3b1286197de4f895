"""Key presses as RFC 4733 telephone events in a libpcap capture, for SIPp's ``play_pcap_audio`` to replay.

Why a capture instead of SIPp's ``play_dtmf``: SIPp 3.6.1 always sends ``play_dtmf`` events on RTP payload type
96. When the hotline calls the patient, Asterisk makes the offer and maps telephone-event to 101; it drops RTP on
any other payload type, so those digits never reach it. ``play_pcap_audio`` replays a capture's RTP bytes
unchanged (SIPp rewrites only the UDP ports and checksum and sends to the media address the SDP negotiated; it
keeps the RTP header, so the payload type, sequence numbers, timestamps and SSRC written here are the ones on the
wire) and keeps the capture's packet spacing. So the events can carry whatever payload type the offer used.

Each key is one event (RFC 4733 section 2.5): a start packet with the marker bit, a packet every 20 ms whose
duration grows by 20 ms (160 units of the 8 kHz clock), then three end packets with the E bit and the final
duration, all with the RTP timestamp of the event's start; sequence numbers increase by one per packet. Keys are
:data:`TONE_MS` long and :data:`GAP_MS` of silence apart. A press is one capture; successive presses of a call
continue one stream (same SSRC, sequence numbers and timestamps carrying on), see :class:`RtpStream`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from medhotline.phones import PhoneError

EVENT_CODES: Final[Mapping[str, int]] = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}

PACKET_MS: Final = 20
TONE_MS: Final = 200
END_REPEATS: Final = 3
GAP_MS: Final = 100
VOLUME: Final = 10  # -10 dBm0, a normal key tone
CLOCK_PER_MS: Final = 8  # telephone-event/8000

TONE_PACKETS: Final = TONE_MS // PACKET_MS
PACKETS_PER_KEY: Final = TONE_PACKETS + END_REPEATS
# A key's packets take this long on the wire (the last end packet's 20 ms included); the next key starts GAP_MS on.
KEY_MS: Final = PACKETS_PER_KEY * PACKET_MS
KEY_PERIOD_MS: Final = KEY_MS + GAP_MS

# telephone-event has no static payload type: the offer picks one from the dynamic range (RFC 3551).
DYNAMIC_PAYLOAD_TYPES: Final = range(96, 128)

PCAP_MAGIC: Final = 0xA1B2C3D4
LINKTYPE_ETHERNET: Final = 1
# Addresses of the capture itself; SIPp replaces them with the call's media addresses when it replays it.
_MAC_SRC: Final = bytes.fromhex("020000000001")
_MAC_DST: Final = bytes.fromhex("020000000002")
_IP_SRC: Final = bytes([192, 0, 2, 1])  # TEST-NET-1
_IP_DST: Final = bytes([192, 0, 2, 2])
_PORT_SRC: Final = 40000
_PORT_DST: Final = 40002
# The first packet's capture time. Not 0: SIPp's replay loop takes a zero "previous packet" time for "no packet
# sent yet", so a capture starting at 0.000000 would send its first two packets back to back.
_START_S: Final = 1


def play_ms(keys: str) -> int:
    """How long the replay of ``keys`` lasts, from its first packet to the end of its last one."""
    return len(keys) * KEY_PERIOD_MS - GAP_MS


@dataclass(frozen=True)
class RtpStream:
    """Where an RTP stream stands when a play starts: its SSRC, the next sequence number, the RTP timestamp now."""

    ssrc: int
    seq: int
    timestamp: int

    def __post_init__(self) -> None:
        if not 0 <= self.ssrc < 1 << 32:
            raise PhoneError(f"RTP SSRC must be a 32-bit unsigned number, got {self.ssrc}")
        if not 0 <= self.seq < 1 << 16:
            raise PhoneError(f"RTP sequence number must be 0-65535, got {self.seq}")
        if not 0 <= self.timestamp < 1 << 32:
            raise PhoneError(f"RTP timestamp must be a 32-bit unsigned number, got {self.timestamp}")

    def after(self, keys: str, then_ms: int) -> RtpStream:
        """The stream once ``keys`` have been played and the next play starts ``then_ms`` after this one."""
        if then_ms < play_ms(keys):
            raise PhoneError(f"the next play starts {then_ms} ms in, before {len(keys)} key(s) have played")
        return RtpStream(
            self.ssrc,
            (self.seq + len(keys) * PACKETS_PER_KEY) % (1 << 16),
            (self.timestamp + then_ms * CLOCK_PER_MS) % (1 << 32),
        )


@dataclass(frozen=True)
class RtpPacket:
    """One RTP packet (header and payload) and when it leaves, in ms from the start of the play."""

    at_ms: int
    data: bytes


def _check_keys(keys: str) -> None:
    if not keys:
        raise PhoneError("no keys to play")
    for index, key in enumerate(keys):
        if key not in EVENT_CODES:
            # The position only: keys can be a patient's date of birth or record number.
            raise PhoneError(f"key {index + 1} of {len(keys)} is not a DTMF key (0-9, * or #)")


def dtmf_packets(keys: str, stream: RtpStream, payload_type: int) -> list[RtpPacket]:
    """The RFC 4733 packets of ``keys`` (see the module docstring), starting where ``stream`` stands."""
    _check_keys(keys)
    if payload_type not in DYNAMIC_PAYLOAD_TYPES:
        raise PhoneError(f"telephone-event payload type must be dynamic (96-127), got {payload_type}")
    packets: list[RtpPacket] = []
    seq = stream.seq
    for index, key in enumerate(keys):
        start_ms = index * KEY_PERIOD_MS
        timestamp = (stream.timestamp + start_ms * CLOCK_PER_MS) % (1 << 32)
        for n in range(PACKETS_PER_KEY):
            end = n >= TONE_PACKETS
            duration = min(n + 1, TONE_PACKETS) * PACKET_MS * CLOCK_PER_MS
            marker = 0x80 if n == 0 else 0
            header = struct.pack("!BBHII", 0x80, marker | payload_type, seq, timestamp, stream.ssrc)
            payload = struct.pack("!BBH", EVENT_CODES[key], (0x80 if end else 0) | VOLUME, duration)
            packets.append(RtpPacket(start_ms + n * PACKET_MS, header + payload))
            seq = (seq + 1) % (1 << 16)
    return packets


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _frame(rtp: bytes, ip_id: int) -> bytes:
    """``rtp`` in UDP, IPv4 and Ethernet headers, with valid checksums so that capture tools show it clean."""
    udp_len = 8 + len(rtp)
    pseudo = _IP_SRC + _IP_DST + struct.pack("!BBH", 0, 17, udp_len)
    udp_sum = 0xFFFF - _ones_complement_sum(pseudo + struct.pack("!HHHH", _PORT_SRC, _PORT_DST, udp_len, 0) + rtp)
    udp = struct.pack("!HHHH", _PORT_SRC, _PORT_DST, udp_len, udp_sum or 0xFFFF) + rtp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0xB8, 20 + len(udp), ip_id, 0x4000, 64, 17, 0, _IP_SRC, _IP_DST)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _ones_complement_sum(ip)) + ip[12:]
    return _MAC_DST + _MAC_SRC + struct.pack("!H", 0x0800) + ip + udp


def pcap_bytes(packets: Iterable[RtpPacket]) -> bytes:
    """A classic libpcap capture (Ethernet link type) of ``packets``, each stamped at its ``at_ms``."""
    out = [struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)]
    for index, packet in enumerate(packets):
        frame = _frame(packet.data, index & 0xFFFF)
        seconds, ms = divmod(packet.at_ms, 1000)
        out.append(struct.pack("<IIII", _START_S + seconds, ms * 1000, len(frame), len(frame)))
        out.append(frame)
    return b"".join(out)


def dtmf_pcap(keys: str, stream: RtpStream, payload_type: int) -> bytes:
    """The capture of ``keys`` played as RFC 4733 events on ``payload_type`` from where ``stream`` stands."""
    return pcap_bytes(dtmf_packets(keys, stream, payload_type))


def write_dtmf_pcap(path: Path, keys: str, stream: RtpStream, payload_type: int) -> None:
    """Write :func:`dtmf_pcap` to ``path``; PhoneError naming the file if it cannot be written."""
    data = dtmf_pcap(keys, stream, payload_type)
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise PhoneError(f"{path}: cannot write the key capture: {exc.strerror}") from exc
