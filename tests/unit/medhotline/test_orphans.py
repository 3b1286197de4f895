"""What an earlier service process left in Asterisk: the pure classification of ARI's /channels and /bridges,
the sweep applying it over a fake ARI (httpx.MockTransport), and the closing of the call records left behind."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from structlog.testing import capture_logs

from ground import db
from medhotline.ari_events import AriEventRouter
from medhotline.orphan_sweep import sweep_orphans, watch_conversation
from medhotline.orphans import (
    DestroyBridge,
    HangUp,
    KeepConversation,
    OrphanError,
    Restart,
    classify,
)
from telephony.ari_channel import AriDispatcher
from telephony.ari_client import AriClient

APP = "medhotline"
OLD = "2026-12-06T04:00:00.000+0000"
START = datetime(2026, 12, 6, 4, 10, tzinfo=UTC)


def chan(
    cid: str, *, app: str | None = APP, args: str = "hotline", name: str | None = None, created: str = OLD
) -> dict[str, Any]:
    """A channel as ARI lists it; ``app=None``: not in Stasis (in Dial, or still ringing)."""
    dialplan = (
        {"context": "hotline-ari", "exten": "s", "priority": 1, "app_name": "Stasis", "app_data": f"{app},{args}"}
        if app is not None
        else {"context": "medhotline-transfer", "exten": "2001", "priority": 3, "app_name": "Dial", "app_data": "x"}
    )
    return {
        "id": cid,
        "name": name or f"PJSIP/patients-{cid}",
        "state": "Up",
        "caller": {"name": "", "number": "13912345678"},
        "dialplan": dialplan,
        "creationtime": created,
    }


def bridge(bid: str, *members: str) -> dict[str, Any]:
    return {"id": bid, "technology": "simple_bridge", "bridge_type": "mixing", "channels": list(members)}


# -- classify --------------------------------------------------------------------------------------------------


def test_a_patient_left_in_the_ivr_is_restarted() -> None:
    assert classify([chan("p1")], [], app=APP) == [Restart("p1")]


def test_a_waiting_patient_leaves_the_holding_bridge_first_then_is_restarted() -> None:
    actions = classify([chan("p1")], [bridge("hold-c1", "p1")], app=APP)
    assert actions == [DestroyBridge("hold-c1", "holding"), Restart("p1")]


def test_a_conversation_of_patient_and_agent_is_kept_and_nothing_else_is_touched() -> None:
    channels = [chan("p1"), chan("agent-1", args="agent,c1", name="PJSIP/agent-0001")]
    # A bridge recording adds a Recorder channel of its own: still a conversation.
    actions = classify(channels, [bridge("talk-c1", "p1", "agent-1", "Recorder/rec-1")], app=APP)
    assert actions == [KeepConversation("talk-c1", "p1", "agent-1")]


def test_an_agent_leg_without_a_patient_is_hung_up_and_its_bridge_destroyed() -> None:
    ringing = chan("agent-2", app=None)  # dialled, not yet answered: not in Stasis yet
    alone = chan("agent-3", args="agent,c3")
    actions = classify([ringing, alone], [bridge("talk-c3", "agent-3")], app=APP)
    assert actions == [
        HangUp("agent-2", "agent_leg"),
        HangUp("agent-3", "agent_leg"),
        DestroyBridge("talk-c3", "leftover"),
    ]


def test_supervision_recording_and_listening_helpers_are_hung_up() -> None:
    channels = [
        chan("supervisor-t1", args="supervisor,c1"),
        chan("supsnoop-t1", args="supervisor"),
        chan("snoop-rec1", args="snoop", name="Snoop/p1-00000001"),
        chan("p1-listen", name="UnicastRTP/127.0.0.1:4000-0x1"),
        chan("p1"),
    ]
    bridges = [bridge("supervise-t1", "supervisor-t1", "supsnoop-t1"), bridge("listen-x", "p1", "p1-listen")]
    assert classify(channels, bridges, app=APP) == [
        HangUp("p1-listen", "media_tap"),
        HangUp("snoop-rec1", "snoop"),
        HangUp("supervisor-t1", "supervisor_leg"),
        HangUp("supsnoop-t1", "snoop"),
        DestroyBridge("supervise-t1", "leftover"),
        DestroyBridge("listen-x", "leftover"),
        Restart("p1"),
    ]


def test_outbound_calls_answered_are_restarted_ringing_ones_cancelled() -> None:
    channels = [chan("outreach-7", args="outbound,7"), chan("callback-9", app=None)]
    assert classify(channels, [], app=APP) == [HangUp("callback-9", "unanswered_outbound"), Restart("outreach-7")]


def test_empty_leftover_bridges_are_destroyed_foreign_ones_left_alone() -> None:
    bridges = [bridge("talk-c5"), bridge("hold-c6"), bridge("dial-bridge-1", "other"), bridge("b0")]
    assert classify([], bridges, app=APP) == [
        DestroyBridge("talk-c5", "empty"),
        DestroyBridge("hold-c6", "holding"),
    ]


def test_what_is_not_ours_is_not_touched() -> None:
    channels = [
        chan("t1", app=None),  # a caller transferred to a department: in Dial, not in Stasis
        chan("o1", app="another-app"),  # another application's call
        chan("o2", app="medhotline2"),  # an application whose name merely starts like ours
    ]
    assert classify(channels, [bridge("x", "t1", "dept-1")], app=APP) == []


def test_the_running_process_own_and_new_channels_are_left_alone() -> None:
    new = chan("p-new", created="2026-12-06T04:10:00.500+0000")  # created after this process started
    channels = [chan("p-owned"), new, chan("agent-own", args="agent,c9"), chan("p-old")]
    bridges = [bridge("hold-c9", "p-owned"), bridge("listen-new", "p-new")]
    actions = classify(channels, bridges, app=APP, owned={"p-owned", "agent-own"}, since=START)
    assert actions == [Restart("p-old")]


def test_an_unreadable_creation_time_counts_as_left_behind() -> None:
    assert classify([chan("p1", created="yesterday")], [], app=APP, since=START) == [Restart("p1")]


@pytest.mark.parametrize(
    ("channels", "bridges", "where"),
    [
        ({"id": "x"}, [], "must both be lists"),
        ([{"name": "PJSIP/x"}], [], "/channels[0]"),
        ([chan("p1"), "p2"], [], "/channels[1]"),
        ([], [{"id": "b", "channels": "p1"}], "/bridges[0] (b)"),
        ([], [{"id": ""}], "/bridges[0]"),
    ],
)
def test_a_malformed_listing_is_refused_naming_the_item(channels: Any, bridges: Any, where: str) -> None:
    with pytest.raises(OrphanError, match=re.escape(where)):
        classify(channels, bridges, app=APP)


# -- the sweep over a fake ARI ---------------------------------------------------------------------------------


class FakeAri:
    """ARI's REST side: /channels and /bridges listings, then records every request; ``missing`` answer 404,
    ``refused`` 500."""

    def __init__(
        self,
        channels: list[Any],
        bridges: list[Any],
        *,
        missing: frozenset[str] = frozenset(),
        refused: frozenset[str] = frozenset(),
    ) -> None:
        self.channels = channels
        self.bridges = bridges
        self.missing = missing
        self.refused = refused
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/ari")
        self.requests.append((request.method, path, dict(request.url.params)))
        if request.method == "GET" and path == "/channels":
            return httpx.Response(200, json=self.channels)
        if request.method == "GET" and path == "/bridges":
            return httpx.Response(200, json=self.bridges)
        if any(path.startswith(p) for p in self.missing):
            return httpx.Response(404, json={"message": "Channel not found"})
        if any(path.startswith(p) for p in self.refused):
            return httpx.Response(500, json={"message": "Internal error"})
        if request.method == "GET" and path.startswith("/bridges/"):
            found = [b for b in self.bridges if f"/bridges/{b['id']}" == path]
            return httpx.Response(200, json=found[0]) if found else httpx.Response(404, json={"message": "gone"})
        return httpx.Response(204)

    def changes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests if m != "GET"]


def client(fake: FakeAri) -> AriClient:
    return AriClient("127.0.0.1", 8088, "medhotline", "secret", APP, transport=httpx.MockTransport(fake))


async def test_the_sweep_applies_the_actions_in_order_and_logs_ids_only() -> None:
    fake = FakeAri(
        [chan("p1"), chan("agent-2", app=None)], [bridge("hold-c1", "p1")], missing=frozenset({"/channels/agent-2"})
    )
    with capture_logs() as logs:
        await sweep_orphans(client(fake))
    assert fake.changes() == [
        ("DELETE", "/channels/agent-2"),  # gone meanwhile: 404, skipped quietly
        ("DELETE", "/bridges/hold-c1"),
        ("POST", "/channels/p1/continue"),
    ]
    assert fake.requests[-1][2] == {"context": "hotline-ari", "extension": "s", "priority": "1"}
    events = [(e["event"], e.get("channel_id") or e.get("bridge_id")) for e in logs]
    assert events == [("orphans.bridge_destroyed", "hold-c1"), ("orphans.restarted", "p1")]
    assert "13912345678" not in json.dumps(logs, default=str)


async def test_a_patient_who_cannot_be_restarted_hears_the_unavailable_prompt_then_is_hung_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("medhotline.orphan_sweep._APOLOGY_SECONDS", 0.0)
    fake = FakeAri([chan("p1")], [], refused=frozenset({"/channels/p1/continue"}))
    await sweep_orphans(client(fake))
    changes = [c for c in fake.changes() if not c[1].endswith("/continue")]
    assert changes == [("POST", "/channels/p1/play"), ("DELETE", "/channels/p1")]
    play = next(params for m, p, params in fake.requests if p == "/channels/p1/play")
    assert play == {"media": "sound:medhotline/unavailable"}


async def test_an_unreadable_listing_changes_nothing() -> None:
    fake = FakeAri([{"no": "id"}], [])
    with capture_logs() as logs:
        assert await sweep_orphans(client(fake)) == []
    assert fake.changes() == []
    assert logs[0]["event"] == "orphans.sweep_failed"


async def test_a_kept_conversation_ends_both_sides_when_one_hangs_up() -> None:
    fake = FakeAri([], [bridge("talk-c1", "p1", "agent-1")])
    kept = KeepConversation("talk-c1", "p1", "agent-1")
    watcher = asyncio.create_task(watch_conversation(client(fake), kept, every=0.01))
    await asyncio.sleep(0.05)
    assert not watcher.done()  # both still talking: left alone
    assert fake.changes() == []
    fake.bridges = [bridge("talk-c1", "p1")]  # the agent hung up
    await asyncio.wait_for(watcher, 2)
    assert fake.changes() == [
        ("DELETE", "/channels/p1"),
        ("DELETE", "/channels/agent-1"),
        ("DELETE", "/bridges/talk-c1"),
    ]


# -- the records ----------------------------------------------------------------------------------------------


def test_the_calls_an_earlier_process_left_in_progress_are_closed_once(engine: Engine) -> None:
    repo = db.CallRepository(sessionmaker(engine, expire_on_commit=False))
    start = datetime.now(UTC)

    def call(call_id: str, node: str, started: datetime) -> None:
        repo.start(
            call_id=call_id,
            node=node,
            transport="ari",
            channel_id=f"ch-{call_id}",
            channel_name="PJSIP/patients-1",
            flow="hotline",
            flow_version=None,
            started_at=started,
        )

    call("old", "node-a", start - timedelta(minutes=2))
    call("ended", "node-a", start - timedelta(minutes=3))
    repo.finish("ended", outcome="caller_hangup", ended_at=start - timedelta(minutes=1))
    call("other-node", "node-b", start - timedelta(minutes=2))
    call("new", "node-a", start + timedelta(seconds=1))  # this process's own call

    assert repo.close_left_behind("node-a", started_before=start, at=start, reason="process died") == 1
    assert repo.close_left_behind("node-a", started_before=start, at=start, reason="again") == 0  # not twice
    old = repo.get("old")
    assert old is not None
    assert (old.outcome, old.error, old.ended_at) == ("node_lost", "process died", start)
    outcomes = {cid: r.outcome for cid in ("ended", "other-node", "new") if (r := repo.get(cid)) is not None}
    assert outcomes == {"ended": "caller_hangup", "other-node": "in_progress", "new": "in_progress"}


# -- when the sweep runs ----------------------------------------------------------------------------------------


def test_the_sweep_is_asked_for_at_the_first_connection_only() -> None:
    fake = FakeAri([], [])
    asked: list[str] = []

    async def nothing(_: object) -> None:
        return None

    router = AriEventRouter(
        lambda: client(fake),
        AriDispatcher(),
        default_flow=lambda: "hotline",
        on_call=nothing,
        on_handed_over=nothing,
        spawn=lambda coro: coro.close(),
        on_first_connect=lambda: asked.append("sweep"),
    )
    router._connected()
    router._connected()  # a reconnect: the calls are this process's own
    assert asked == ["sweep"]
