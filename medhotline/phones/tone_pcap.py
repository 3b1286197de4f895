"""A steady tone as G.711 µ-law (PCMU, payload type 0) RTP in a libpcap capture, and the decoding and tone
detection that check what a phone received.

Why: a test that says "the agent heard the supervisor and the patient did not" needs audio it can recognise on
the wire among prompts, music and silence. A simulated phone replays the capture with SIPp's ``play_pcap_audio``
(as the key presses of :mod:`medhotline.phones.dtmf_pcap`); the receiving side decodes each packet's µ-law and
measures the tone's share of the packet's energy with the Goertzel algorithm at that one frequency.
"""

from __future__ import annotations

import math
import struct
from typing import Final

from medhotline.phones import PhoneError
from medhotline.phones.dtmf_pcap import PACKET_MS, RtpPacket, pcap_bytes

__all__ = ["PCMU", "tone_packets", "tone_pcap", "tone_share", "ulaw_decode", "ulaw_encode"]

PCMU: Final = 0
RATE: Final = 8000
SAMPLES_PER_PACKET: Final = RATE * PACKET_MS // 1000
_BIAS: Final = 0x84
_CLIP: Final = 32635


def ulaw_encode(sample: int) -> int:
    """One 16-bit linear sample as a G.711 µ-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), _CLIP) + _BIAS
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _decode(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = ((((byte & 0x0F) << 3) + _BIAS) << ((byte >> 4) & 0x07)) - _BIAS
    return -magnitude if byte & 0x80 else magnitude


_TABLE: Final = tuple(_decode(b) for b in range(256))


def ulaw_decode(payload: bytes) -> list[int]:
    """µ-law bytes as 16-bit linear samples."""
    return [_TABLE[b] for b in payload]


def tone_share(samples: list[int], frequency: float) -> tuple[float, float]:
    """(share of the samples' energy at ``frequency`` (0..1, Goertzel), RMS level) of one block of samples."""
    if not samples:
        return 0.0, 0.0
    coeff = 2 * math.cos(2 * math.pi * frequency / RATE)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    energy = sum(x * x for x in samples)
    if energy == 0:
        return 0.0, 0.0
    # A pure tone of N samples puts N/2 × its energy into the Goertzel power: normalise to 0..1.
    return min(1.0, power / (energy * len(samples) / 2)), math.sqrt(energy / len(samples))


def tone_packets(frequency: float, seconds: float, *, amplitude: int = 8000, ssrc: int = 0x5EED7011) -> list[RtpPacket]:
    """``seconds`` of a sine at ``frequency`` Hz as PCMU RTP packets of 20 ms."""
    if not 0 < frequency < RATE / 2:
        raise PhoneError(f"tone frequency must be between 0 and {RATE // 2} Hz, got {frequency}")
    if not 0 < seconds <= 600:
        raise PhoneError(f"tone length must be more than 0 and at most 600 s, got {seconds}")
    if not 0 < amplitude <= _CLIP:
        raise PhoneError(f"tone amplitude must be 1-{_CLIP}, got {amplitude}")
    packets = []
    step = 2 * math.pi * frequency / RATE
    for n in range(round(seconds * 1000 / PACKET_MS)):
        first = n * SAMPLES_PER_PACKET
        payload = bytes(ulaw_encode(round(amplitude * math.sin(step * (first + i)))) for i in range(SAMPLES_PER_PACKET))
        header = struct.pack("!BBHII", 0x80, (0x80 if n == 0 else 0) | PCMU, n & 0xFFFF, first & 0xFFFFFFFF, ssrc)
        packets.append(RtpPacket(n * PACKET_MS, header + payload))
    return packets


def tone_pcap(frequency: float, seconds: float, *, amplitude: int = 8000) -> bytes:
    """The capture of :func:`tone_packets`, for ``play_pcap_audio``."""
    return pcap_bytes(tone_packets(frequency, seconds, amplitude=amplitude))
