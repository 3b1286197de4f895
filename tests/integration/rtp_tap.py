"""What RTP reaches a SIPp phone's media port, seen on the loopback interface (an AF_PACKET socket: root, as the
sandbox itself needs), without standing in the media path: the phones and Asterisk talk as they would anyway.

Each PCMU packet to a watched port is decoded and counted as carrying the tone when the tone holds most of the
packet's energy at a level above silence, so prompts, music and comfort noise never count.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from typing import Final

from medhotline.phones.tone_pcap import PCMU, tone_share, ulaw_decode
from tests.integration.loopback_capture import LoopbackSniffer

MIN_SHARE: Final = 0.6
MIN_RMS: Final = 200.0


class RtpTap(LoopbackSniffer):
    """Counts RTP packets, and those carrying ``frequency``, sent to each watched UDP port while it is open."""

    def __init__(self, ports: dict[int, str], frequency: float) -> None:
        self.ports = ports
        self.frequency = frequency
        self.packets: Counter[str] = Counter()
        self.tone: Counter[str] = Counter()
        super().__init__("rtp-tap")

    def counts(self) -> dict[str, tuple[int, int]]:
        """name → (RTP packets, packets carrying the tone) so far."""
        with self._lock:
            return {name: (self.packets[name], self.tone[name]) for name in self.ports.values()}

    def reset(self) -> None:
        with self._lock:
            self.packets.clear()
            self.tone.clear()

    def _frame(self, frame: bytes, l4: int, proto: int) -> None:
        if proto != socket.IPPROTO_UDP:
            return
        name = self.ports.get(struct.unpack_from("!H", frame, l4 + 2)[0])
        rtp = frame[l4 + 8 :]
        if name is None or len(rtp) < 12 or rtp[0] >> 6 != 2 or rtp[1] & 0x7F != PCMU:
            return
        payload = rtp[12 + 4 * (rtp[0] & 0x0F) :]
        share, rms = tone_share(ulaw_decode(payload), self.frequency)
        with self._lock:
            self.packets[name] += 1
            if share >= MIN_SHARE and rms >= MIN_RMS:
                self.tone[name] += 1


def wait_counts(tap: RtpTap, seconds: float) -> dict[str, tuple[int, int]]:
    time.sleep(seconds)
    return tap.counts()
