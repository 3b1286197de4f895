"""Several nodes' routing engines on one database: one queue for the cluster, leases, takeover of a dead node.

Each node is a real :class:`RoutingEngine` with its own connection pool, its own lease and a :class:`ClusterStore`
over the same database (PostgreSQL, and a SQLite file); the telephony is the tickets. They show that the queue is
one for the cluster (an emergency on one node goes before an older normal call on another, and the node holding
the caller is the one that gets the offer), that a node which stops renewing its lease has its agents freed and
its calls closed as lost by another node, and that a node which finds its lease taken over dispatches no more.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from ground.db import CallRepository
from ground.leases import NodeLease
from routing.cluster import ClusterStore
from routing.cluster_tables import QueuedCall
from routing.model import CallRequest
from tests.unit.routing.cluster_nodes import Cluster, eventually, next_offer, offers, seed


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'medhotline.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def _now() -> datetime:
    return datetime.now(UTC)


async def test_an_emergency_on_one_node_goes_before_an_older_normal_call_on_another(url: str) -> None:
    seed(url, ("doc1",))
    cluster = Cluster(url)
    a, b = cluster.node("A"), cluster.node("B")
    try:
        await a.lease.acquire()
        await b.lease.acquire()
        a.agents.pause("doc1", "meeting", _now())  # the one agent is busy while both calls arrive
        normal = a.routing.enqueue(CallRequest("a-normal", "general", "normal", _now() - timedelta(minutes=5)))
        await a.routing.step()
        emergency = b.routing.enqueue(CallRequest("b-emergency", "emergency", "emergency", _now()))
        await b.routing.step()  # B publishes its call; doc1 is still paused
        a.agents.unpause("doc1", _now())
        # Node A decides alone: its own call waited five minutes longer, but the emergency goes first, and A
        # does not ring doc1 itself: the caller is on B.
        await a.routing.step()
        assert list(offers(normal)) == []
        assert [r.node for r in a.agents.rings("b-emergency")] == ["B"]
        assert a.agents.view("doc1").reserved_by == "B"
        await b.routing.step()  # B picks the offer up and dials
        offer = await next_offer(emergency, timeout=5)
        assert offer.assignment.agent_id == "doc1"
        # The emergency's conversation ends; then (and only then) the normal call gets doc1.
        await b.routing.answered("b-emergency", "doc1")
        assert list(offers(normal)) == []
        await b.routing.finished("b-emergency", "doc1")
        a.start()
        assert (await next_offer(normal)).assignment.agent_id == "doc1"
    finally:
        await cluster.close()


async def test_a_normal_claim_is_refused_while_an_emergency_it_has_not_read_waits(url: str) -> None:
    """The guard that holds when a node decides on a queue read just before the emergency arrived."""
    seed(url, ("doc1",))
    cluster = Cluster(url)
    a, b = cluster.node("A"), cluster.node("B")
    try:
        await a.lease.acquire()
        await b.lease.acquire()
        a.agents.pause("doc1", "meeting", _now())
        normal = a.routing.enqueue(CallRequest("a-normal", "general", "normal", _now() - timedelta(minutes=5)))
        await a.routing.step()  # A has read the queue: only its own call
        b.routing.enqueue(CallRequest("b-emergency", "emergency", "emergency", _now()))
        await b.routing.step()
        a.agents.unpause("doc1", _now())
        # A decides on its last read of the queue, which has no emergency: the database refuses the normal call.
        [view] = [v for v in a.cluster.queue_view("A") if v.request.call_id == "a-normal"]
        assert a.lease.epoch is not None
        known = a.routing.dispatcher.waiting_emergencies()
        assert known == []
        refused = a.cluster.claim(view, "doc1", "A", a.lease.epoch, _now(), known_emergencies=known)
        assert refused == "emergency"
        assert a.agents.view("doc1").reserved_call_id is None  # nothing written
        assert a.agents.rings("a-normal") == []
        assert list(offers(normal)) == []
        # Having read it (and so considered it), the claim would be allowed: the guard is about unseen calls.
        ring = a.cluster.claim(view, "doc1", "A", a.lease.epoch, _now(), known_emergencies=["b-emergency"])
        assert isinstance(ring, int)
    finally:
        await cluster.close()


async def test_a_node_that_stops_renewing_loses_its_agents_and_calls_to_another(url: str) -> None:
    seed(url, ("doc1", "doc2"))
    cluster = Cluster(url)
    lease = 1.5
    a, b = cluster.node("A", lease_seconds=lease), cluster.node("B", lease_seconds=lease)
    calls = CallRepository(a.agents._sessions)
    try:
        a.start()
        b.start()
        await eventually(lambda: a.lease.live and b.lease.live, 10, "both leases acquired")
        calls.start(
            call_id="a-talking",
            node="A",
            transport="ari",
            channel_id="1.1",
            channel_name="PJSIP/trunk-1",
            flow="main",
            flow_version=None,
            started_at=_now(),
        )
        talking = a.routing.enqueue(CallRequest("a-talking", "general", "normal", _now()))
        offer = await next_offer(talking)
        await a.routing.answered("a-talking", offer.assignment.agent_id)
        held = offer.assignment.agent_id
        a.agents.pause("doc2" if held == "doc1" else "doc1", "meeting", _now())  # so A's next caller waits
        a.routing.enqueue(CallRequest("a-waiting", "general", "normal", _now()))
        await eventually(
            lambda: any(v.request.call_id == "a-waiting" for v in b.cluster.queue_view("B")), 10, "A's call queued"
        )
        stopped = _now()
        a.lease.stall()  # A hangs: no more renewals
        # The agent A held is free again within the lease time after A's last renewal (plus one tick of B's).
        await eventually(lambda: a.agents.view(held).reserved_call_id is None, 10, "A's agent released")
        freed = _now()
        record = calls.get("a-talking")
        assert record is not None
        assert record.outcome == "node_lost"
        assert record.ended_at is not None
        assert record.error is not None
        assert "node A" in record.error
        assert "closed by node B" in record.error
        with a.agents._sessions() as session:
            row = session.get(NodeLease, "A")
            assert row is not None
            assert (row.state, row.taken_over_by) == ("lost", "B")
            assert row.taken_over_at is not None
            assert row.taken_over_at >= row.expires_at  # never taken over before it expired
            assert row.taken_over_at - row.renewed_at <= timedelta(seconds=lease + lease / 3 + 1.0)
            assert session.scalars(select(QueuedCall).where(QueuedCall.node == "A")).all() == []
        assert freed - stopped <= timedelta(seconds=lease + lease / 3 + 3.0)
        assert [r.outcome for r in a.agents.rings("a-talking")] == ["answered"]
        # B carries on: its caller gets the freed agent.
        b_call = b.routing.enqueue(CallRequest("b-call", "general", "normal", _now()))
        assert (await next_offer(b_call)).assignment.agent_id == held
    finally:
        await cluster.close()


async def test_a_node_that_comes_back_after_its_lease_was_taken_over_does_not_dispatch(url: str) -> None:
    seed(url, ("doc1",))
    cluster = Cluster(url)
    a, b = cluster.node("A", lease_seconds=1.0), cluster.node("B", lease_seconds=1.0)
    try:
        with capture_logs() as logs:
            a.start()
            b.start()
            await eventually(lambda: a.lease.live and b.lease.live, 10, "both leases acquired")
            old_epoch = a.lease.epoch
            assert old_epoch is not None
            a.lease.stall()
            await eventually(lambda: _lease_state(b.cluster, "A") == "lost", 10, "A's lease taken over")
            a.lease.stall(stalled=False)  # A wakes up
            await eventually(lambda: a.lease.lost, 10, "A noticed")
            ticket = a.routing.enqueue(CallRequest("a-late", "emergency", "emergency", _now()))
            waiting_on_b = b.routing.enqueue(CallRequest("b-call", "general", "normal", _now()))
            # doc1 is free and A's caller is an emergency, yet A rings nobody: B gets doc1 for its own caller.
            assert (await next_offer(waiting_on_b)).assignment.agent_id == "doc1"
            await a.routing.step()
            assert list(offers(ticket)) == []
            assert all(v.request.call_id != "a-late" for v in b.cluster.queue_view("B"))
        lost = [e for e in logs if e["event"] == "cluster.lease_lost"]
        assert len(lost) == 1
        assert lost[0]["log_level"] == "error"
        # The database refuses the old epoch too, whatever the node believes.
        assert b.cluster.renew("A", old_epoch, _now(), 1.0) is False
        b.routing.enqueue(CallRequest("b-other", "general", "normal", _now()))
        await b.routing.step()  # published; doc1 is busy with b-call, so it waits
        [view] = [v for v in b.cluster.queue_view("B") if v.request.call_id == "b-other"]
        assert b.cluster.claim(view, "doc1", "A", old_epoch, _now()) == "lease"
    finally:
        await cluster.close()


def _lease_state(store: ClusterStore, node: str) -> str | None:
    with store._sessions() as session:
        row = session.get(NodeLease, node)
        return None if row is None else row.state


async def test_a_restart_under_the_same_name_cleans_up_what_the_crashed_process_held(url: str) -> None:
    seed(url, ("doc1",))
    cluster = Cluster(url)
    a = cluster.node("A")
    try:
        a.start()
        ticket = a.routing.enqueue(CallRequest("a-1", "general", "normal", _now()))
        offer = await next_offer(ticket)
        await a.routing.answered("a-1", offer.assignment.agent_id)
        await a.stop()  # a crash: nothing released, the lease still live
        assert a.agents.view("doc1").reserved_by == "A"
        again = cluster.node("A")
        epoch = await again.lease.acquire()
        assert epoch == 2
        assert again.agents.view("doc1").reserved_call_id is None
        assert [r.outcome for r in again.agents.rings("a-1")] == ["answered"]
    finally:
        await cluster.close()
