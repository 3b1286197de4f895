"""Supervisor actions (medhotline.supervision) on a real migrated SQLite database and audit log, with a recording
stand-in for ARI's REST interface (the ARI part itself runs against Asterisk in tests/integration/test_routing.py):
the reason and the role are checked before anything else, refusals are audited, and an allowed action is audited
before the first request that acts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine

from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore, StoredEntry
from ground import db
from medhotline.supervision import AccessDenied, Supervision, SupervisionError, Supervisor
from routing.ari_supervision import PhoneSettings
from routing.store import AgentStore
from telephony.ari_client import AriClient, AriNotFound

REASON = "coaching the new agent on the script"
SUP = Supervisor("sup.wang")


class FakeAri:
    """ARI's REST interface as far as supervision uses it: bridges and channels by id, snoops, user events. Each
    request that changes something is noted with the number of supervision audit entries stored at that moment."""

    app = "medhotline"

    def __init__(self, engine: Engine, bridges: dict[str, list[str]]) -> None:
        self.engine = engine
        self.bridges = bridges
        self.channels: dict[str, dict[str, Any]] = {c: {"state": "Up"} for b in bridges.values() for c in b}
        self.acted: list[tuple[str, str, Mapping[str, str] | None, int]] = []

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        if method != "GET":
            self.acted.append((method, path, params, len(_supervision_entries(self.engine))))
        parts = path.strip("/").split("/")
        if method == "GET" and parts[0] == "bridges":
            if parts[1] not in self.bridges:
                raise AriNotFound(method, path, 404, "Bridge not found")
            return {"id": parts[1], "channels": self.bridges[parts[1]]}
        if method == "GET" and parts[0] == "channels":
            if parts[1] not in self.channels:
                raise AriNotFound(method, path, 404, "Channel not found")
            return {"id": parts[1], **self.channels[parts[1]]}
        if method == "POST" and path == "/bridges":
            assert params is not None
            self.bridges[params["bridgeId"]] = []
        elif method == "POST" and path == "/channels":
            assert params is not None
            self.channels[params["channelId"]] = {"state": "Up"}
        elif method == "POST" and parts[-1] == "snoop":
            assert params is not None
            self.channels[params["snoopId"]] = {"state": "Up"}
        elif method == "POST" and parts[-1] == "addChannel":
            assert params is not None
            self.bridges[parts[1]] += params["channel"].split(",")
        elif method == "DELETE":
            (self.channels if parts[0] == "channels" else self.bridges).pop(parts[1], None)
        return {}


def _supervision_entries(engine: Engine) -> list[StoredEntry]:
    return [e for e in SqlAuditStore(engine).entries() if json.loads(e.details or "{}").get("kind") == "supervision"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'supervision.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    now = datetime.now(UTC)
    AccountStore.for_engine(engine).add("nurse.li", "Li", ["nurse"], now)
    agents = AgentStore.for_engine(engine)
    agents.add_agent_with_account("sup.wang", "Wang", ["supervisor"], "ep-sup", now)
    agents.add_agent_with_account("gen1", "Gen", ["agent"], "ep-gen1", now)
    calls = db.CallRepository.for_engine(engine)
    for call_id in ("call-1", "call-2"):
        calls.start(call_id=call_id, node="node1", transport="ari", channel_id=f"ch-{call_id}",
                    channel_name="PJSIP/trunk-0000001", flow="hotline", flow_version=None, started_at=now)  # fmt: skip
    yield engine
    engine.dispose()


def _supervision(engine: Engine) -> tuple[Supervision, FakeAri]:
    ari = FakeAri(engine, {"talk-call-1": ["1700000000.1", "agent-6f1c"], "hold-call-2": ["1700000000.2"]})
    supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), cast(AriClient, ari),
                              lambda: datetime.now(UTC), PhoneSettings(poll_seconds=0.01))  # fmt: skip
    return supervision, ari


@pytest.mark.parametrize("reason", [None, "", "short", "call back 13812345678 now"])
async def test_a_missing_or_unusable_reason_is_refused_before_anything_is_done(
    engine: Engine, reason: str | None
) -> None:
    supervision, ari = _supervision(engine)
    with pytest.raises(SupervisionError, match="whisper: ") as caught:
        await supervision.step_in(SUP, "whisper", "call-1", reason)
    assert caught.value.problem == "bad_request"
    assert ari.acted == []
    # Refused by the policy for want of a reason (audited as a denial), without the unusable text itself.
    entries = _supervision_entries(engine)
    assert [e.action for e in entries] == ["denied"]
    assert not entries[0].reason
    assert "13812345678" not in entries[0].details


async def test_anyone_but_a_supervisor_is_refused_and_the_refusal_audited(engine: Engine) -> None:
    supervision, ari = _supervision(engine)
    for act in (supervision.step_in(Supervisor("nurse.li"), "listen", "call-1", REASON),
                supervision.escalate(Supervisor("gen1"), "call-2", REASON),
                supervision.pause(Supervisor("gen1"), "gen1", REASON)):  # fmt: skip
        with pytest.raises(AccessDenied):
            await act
    assert ari.acted == []
    denied = [(e.actor, json.loads(e.details).get("kind")) for e in SqlAuditStore(engine).entries()
              if e.outcome == "denied"]  # fmt: skip
    assert denied == [("nurse.li", "supervision"), ("gen1", "supervision"), ("gen1", "supervision")]
    assert AgentStore.for_engine(engine).view("gen1").paused_reason is None


@pytest.mark.parametrize("call_id", ["no-such-call", "bad id!"])
async def test_an_unknown_call_is_refused_as_unknown(engine: Engine, call_id: str) -> None:
    supervision, ari = _supervision(engine)
    with pytest.raises(SupervisionError) as caught:
        await supervision.step_in(SUP, "listen", call_id, REASON)
    assert caught.value.problem == "unknown_call"
    assert ari.acted == []


async def test_a_whisper_is_audited_with_its_reason_before_the_phone_is_dialled(engine: Engine) -> None:
    supervision, ari = _supervision(engine)
    tap, watching = await supervision.step_in(SUP, "whisper", "call-1", REASON)
    (entry,) = _supervision_entries(engine)
    assert (entry.actor, entry.action, entry.outcome, entry.reason) == ("sup.wang", "change", "success", REASON)
    details = json.loads(entry.details)
    assert (details["action"], details["call"], details["spy"], details["whisper"]) == ("whisper", "call-1",
                                                                                        "both", "out")  # fmt: skip
    assert all(audited == 1 for *_, audited in ari.acted), "an ARI request was made before the audit entry"
    (snoop,) = [(path, params) for _, path, params, _ in ari.acted if path.endswith("/snoop")]
    assert snoop[0] == "/channels/agent-6f1c/snoop"  # the agent's leg, never the patient's
    assert snoop[1] is not None
    assert (snoop[1]["spy"], snoop[1]["whisper"]) == ("both", "out")
    assert ari.bridges["talk-call-1"] == ["1700000000.1", "agent-6f1c"]  # nothing added to the conversation
    assert sorted(ari.bridges[tap.bridge]) == sorted([tap.supervisor_channel, tap.snoop_channel])
    del ari.channels[tap.snoop_channel]  # the call ends: its agent leg, and with it the snoop, goes
    await watching
    assert tap.supervisor_channel not in ari.channels
    assert tap.bridge not in ari.bridges


async def test_a_call_not_talking_to_an_agent_is_refused_unaudited(engine: Engine) -> None:
    supervision, ari = _supervision(engine)
    with pytest.raises(SupervisionError) as caught:
        await supervision.step_in(SUP, "barge", "call-2", REASON)
    assert caught.value.problem == "not_talking"
    assert ari.acted == []
    assert _supervision_entries(engine) == []


async def test_escalate_and_pause_are_audited_before_they_act(engine: Engine) -> None:
    supervision, ari = _supervision(engine)
    await supervision.escalate(SUP, "call-2", REASON)
    ((method, path, params, audited),) = ari.acted
    assert (method, path, audited) == ("POST", "/events/user/medhotline_supervisor_escalate", 1)
    assert params is not None
    assert params["source"] == "channel:1700000000.2"
    with pytest.raises(SupervisionError) as caught:
        await supervision.escalate(SUP, "call-1", REASON)  # talking, not waiting
    assert caught.value.problem == "not_waiting"
    await supervision.pause(SUP, "gen1", "needs a break after a hard call")
    assert AgentStore.for_engine(engine).view("gen1").paused_reason == "needs a break after a hard call"
    actions = [(json.loads(e.details)["action"], e.reason) for e in _supervision_entries(engine)]
    assert actions == [("escalate", REASON), ("pause", "needs a break after a hard call")]
