"""Three nodes' dispatchers choosing among one cluster queue, over many rounds: no agent is ever offered twice.

Every node runs its real routing engine (own pool, own lease) on one database; callers arrive on random nodes
with random categories and priorities, and each node's dispatcher may claim any node's caller. What the phones
would see is one ledger across the nodes: an offer of an agent who is already talking is a double reservation.
Every call must be answered, every offer must reach the node that holds the caller, and at the end no agent is
reserved and the queue is empty.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from routing.cluster_tables import QueuedCall
from routing.model import CallPriority, CallRequest
from telephony.consult import RouteCategory
from tests.unit.routing.cluster_nodes import Cluster, Node, eventually, next_offer, seed

ROUNDS = 4
CALLS_PER_ROUND = 18
CATEGORIES: tuple[RouteCategory, ...] = ("diagnosis", "general", "emergency", "appointment", "general")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'medhotline.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


async def test_three_nodes_never_reserve_one_agent_twice(url: str) -> None:
    seed(url)
    cluster = Cluster(url)
    nodes = [cluster.node(name, refresh=0.02) for name in ("A", "B", "C")]
    talking: dict[str, str] = {}  # agent → call, across all nodes
    problems: list[str] = []
    answered: list[str] = []
    rng = random.Random(15)

    async def caller(node: Node, call_id: str) -> None:
        category = rng.choice(CATEGORIES)
        priority: CallPriority = "emergency" if category == "emergency" else "normal"
        ticket = node.routing.enqueue(CallRequest(call_id, category, priority, datetime.now(UTC)))
        offer = await next_offer(ticket, timeout=60)
        agent_id = offer.assignment.agent_id
        if offer.assignment.call.call_id != call_id:
            problems.append(f"{call_id}: offer for {offer.assignment.call.call_id}")
        if agent_id in talking:
            problems.append(f"{agent_id} offered {call_id} on {node.name} while talking to {talking[agent_id]}")
        talking[agent_id] = call_id
        await node.routing.answered(call_id, agent_id)
        await asyncio.sleep(rng.uniform(0.0, 0.03))
        if talking.get(agent_id) == call_id:
            del talking[agent_id]
        await node.routing.finished(call_id, agent_id)
        answered.append(call_id)

    with capture_logs() as logs:
        try:
            for node in nodes:
                node.start()
            await eventually(lambda: all(n.lease.live for n in nodes), 10, "leases acquired")
            for round_ in range(ROUNDS):
                callers = []
                for n in range(CALLS_PER_ROUND):
                    node = rng.choice(nodes)
                    callers.append(caller(node, f"{node.name}-{round_}-{n}"))
                await asyncio.wait_for(asyncio.gather(*callers), timeout=120)
            await eventually(
                lambda: all(v.reserved_call_id is None for v in nodes[0].agents.routing_snapshot()),
                5,
                "agents released",
            )
            nodes_rung: set[str] = set()
            for call_id in answered:
                rings = nodes[0].agents.rings(call_id)
                owner = call_id.split("-")[0]
                assert all(r.node == owner for r in rings), (call_id, rings)  # only the holding node dials
                nodes_rung.update(r.node for r in rings)
            assert nodes_rung == {"A", "B", "C"}
            with nodes[0].agents._sessions() as session:
                assert session.scalar(select(func.count()).select_from(QueuedCall)) == 0
        finally:
            await cluster.close()
    assert problems == []
    assert len(answered) == ROUNDS * CALLS_PER_ROUND
    # The nodes really chose for each other, not only for their own callers.
    assert [e for e in logs if e["event"] == "routing.offer_for_node"]
