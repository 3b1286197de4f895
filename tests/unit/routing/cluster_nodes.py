"""Several routing engines in one process as the nodes of a cluster, on one real database (test helper)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from compliance.accounts import AccountStore
from ground import db
from routing.cluster import ClusterStore
from routing.engine import ClusterLink, EngineSettings, Offer, RoutingEngine, Ticket
from routing.lease import LeaseKeeper, LeaseSettings
from routing.rules import DEFAULT_RULES
from routing.store import AgentStore

PHYSICIANS = ("doc1", "doc2", "doc3", "doc4")


def seed(url: str, agents: tuple[str, ...] = PHYSICIANS) -> None:
    """Migrate and add ``agents``, each a physician with a verified licence valid today."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        now = datetime.now(UTC)
        AccountStore.for_engine(engine).add("admin1", "Admin", ["admin"], now - timedelta(days=1))
        store = AgentStore.for_engine(engine)
        for agent_id in agents:
            store.add_agent_with_account(agent_id, agent_id, ["physician"], agent_id, now - timedelta(days=1))
            cred = store.add_credential(
                agent_id, "physician_license", "L-1", "卫健委", now - timedelta(days=2), now + timedelta(days=9), now
            )
            store.verify_credential(cred, "admin1", now - timedelta(hours=1))
    finally:
        engine.dispose()


@dataclass
class Node:
    name: str
    db_engine: Engine
    agents: AgentStore
    cluster: ClusterStore
    lease: LeaseKeeper
    routing: RoutingEngine
    loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.loop = asyncio.create_task(self.routing.run())

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.cancel()
            await asyncio.gather(self.loop, return_exceptions=True)
            self.loop = None
        self.routing.close()


@dataclass
class Cluster:
    url: str
    nodes: list[Node] = field(default_factory=list)

    def node(self, name: str, *, lease_seconds: float = 3.0, refresh: float = 0.05) -> Node:
        engine = db.make_engine(self.url)
        sessions = sessionmaker(engine, expire_on_commit=False)
        agents, cluster = AgentStore(sessions), ClusterStore(sessions)
        lease = LeaseKeeper(cluster, name, LeaseSettings(lease_seconds))
        routing = RoutingEngine(
            agents,
            DEFAULT_RULES,
            EngineSettings(node=name, refresh_interval=refresh, wrap_up=0.0),
            cluster=ClusterLink(cluster, lease),
        )
        node = Node(name, engine, agents, cluster, lease, routing)
        self.nodes.append(node)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
        # A cancelled engine loop may still have a database call running in a worker thread: let those return
        # their connections before the pools are disposed, or a connection checked in afterwards stays open
        # until the garbage collector finds it (a ResourceWarning in whichever test runs then).
        await asyncio.get_running_loop().shutdown_default_executor()
        for node in self.nodes:
            node.db_engine.dispose()


def offers(ticket: Ticket) -> Iterator[Offer]:
    """The offers in a ticket now, without waiting (other items stay)."""
    kept = []
    while not ticket.items.empty():
        item = ticket.items.get_nowait()
        if isinstance(item, Offer):
            yield item
        else:
            kept.append(item)
    for item in kept:
        ticket.items.put_nowait(item)


async def next_offer(ticket: Ticket, timeout: float = 20.0) -> Offer:
    async with asyncio.timeout(timeout):
        while True:
            item = await ticket.items.get()
            if isinstance(item, Offer):
                return item


async def eventually(condition: object, timeout: float, what: str) -> float:
    """Poll ``condition()`` until true; the seconds it took. AssertionError naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():  # type: ignore[operator]
        if loop.time() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return loop.time() - start
