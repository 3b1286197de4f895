"""``medhotline.phones.batch``: overlapping SIPp callers, counted by SIPp. A second SIPp (its built-in ``uas``)
answers on loopback, so the counts, the answer times and the failures come from a real SIP exchange."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from medhotline.phones import PhoneError
from medhotline.phones.batch import _duration, _rtt_seconds, place_calls

CALLER = "13900000000"  # made up


def free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def answering() -> Iterator[int]:
    """A SIPp that answers every INVITE (180, 200) and every BYE; its port."""
    if shutil.which("sipp") is None:
        pytest.skip("sipp is not installed")
    port = free_udp()
    proc = subprocess.Popen(
        ["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-nostdin", "-timeout", "60s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_batch_of_overlapping_calls_is_counted_by_sipp(answering: int) -> None:
    batch = place_calls(
        target_host="127.0.0.1",
        target_port=answering,
        service="100",
        local_port=free_udp(),
        media_port=free_udp(),
        caller=CALLER,
        count=6,
        rate=20,
        hang_up_after_ms=500,
    )
    assert (batch.placed, batch.successful, batch.failed) == (6, 6, 0), batch.errors
    assert len(batch.answer_times) == 6
    assert all(0 <= t < 5 for t in batch.answer_times)
    # All six were placed within 0.3 s and each lasted 0.5 s: the whole batch is well under six calls end to end.
    assert batch.elapsed < 6 * 0.5


def test_a_batch_is_refused_without_calls_or_rate() -> None:
    for count, rate in ((0, 5.0), (3, 0.0)):
        with pytest.raises(PhoneError, match="at least one call at a positive rate"):
            place_calls(
                target_host="127.0.0.1",
                target_port=5060,
                service="100",
                local_port=free_udp(),
                media_port=free_udp(),
                caller=CALLER,
                count=count,
                rate=rate,
                hang_up_after_ms=100,
            )


def test_sipp_time_and_rtt_formats() -> None:
    assert _duration("00:01:02:500000") == pytest.approx(62.5)
    assert _duration("00:00:00.004000") == pytest.approx(0.004)
    assert _duration("") is None
    assert _duration("soon") is None
    rtt = "Date_ms;response_time_ms;rtd_no\n104.001;3;1\nbroken\n204.001;12;1\n"
    assert _rtt_seconds(rtt) == pytest.approx([0.003, 0.012])
    assert _rtt_seconds("") == []
