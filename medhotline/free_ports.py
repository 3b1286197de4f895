"""Free ports for sandbox nodes, test phones and benchmarks on one machine.

A port found free is only a promise until something binds it. Two things break that promise: another range
chosen but not bound yet (a node's RTP range is bound call by call, so the ``avoid`` list keeps ranges apart),
and the kernel handing the same port to some process's outgoing socket. The kernel picks those from its
ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 on Debian), so RTP ranges are drawn below it.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

# Where RTP ranges are drawn from: above the production default range (10000-20000 in medhotline.toml) so a
# sandbox never takes a running hotline's ports, below 40000 or the kernel's ephemeral range if that starts lower.
RTP_FLOOR = 20000
RTP_CEILING = 40000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(kind: socket.SocketKind, host: str = "127.0.0.1") -> int:
    """A port the kernel says is free for ``kind`` on ``host`` now (it comes from the ephemeral range, so it
    does not collide with an RTP range drawn by :func:`free_rtp_range`)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rtp_ceiling(size: int, ephemeral_range: Path = EPHEMERAL_RANGE) -> int:
    """The highest port an RTP range of ``size`` may reach: below the kernel's ephemeral range when that leaves
    room for a fair choice (four ranges' worth), else :data:`RTP_CEILING` (a machine tuned otherwise)."""
    try:
        low = int(ephemeral_range.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return RTP_CEILING
    ceiling = min(RTP_CEILING, low - 1)
    return ceiling if ceiling - RTP_FLOOR >= 4 * (size + 1) else RTP_CEILING


def free_rtp_range(size: int, host: str = "127.0.0.1", avoid: Sequence[tuple[int, int]] = ()) -> int:
    """An even start port whose whole range ``start..start+size`` (RTP even, RTCP odd) is free for UDP now, lies
    below the kernel's ephemeral ports and overlaps none of the ``avoid`` ranges (inclusive): ranges chosen but
    not bound yet, e.g. another node's, which a restarted node would otherwise find taken by the other node's
    calls."""
    ceiling = rtp_ceiling(size)
    for _ in range(200):
        start = RTP_FLOOR + 2 * secrets.randbelow((ceiling - size - RTP_FLOOR) // 2)
        if any(start <= last and first <= start + size for first, last in avoid):
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(start, start + size + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        else:
            return start
        finally:
            for sock in socks:
                sock.close()
    raise OSError(f"no free UDP range of {size} ports between {RTP_FLOOR} and {ceiling} on {host}")
