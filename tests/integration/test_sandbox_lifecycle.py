"""Asterisk goes away and comes back (clean restart, crash): the service reconnects by itself, nothing leaks.

Runs after the call-path tests (file order) because it restarts the session's Asterisk.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from medhotline.sandbox import Sandbox
from tests.integration.conftest import Hotline

pytestmark = pytest.mark.integration


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return [line.split()[1] for line in fh if line.split()[1].startswith(str(root))]


def wait_gone(sandbox: Sandbox, pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sandbox.pid() is not None or Path(f"/proc/{pid}/fd").exists():
        assert time.monotonic() < deadline, "Asterisk still running"
        time.sleep(0.1)


def assert_next_call_handled(hotline: Hotline) -> None:
    before = hotline.call_ids()
    phone = hotline.call("12320", hang_up_after_ms=1500)
    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert record.transport == "ari"
    assert record.outcome == "caller_hangup"


def test_up_twice_is_harmless_and_mounts_stay_private(hotline: Hotline) -> None:
    first = hotline.sandbox.status()

    again = hotline.sandbox.up()

    assert first.running
    assert again.pid == first.pid
    # /dev and /proc are mounted only inside Asterisk's own mount namespace, never in ours.
    assert mounts_under(hotline.sandbox.root) == []


def test_service_reconnects_after_asterisk_restart(hotline: Hotline) -> None:
    assert hotline.service.proc is not None
    service_pid = hotline.service.proc.pid

    assert hotline.sandbox.down() is True
    assert hotline.sandbox.status().running is False
    assert mounts_under(hotline.sandbox.root) == []
    time.sleep(2)  # let the service notice and back off at least once
    hotline.sandbox.up()
    hotline.service.wait_ready(timeout=60)

    assert_next_call_handled(hotline)
    assert hotline.service.proc.pid == service_pid
    assert hotline.service.proc.poll() is None


def test_down_after_a_crash_cleans_up_and_up_recovers(hotline: Hotline) -> None:
    pid = hotline.sandbox.pid()
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    wait_gone(hotline.sandbox, pid)
    assert hotline.sandbox.down() is False  # nothing left running, stale run files removed
    assert not list((hotline.sandbox.instance_dir / "run").glob("*"))
    assert mounts_under(hotline.sandbox.root) == []
    hotline.sandbox.up()
    hotline.service.wait_ready(timeout=60)

    assert_next_call_handled(hotline)
