"""Free ports: RTP ranges stay below the kernel's ephemeral ports and apart from ranges chosen but not bound."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from medhotline.free_ports import RTP_CEILING, RTP_FLOOR, free_port, free_rtp_range, rtp_ceiling


def test_an_rtp_range_keeps_out_of_the_ranges_to_avoid() -> None:
    # Another node's range is not bound until its calls come: only the avoid list keeps the two apart. With the
    # ceiling at 32767 (Debian's ephemeral ports start at 32768) most starts fall in the avoided range.
    low = rtp_ceiling(8)
    avoided = (RTP_FLOOR, low - 400)
    starts = [free_rtp_range(8, "127.0.0.1", [avoided]) for _ in range(20)]
    assert all(avoided[1] < start and start + 8 <= low for start in starts), starts
    assert all(start % 2 == 0 for start in starts)


def test_rtp_ranges_stay_below_the_kernels_ephemeral_ports(tmp_path: Path) -> None:
    # A port the kernel hands to some process's outgoing socket between the choice and Asterisk's bind is what
    # made a node's start fail; ranges drawn below the ephemeral range cannot meet one.
    proc = tmp_path / "ip_local_port_range"
    proc.write_text("32768\t60999\n")
    assert rtp_ceiling(60, proc) == 32767
    proc.write_text("45000 60999\n")
    assert rtp_ceiling(60, proc) == RTP_CEILING
    # A machine whose ephemeral ports start low leaves no fair choice below them: the plain ceiling is used.
    proc.write_text("20100 60999\n")
    assert rtp_ceiling(60, proc) == RTP_CEILING
    assert rtp_ceiling(60, tmp_path / "missing") == RTP_CEILING
    proc.write_text("garbage\n")
    assert rtp_ceiling(60, proc) == RTP_CEILING
    for _ in range(20):
        start = free_rtp_range(60)
        assert start >= RTP_FLOOR
        assert start + 60 <= rtp_ceiling(60)


def test_a_range_that_cannot_be_found_is_an_error_naming_the_bounds() -> None:
    with pytest.raises(OSError, match=r"no free UDP range of \d+ ports between 20000"):
        free_rtp_range(50, "127.0.0.1", [(0, 65535)])


def test_a_free_port_can_be_bound() -> None:
    port = free_port(socket.SOCK_STREAM)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
