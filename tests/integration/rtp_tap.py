"""What RTP reaches a SIPp phone's media port, seen on the loopback interface (an AF_PACKET socket: root, as the
sandbox itself needs), without standing in the media path: the phones and Asterisk talk as they would anyway.

Each PCMU packet to a watched port is decoded and counted as carrying the tone when the tone holds most of the
packet's energy at a level above silence, so prompts, music and comfort noise never count.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from typing import Final

from medhotline.phones.tone_pcap import PCMU, tone_share, ulaw_decode

ETH_P_ALL: Final = 0x0003
PACKET_OUTGOING: Final = 4  # loopback shows every packet twice: once leaving, once arriving
MIN_SHARE: Final = 0.6
MIN_RMS: Final = 200.0


class RtpTap:
    """Counts RTP packets, and those carrying ``frequency``, sent to each watched UDP port while it is open."""

    def __init__(self, ports: dict[int, str], frequency: float) -> None:
        self.ports = ports
        self.frequency = frequency
        self.packets: Counter[str] = Counter()
        self.tone: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtp-tap", daemon=True)

    def __enter__(self) -> RtpTap:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def counts(self) -> dict[str, tuple[int, int]]:
        """name → (RTP packets, packets carrying the tone) so far."""
        with self._lock:
            return {name: (self.packets[name], self.tone[name]) for name in self.ports.values()}

    def reset(self) -> None:
        with self._lock:
            self.packets.clear()
            self.tone.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 8 + 12:
                continue
            if struct.unpack_from("!H", frame, 12)[0] != 0x0800 or frame[14 + 9] != socket.IPPROTO_UDP:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            name = self.ports.get(struct.unpack_from("!H", frame, udp + 2)[0])
            if name is None:
                continue
            rtp = frame[udp + 8 :]
            if rtp[0] >> 6 != 2 or rtp[1] & 0x7F != PCMU:
                continue
            payload = rtp[12 + 4 * (rtp[0] & 0x0F) :]
            share, rms = tone_share(ulaw_decode(payload), self.frequency)
            with self._lock:
                self.packets[name] += 1
                if share >= MIN_SHARE and rms >= MIN_RMS:
                    self.tone[name] += 1


def wait_counts(tap: RtpTap, seconds: float) -> dict[str, tuple[int, int]]:
    time.sleep(seconds)
    return tap.counts()
