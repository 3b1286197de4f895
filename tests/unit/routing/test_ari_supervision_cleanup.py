"""Taking a supervision down (routing.ari_supervision.disconnect) against a scripted stand-in for ARI's REST
interface: what is gone already is skipped, a failed removal is tried again, and one that keeps failing is logged,
never raised (the other removals still run)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from structlog.testing import capture_logs

from routing.ari_supervision import disconnect
from routing.supervision import tap
from telephony.ari_client import AriClient, AriError, AriNotFound, AriUnavailable
from telephony.channel import ChannelError

TAP = tap("whisper", "call-1", ["1700000000.12", "agent-6f1c"], "abc")


class ScriptedAri:
    """Answers each DELETE with the next outcome scripted for its path (None: success)."""

    def __init__(self, script: dict[str, list[ChannelError | None]]) -> None:
        self.script = script
        self.deletes: list[str] = []

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        assert method == "DELETE"
        self.deletes.append(path)
        outcomes = self.script.get(path, [])
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        return {}


def _run(ari: ScriptedAri) -> None:
    asyncio.run(disconnect(cast(AriClient, ari), TAP))


def test_everything_is_removed_once_and_what_is_gone_already_is_skipped() -> None:
    phone = f"/channels/{TAP.supervisor_channel}"
    ari = ScriptedAri({phone: [AriNotFound("DELETE", phone, 404, "Channel not found")]})
    _run(ari)
    assert ari.deletes == [phone, f"/channels/{TAP.snoop_channel}", f"/bridges/{TAP.bridge}"]


def test_a_removal_that_fails_once_is_tried_again() -> None:
    bridge = f"/bridges/{TAP.bridge}"
    ari = ScriptedAri({bridge: [AriError("DELETE", bridge, 500, "Internal Server Error")]})
    with capture_logs() as logs:
        _run(ari)
    assert ari.deletes.count(bridge) == 2
    assert not [e for e in logs if e["event"] == "supervision.cleanup_failed"]


def test_a_removal_that_keeps_failing_is_logged_and_the_rest_still_runs() -> None:
    phone = f"/channels/{TAP.supervisor_channel}"
    ari = ScriptedAri({phone: [AriUnavailable("timed out"), AriUnavailable("timed out")]})
    with capture_logs() as logs:
        _run(ari)
    assert ari.deletes == [phone, phone, f"/channels/{TAP.snoop_channel}", f"/bridges/{TAP.bridge}"]
    (failed,) = [e for e in logs if e["event"] == "supervision.cleanup_failed"]
    assert failed["path"] == phone
    assert failed["log_level"] == "error"
