"""A service killed (SIGKILL) while a patient is in the IVR leaves the patient in Stasis with nobody driving the
call; the restarted service sends them back to the dialplan's ARI entry (medhotline.orphans): the patient hears
the greeting again (RTP to the phone after the new call started) instead of silence until they give up, and the
old call's record is closed as ``node_lost``."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medhotline.free_ports import free_rtp_range
from medhotline.service_process import ServiceProcess
from tests.integration.ari_faults import RtpSniffer
from tests.integration.conftest import running_hotline

pytestmark = pytest.mark.integration

# A second of audio (one packet per 20 ms) reached the phone after the restarted call began.
HEARD = 50
# The phone stays on the line this long after the answer: the kill, the restart and the greeting fit in it.
HOLD_MS = 22_000


def test_a_caller_left_by_a_killed_service_hears_the_greeting_again(tmp_path: Path) -> None:
    with running_hotline(tmp_path, "orphans") as hotline:
        before = hotline.call_ids()
        media_port = free_rtp_range(4)
        with RtpSniffer(media_port).running() as heard, ThreadPoolExecutor(1) as pool:
            phone = pool.submit(
                hotline.call,
                hotline.config.hotline.number,
                hang_up_after_ms=HOLD_MS,
                media_port=media_port,
                timeout=60,
            )
            deadline = time.monotonic() + 15
            while not (new := [r for r in hotline.repo.list_recent(20) if r.id not in before]):
                assert time.monotonic() < deadline, "the call never reached the service"
                time.sleep(0.1)
            old = new[0]
            time.sleep(1.0)  # in the greeting
            hotline.service.kill()
            killed_at = time.time()

            restarted = ServiceProcess(hotline.config, hotline.config_path, hotline.log_path)
            hotline.service = restarted  # running_hotline stops whichever service runs at the end
            restarted.start(timeout=40)

            # The same channel starts the hotline afresh: a new record, on the same Asterisk channel.
            deadline = time.monotonic() + 15
            while True:
                again = [
                    r
                    for r in hotline.repo.list_recent(20)
                    if r.id not in before and r.id != old.id and r.channel_id == old.channel_id
                ]
                if again:
                    break
                assert time.monotonic() < deadline, f"the caller was not restarted; see {hotline.log_path}"
                time.sleep(0.2)
            result = phone.result()

        assert result.succeeded, result.errors
        assert "HUNGUP_BY_PATIENT" in result.stamps  # nobody hung up on them: they stayed until they chose
        restarted_at = again[0].started_at.timestamp()
        assert restarted_at > killed_at
        assert heard.after(restarted_at) >= HEARD, f"{heard.after(restarted_at)} RTP packets after the restart"

        closed = hotline.repo.get(old.id)
        assert closed is not None
        assert closed.outcome == "node_lost", closed
        assert closed.ended_at is not None
        assert closed.ended_at.timestamp() >= killed_at
