"""Two service nodes' routing engines on one real database, racing for the same agents.

Each node has its own dispatcher, its own waiting calls and its own connection pool; they share only the agent
table. The telephony is simulated: every offer is checked against a global record of who is talking to whom at
that moment, answered at once, and finished after a short conversation. No agent may ever be offered to two
calls at the same time, and every call must be answered.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from compliance.accounts import AccountStore
from ground import db
from routing.engine import EngineSettings, Offer, RoutingEngine
from routing.model import CallRequest
from routing.rules import DEFAULT_RULES
from routing.store import AgentStore

AGENTS = {"doc1": "physician_license", "doc2": "physician_license", "nurse1": "nurse_license", "gen1": None}
CALLS_PER_NODE = 24


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'medhotline.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def seed(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    now = datetime.now(UTC)
    AccountStore(sessions).add("admin1", "Admin", ["admin"], now)
    store = AgentStore(sessions)
    for agent_id, kind in AGENTS.items():
        store.add_agent_with_account(agent_id, agent_id, ["physician" if kind else "agent"], agent_id, now)
        if kind is not None:
            cred = store.add_credential(
                agent_id, kind, "L-1", "卫健委", now - timedelta(days=1), now + timedelta(days=9), now
            )
            store.verify_credential(cred, "admin1", now)
    engine.dispose()


async def test_two_nodes_never_ring_one_agent_for_two_calls(database_url: str) -> None:
    seed(database_url)
    engines = [db.make_engine(database_url) for _ in range(2)]
    nodes = [
        RoutingEngine(
            AgentStore(sessionmaker(engine, expire_on_commit=False)),
            DEFAULT_RULES,
            EngineSettings(node=f"node{i}", refresh_interval=0.02, wrap_up=0.0),
        )
        for i, engine in enumerate(engines, start=1)
    ]
    talking: dict[str, str] = {}  # agent → call, across both nodes: what the phones would see
    overlaps: list[str] = []
    answered: list[str] = []
    rng = random.Random(7)
    # Categories without a skill step, so no call waits for a specialist nobody here has (that is tested elsewhere).
    categories = ["diagnosis", "general", "emergency", "appointment", "general"]

    async def caller(node: RoutingEngine, call_id: str) -> None:
        category = rng.choice(categories)
        priority = "emergency" if category == "emergency" else "normal"
        ticket = node.enqueue(CallRequest(call_id, category, priority, datetime.now(UTC)))  # type: ignore[arg-type]
        while True:
            item = await asyncio.wait_for(ticket.items.get(), timeout=60)
            if not isinstance(item, Offer):
                continue
            agent_id = item.assignment.agent_id
            if agent_id in talking:
                overlaps.append(f"{agent_id} offered {call_id} while talking to {talking[agent_id]}")
            talking[agent_id] = call_id
            await node.answered(call_id, agent_id)
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            if talking.get(agent_id) == call_id:
                del talking[agent_id]
            await node.finished(call_id, agent_id)
            answered.append(call_id)
            return

    loops = [asyncio.create_task(node.run()) for node in nodes]
    try:
        callers = [caller(node, f"{node.settings.node}-{n}") for node in nodes for n in range(CALLS_PER_NODE)]
        await asyncio.wait_for(asyncio.gather(*callers), timeout=120)
        # The last wrap-ups release their agents on a timer after `finished` returns: let them run before the
        # nodes stop, or a loaded machine stops a node with a release still pending.
        reader = AgentStore(sessionmaker(engines[0], expire_on_commit=False))
        for _ in range(200):
            if all(view.reserved_call_id is None for view in reader.routing_snapshot()):
                break
            await asyncio.sleep(0.05)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for node in nodes:
            node.close()
    assert overlaps == []
    assert len(answered) == 2 * CALLS_PER_NODE
    # The nodes really competed: agents took calls from both of them.
    store = AgentStore(sessionmaker(engines[0], expire_on_commit=False))
    nodes_per_agent: dict[str, set[str]] = {}
    for call_id in answered:
        for ring in store.rings(call_id):
            nodes_per_agent.setdefault(ring.account_id, set()).add(ring.node)
    assert any(nodes == {"node1", "node2"} for nodes in nodes_per_agent.values()), nodes_per_agent
    assert all(view.reserved_call_id is None for view in store.routing_snapshot())
    for engine in engines:
        engine.dispose()
