"""Two service nodes racing for the same agents: an agent is never reserved for two calls at once.

Each "node" is its own engine and connection pool on one database (a real PostgreSQL, and a SQLite file), with
many threads reserving the same few agents for different calls. A lock-protected ledger of who holds each agent
is updated right after every successful reserve and right before every release: if the database ever let two
calls hold one agent, the second success finds the ledger entry taken. A deliberately non-atomic reserve (read,
then write) run through the same harness shows that the harness does catch a double reservation.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from compliance.accounts import AccountStore
from ground import db
from routing.store import AgentStore
from routing.tables import AgentRow

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
AGENTS = ("phys1", "phys2", "phys3", "phys4")
REQUIRED = [["physician_license", "nurse_license"]]

Reserve = Callable[[str, str, str, datetime], bool]
Release = Callable[[str, str], bool]


@dataclass
class Node:
    name: str
    engine: Engine
    reserve: Reserve
    release: Release


@dataclass
class Ledger:
    """Who holds each agent, as the racing threads saw it, plus everything that went wrong."""

    holder: dict[str, str | None]
    lock: threading.Lock = field(default_factory=threading.Lock)
    successes: int = 0
    refusals: int = 0
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _prepare(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        accounts = AccountStore.for_engine(engine)
        agents = AgentStore.for_engine(engine)
        accounts.add("verifier", "Medical Affairs", ["admin"], T0 - YEAR)
        for name in AGENTS:
            accounts.add(name, f"Dr {name}", ["physician"], T0 - YEAR)
            agents.add_agent(name, name, T0 - YEAR)
            credential = agents.add_credential(
                name, "physician_license", f"PL-{name}", "Board", T0 - YEAR, T0 + YEAR, T0 - YEAR
            )
            agents.verify_credential(credential, "verifier", T0 - YEAR)
    finally:
        engine.dispose()


def _reserve_with_licence(store: AgentStore) -> Reserve:
    def reserve(agent: str, call_id: str, node: str, at: datetime) -> bool:
        return store.reserve(agent, call_id, node, at, REQUIRED)

    return reserve


@pytest.fixture
def nodes_on(request: pytest.FixtureRequest) -> Iterator[Callable[[str, int], list[Node]]]:
    """Make ``count`` nodes on ``url``, each with its own engine; all engines are disposed after the test."""
    engines: list[Engine] = []

    def make(url: str, count: int) -> list[Node]:
        nodes = []
        for index in range(count):
            engine = db.make_engine(url)
            engines.append(engine)
            store = AgentStore.for_engine(engine)
            nodes.append(Node(f"node{index + 1}", engine, _reserve_with_licence(store), store.release))
        return nodes

    yield make
    for engine in engines:
        engine.dispose()


def race(nodes: list[Node], agents: tuple[str, ...], threads: int, calls: int, hold: float) -> Ledger:
    """Every thread of every node places ``calls`` calls; each call tries the agents in a random order."""
    ledger = Ledger(dict.fromkeys(agents))
    start = threading.Barrier(len(nodes) * threads)

    def worker(node: Node, thread: int) -> None:
        rng = random.Random(f"{node.name}-{thread}")
        start.wait()
        for i in range(calls):
            call_id = f"{node.name}-{thread}-{i}"
            order = list(agents)
            rng.shuffle(order)
            for agent in order:
                try:
                    reserved = node.reserve(agent, call_id, node.name, T0)
                except Exception as exc:
                    with ledger.lock:
                        ledger.errors.append(f"{call_id}: reserve {agent}: {exc}")
                    continue
                if not reserved:
                    with ledger.lock:
                        ledger.refusals += 1
                    continue
                with ledger.lock:
                    ledger.successes += 1
                    if ledger.holder[agent] is not None:
                        ledger.violations.append(f"{agent} reserved for {call_id} while held by {ledger.holder[agent]}")
                    ledger.holder[agent] = call_id
                time.sleep(hold * (0.5 + rng.random()))  # the agent's phone rings for a moment
                with ledger.lock:
                    if ledger.holder[agent] == call_id:
                        ledger.holder[agent] = None
                try:
                    if not node.release(agent, call_id):
                        with ledger.lock:
                            ledger.violations.append(f"{call_id} lost {agent} before releasing it")
                except Exception as exc:
                    with ledger.lock:
                        ledger.errors.append(f"{call_id}: release {agent}: {exc}")
                break

    workers = [
        threading.Thread(target=worker, args=(node, thread), name=f"{node.name}-{thread}")
        for node in nodes
        for thread in range(threads)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in workers), "a racing thread hung"
    return ledger


def _reservations(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as connection:
        rows = connection.execute(select(AgentRow.account_id, AgentRow.reserved_call_id)).all()
    return {account_id: call_id for account_id, call_id in rows}


def _check(ledger: Ledger, nodes: list[Node], total_calls: int) -> None:
    print(f"{total_calls} calls: {ledger.successes} reservations, {ledger.refusals} refusals")
    assert ledger.errors == []
    assert ledger.violations == []
    # The race really was a race: calls were refused because another held the agent, and many calls got one.
    assert ledger.refusals > 0
    assert ledger.successes > total_calls // 4
    assert ledger.successes <= total_calls
    assert set(_reservations(nodes[0].engine).values()) == {None}


@pytest.mark.postgres
def test_two_nodes_on_postgres_never_reserve_an_agent_twice(
    postgres_url: str, nodes_on: Callable[[str, int], list[Node]]
) -> None:
    _prepare(postgres_url)
    nodes = nodes_on(postgres_url, 2)
    ledger = race(nodes, AGENTS, threads=8, calls=50, hold=0.002)
    _check(ledger, nodes, total_calls=2 * 8 * 50)


def test_two_nodes_on_one_sqlite_file_never_reserve_an_agent_twice(
    tmp_path: Path, nodes_on: Callable[[str, int], list[Node]]
) -> None:
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    _prepare(url)
    nodes = nodes_on(url, 2)
    ledger = race(nodes, AGENTS, threads=4, calls=25, hold=0.002)
    _check(ledger, nodes, total_calls=2 * 4 * 25)


@pytest.mark.postgres
def test_the_harness_catches_a_reserve_that_checks_then_writes(
    postgres_url: str, nodes_on: Callable[[str, int], list[Node]]
) -> None:
    """The same harness over a read-then-write reserve: both nodes read "free" before either writes."""
    _prepare(postgres_url)
    nodes = nodes_on(postgres_url, 2)
    both_read = threading.Barrier(2)

    def naive(engine: Engine) -> Reserve:
        def reserve(agent: str, call_id: str, node: str, at: datetime) -> bool:
            with engine.begin() as connection:
                held = connection.scalar(select(AgentRow.reserved_call_id).where(AgentRow.account_id == agent))
            if held is not None:
                return False
            both_read.wait(timeout=30)
            with engine.begin() as connection:
                connection.execute(
                    update(AgentRow)
                    .where(AgentRow.account_id == agent)
                    .values(reserved_call_id=call_id, reserved_by=node, reserved_at=at)
                )
            return True

        return reserve

    for node in nodes:
        node.reserve = naive(node.engine)
    # Each holds the agent for at least 0.25 s, so both hold it at once in the ledger.
    ledger = race(nodes, AGENTS[:1], threads=1, calls=1, hold=0.5)
    assert ledger.successes == 2
    assert ledger.violations, "the harness missed a double reservation"
