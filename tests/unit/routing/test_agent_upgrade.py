"""The queue's conversation watches the agent's leg: the upgrade keys, once, upgrade the call (over a fake ARI)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from structlog.testing import capture_logs

from routing.ari_queue import UPGRADED_SOUND, CallerQueue, QueueSettings
from routing.engine import RoutingEngine
from telephony.ari_channel import AriCallChannel, AriDispatcher
from telephony.ari_client import AriClient
from telephony.channel import CallInfo


class FakeAri:
    app = "medhotline"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str] | None]] = []

    async def request(self, method: str, path: str, params: dict[str, str] | None = None) -> Any:
        self.requests.append((method, path, params))
        return {}


def _queue(ari: FakeAri, upgrades: list[tuple[str, str]], keys: str = "*0") -> CallerQueue:
    async def on_upgrade(call_id: str, agent_id: str) -> None:
        upgrades.append((call_id, agent_id))

    return CallerQueue(
        cast(AriClient, ari),
        AriDispatcher(),
        cast(RoutingEngine, None),  # not used while the conversation runs
        settings=QueueSettings(upgrade_keys=keys),
        sound=str,
        escalation_groups={},
        on_upgrade=on_upgrade,
    )


def _dtmf(digit: str) -> dict[str, Any]:
    return {"type": "ChannelDtmfReceived", "digit": digit, "channel": {"id": "agent-1"}}


async def _run(
    keys: str, digits: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str | None, str | None]], FakeAri]:
    ari = FakeAri()
    upgrades: list[tuple[str, str]] = []
    steps: list[tuple[str, str | None, str | None]] = []

    async def step(node: str, edge: str | None, value: str | None) -> None:
        steps.append((node, edge, value))

    leg = AriCallChannel(cast(AriClient, ari), CallInfo("agent-1", "PJSIP/nurse", "ari", "", ""))
    for digit in digits:
        leg.deliver(_dtmf(digit))
    leg.deliver({"type": "ChannelHangupRequest", "channel": {"id": "agent-1"}})
    with capture_logs():
        await asyncio.wait_for(_queue(ari, upgrades, keys)._agent_keys(leg, "call-1", "nurse", step), timeout=5)
    return upgrades, steps, ari


async def test_the_upgrade_keys_upgrade_the_call_once_and_the_agent_hears_it() -> None:
    upgrades, steps, ari = await _run("*0", "1*0*0")
    assert upgrades == [("call-1", "nurse")]
    assert steps == [("upgraded", "emergency", "nurse")]
    plays = [(path, params) for method, path, params in ari.requests if method == "POST" and "/play/" in path]
    assert len(plays) == 1
    assert plays[0][0].startswith("/channels/agent-1/play/")
    assert plays[0][1] == {"media": f"sound:{UPGRADED_SOUND}"}


async def test_other_keys_do_nothing() -> None:
    upgrades, steps, ari = await _run("*0", "0*12#")
    assert (upgrades, steps, ari.requests) == ([], [], [])


async def test_disabled_upgrade_keys_do_nothing() -> None:
    upgrades, steps, _ = await _run("", "*0")
    assert (upgrades, steps) == ([], [])
