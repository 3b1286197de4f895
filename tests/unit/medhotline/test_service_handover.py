"""The hand-over of FastAGI calls to the ARI queue: only the service's own, well-formed hand-overs are queued."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from ground import db
from ground.config import load_config
from ivr.flow_registry import FlowRegistry
from medhotline.asterisk_config import AsteriskCredentials
from medhotline.service import HotlineService
from routing.engine import EngineSettings, RoutingEngine
from routing.rules import DEFAULT_RULES
from telephony.ari_channel import AriCallChannel
from telephony.ari_client import AriClient
from telephony.channel import CallInfo
from tests.unit.routing.test_routing_engine import FakeAgentTable

DIALPLANS = Path(__file__).resolve().parents[3] / "dialplans"
CHANNEL = "1700000000.9"


class VariableAri:
    """ARI answering channel-variable reads from a dict, recording every request."""

    def __init__(self, variables: dict[str, str]) -> None:
        self.variables = variables
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if request.url.path.endswith("/variable"):
            name = request.url.params.get("variable", "")
            if name not in self.variables:
                return httpx.Response(404, json={"message": "Provided variable was not found"})
            return httpx.Response(200, json={"value": self.variables[name]})
        return httpx.Response(204)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[db.CallRepository]:
    url = f"sqlite:///{tmp_path / 'medhotline.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        yield db.CallRepository.for_engine(engine)
    finally:
        engine.dispose()


def service_with(repo: db.CallRepository, tmp_path: Path, ari: VariableAri) -> HotlineService:
    config = load_config(None, environ={"MEDHOTLINE__SERVICE__STATE_DIR": str(tmp_path)})
    flows = FlowRegistry(DIALPLANS)
    flows.refresh()
    engine = RoutingEngine(FakeAgentTable(), DEFAULT_RULES, EngineSettings(node="n1"))
    service = HotlineService(config, repo, flows, AsteriskCredentials("u", "p", "u", "s"), engine=engine)
    service.ari = AriClient("127.0.0.1", 8088, "u", "p", "medhotline", transport=httpx.MockTransport(ari))
    return service


def started_call(repo: db.CallRepository) -> str:
    call_id = str(uuid.uuid4())
    repo.start(
        call_id=call_id,
        node="n1",
        transport="fastagi",
        channel_id="agi-1",
        channel_name="PJSIP/patients-1",
        flow="hotline",
        flow_version=None,
        started_at=datetime.now(UTC),
    )
    return call_id


@pytest.mark.parametrize(
    ("call_id", "category", "priority"),
    [
        ("not-a-uuid", "general", "normal"),
        (str(uuid.uuid4()), "general", "normal"),  # well-formed but no such call
        (None, "surgery", "normal"),  # a real call, an unknown category
        (None, "general", "urgent"),
    ],
)
async def test_a_bad_hand_over_is_refused_and_hung_up(
    repo: db.CallRepository, tmp_path: Path, call_id: str | None, category: str, priority: str
) -> None:
    variables = {
        "MEDHOTLINE_CALL_ID": call_id or started_call(repo),
        "MEDHOTLINE_CATEGORY": category,
        "MEDHOTLINE_PRIORITY": priority,
    }
    ari = VariableAri(variables)
    service = service_with(repo, tmp_path, ari)
    channel = AriCallChannel(service.ari, CallInfo(CHANNEL, "PJSIP/patients-1", "ari", "", ""))
    with capture_logs() as logs:
        await service.handle_handed_over(channel)
    await service.ari.aclose()
    assert ("DELETE", f"/ari/channels/{CHANNEL}") in ari.requests
    assert not any(path.startswith("/ari/bridges") for _, path in ari.requests)  # never queued
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["routing.hand_over_invalid"]
    assert service.engine is not None
    assert service.engine.waiting_count() == 0


async def test_a_hand_over_without_its_variables_is_refused(repo: db.CallRepository, tmp_path: Path) -> None:
    ari = VariableAri({})
    service = service_with(repo, tmp_path, ari)
    channel = AriCallChannel(service.ari, CallInfo(CHANNEL, "PJSIP/patients-1", "ari", "", ""))
    with capture_logs() as logs:
        await service.handle_handed_over(channel)
    await service.ari.aclose()
    assert ("DELETE", f"/ari/channels/{CHANNEL}") in ari.requests
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["routing.hand_over_unreadable"]


def test_only_a_handed_over_end_is_refined(repo: db.CallRepository) -> None:
    handed = started_call(repo)
    repo.finish(handed, outcome="routed", ended_at=datetime.now(UTC), route_category="general")
    assert repo.refine_routed(handed, outcome="caller_hangup", ended_at=datetime.now(UTC))
    record = repo.get(handed)
    assert record is not None
    assert (record.outcome, record.route_category) == ("caller_hangup", "general")
    other = started_call(repo)
    repo.finish(other, outcome="completed", ended_at=datetime.now(UTC))
    assert not repo.refine_routed(other, outcome="error", ended_at=datetime.now(UTC))
    assert not repo.refine_routed(handed, outcome="error", ended_at=datetime.now(UTC))  # refined once only
    with pytest.raises(ValueError, match="not a final call outcome"):
        repo.refine_routed(handed, outcome="in_progress", ended_at=datetime.now(UTC))


def test_queue_milestones_do_not_move_the_last_ivr_step(repo: db.CallRepository) -> None:
    call_id = started_call(repo)
    now = datetime.now(UTC)
    repo.add_step(call_id, flow="hotline", node="general", node_type="route", edge="general", input=None, at=now)
    repo.add_step(
        call_id, flow="queue", node="queued", node_type="queue", edge="general", input=None, at=now,
        moves_last_step=False,
    )  # fmt: skip
    record = repo.get(call_id)
    assert record is not None
    assert record.last_step == "general"
    assert [s.node for s in repo.steps(call_id)] == ["general", "queued"]
