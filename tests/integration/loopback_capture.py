"""What crosses the loopback interface to chosen ports: UDP payloads (RTP) and TCP payloads (SIP over TLS).

Like ``rtp_tap``, an AF_PACKET socket (root) that stands in no path; unlike it, it decodes nothing, so a test can
check that what is on the wire is *not* readable.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Final, Self

ETH_P_ALL: Final = 0x0003
PACKET_OUTGOING: Final = 4  # loopback shows every packet twice: once leaving, once arriving


class LoopbackSniffer:
    """An AF_PACKET socket on the loopback interface, read by a thread while the sniffer is open (a context
    manager); each incoming IPv4 frame goes to :meth:`_frame` (loopback shows every packet twice: the outgoing
    copy is skipped)."""

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 8:
                continue
            if struct.unpack_from("!H", frame, 12)[0] != 0x0800:
                continue
            self._frame(frame, 14 + (frame[14] & 0x0F) * 4, frame[14 + 9])

    def _frame(self, frame: bytes, l4: int, proto: int) -> None:
        """One IPv4 frame: its transport header starts at ``l4``; ``proto`` is the IP protocol number."""
        raise NotImplementedError


class LoopbackCapture(LoopbackSniffer):
    """UDP payloads sent to ``udp_ports`` and TCP payloads to or from ``tcp_ports``, while open."""

    def __init__(self, udp_ports: Iterable[int], tcp_ports: Iterable[int]) -> None:
        self.udp_ports = frozenset(udp_ports)
        self.tcp_ports = frozenset(tcp_ports)
        self.udp: list[bytes] = []
        self.tcp: list[bytes] = []
        super().__init__("loopback-capture")

    def snapshot(self) -> tuple[list[bytes], list[bytes]]:
        with self._lock:
            return list(self.udp), list(self.tcp)

    def _frame(self, frame: bytes, l4: int, proto: int) -> None:
        end = 14 + struct.unpack_from("!H", frame, 16)[0]
        src, dst = struct.unpack_from("!HH", frame, l4)
        if proto == socket.IPPROTO_UDP and dst in self.udp_ports:
            with self._lock:
                self.udp.append(frame[l4 + 8 : end])
        elif proto == socket.IPPROTO_TCP and (src in self.tcp_ports or dst in self.tcp_ports):
            payload = frame[l4 + (frame[l4 + 12] >> 4) * 4 : end]
            if payload:
                with self._lock:
                    self.tcp.append(payload)


def byte_entropy(data: bytes) -> float:
    """Shannon entropy in bits per byte: about 8 for ciphertext, far less for speech, silence or text."""
    if not data:
        return 0.0
    counts = Counter(data)
    return -sum(n / len(data) * math.log2(n / len(data)) for n in counts.values())
