"""Surge mode's full queue turning a route-first call away: the caller is answered before they hear why, and the
overflow step joins the call's held record writes instead of racing ahead of the call's row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from ground import db
from ground.config import load_config
from ivr.flow_registry import FlowRegistry
from medhotline.asterisk_config import AsteriskCredentials
from medhotline.service import HotlineService, _CallWrites
from medhotline.surge import SurgeState
from routing.callback_store import ModeStore
from routing.engine import EngineSettings, RoutingEngine
from routing.model import CallRequest
from routing.rules import DEFAULT_RULES
from routing.surge import parse_profile
from telephony.ari_channel import AriCallChannel
from telephony.ari_client import AriClient
from telephony.channel import CallInfo
from tests.unit.routing.test_routing_engine import FakeAgentTable

DIALPLANS = Path(__file__).resolve().parents[3] / "dialplans"
CHANNEL = "1700000000.7"
FULL = "name: p\nbulletin: 公告。\noverflow: hangup\ncapacity: {general: 1}\n"


class PlayingAri:
    """ARI that finishes every playback at once (the event goes to ``channel``), recording every request."""

    def __init__(self) -> None:
        self.channel: AriCallChannel | None = None
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if "/play/" in path and self.channel is not None:
            playback = {"id": path.rsplit("/", 1)[1], "state": "done"}
            self.channel.deliver({"type": "PlaybackFinished", "playback": playback})
        return httpx.Response(204)


@pytest.fixture
def engine_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'medhotline.db'}"
    db.upgrade(url)
    return url


async def test_a_route_first_call_turned_away_is_answered_and_its_steps_follow_its_record(
    engine_url: str, tmp_path: Path
) -> None:
    bind = db.make_engine(engine_url)
    repo = db.CallRepository.for_engine(bind)
    config = load_config(None, environ={"MEDHOTLINE__SERVICE__STATE_DIR": str(tmp_path)})
    flows = FlowRegistry(DIALPLANS)
    flows.refresh()
    engine = RoutingEngine(FakeAgentTable(), DEFAULT_RULES, EngineSettings(node="n1"))
    service = HotlineService(config, repo, flows, AsteriskCredentials("u", "p", "u", "s"), engine=engine)
    ari = PlayingAri()
    service.ari = AriClient("127.0.0.1", 8088, "u", "p", "medhotline", transport=httpx.MockTransport(ari))
    service.surge = SurgeState(ModeStore.for_engine(bind), flows, engine, config.hotline.flow, service.speak)
    service.surge.profile = parse_profile(FULL)
    engine.enqueue(CallRequest("waiting", "general", "normal", datetime.now(UTC)))  # the queue is full
    channel = AriCallChannel(service.ari, CallInfo(CHANNEL, "PJSIP/patients-1", "ari", "", ""))
    ari.channel = channel
    call_id = str(uuid.uuid4())
    # As the service holds a route-first call's writes: the row is not written while the call is decided.
    writes = _CallWrites(service._record, paused=True)
    writes.add(
        "start", repo.start, call_id=call_id, node="n1", transport="ari", channel_id=CHANNEL,
        channel_name="PJSIP/patients-1", flow="hotline", flow_version=None, started_at=datetime.now(UTC),
    )  # fmt: skip
    try:
        turned_away = await service._overflowed(channel, call_id, "general", "normal", writes, answer=True)
        await writes.drain()
    finally:
        await service.ari.aclose()
        bind.dispose()
    assert turned_away
    on_channel = [
        (method, [*path.split("/"), ""][4]) for method, path in ari.requests if path.startswith("/ari/channels/")
    ]
    # Answered before the first prompt; the message and the goodbye, then the hang-up.
    assert on_channel == [("POST", "answer"), ("POST", "play"), ("POST", "play"), ("DELETE", "")]
    assert [(s.node, s.edge) for s in repo.steps(call_id)] == [("overflow", "general")]
