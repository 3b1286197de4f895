"""Routing decisions: latency and throughput of the dispatcher, in memory and with the database reservation.

Run ``python -m benchmarks.routing [--postgres URL] [--profile]``. It builds 1,000 agents (physicians, nurses,
pharmacists and general agents, some with expired or unverified credentials, a few frozen, random skills) and
5,000 waiting calls (every consult category, ~5% emergencies, some callbacks) in ``routing.router.Dispatcher``
with ``DEFAULT_RULES``. All agents start busy; each iteration frees one random busy agent and asks
``next_assignment``, so every decision is a real choice among the waiting calls; an assigned call is answered
and a new call arrives, so about 5,000 calls are always waiting.

Measured, p50/p99 per decision and decisions/s:
- in memory: ``next_assignment`` alone (target p99 < 1 ms);
- with the reservation: ``next_assignment`` + ``AgentStore.reserve`` (with the rule's credential groups) +
  ``AgentStore.release`` on SQLite and, with ``--postgres`` or ``MEDHOTLINE_TEST_POSTGRES_URL``, on PostgreSQL
  (a throw-away database is created there and dropped afterwards);
- ``AgentStore.routing_snapshot`` of the 1,000 agents (each node reloads it about twice a second).
Baselines in the same run: ``sorted()`` of the waiting calls by arrival (the least any per-decision ordering of
the whole queue costs) and, per database, a transaction that runs ``SELECT 1`` (the floor of a round trip) and
one that updates one row (the floor of a durable commit, which every reservation is).
``--profile`` prints where ``next_assignment`` spends its time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import get_args

from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session

from compliance.accounts import Account
from ground import db
from routing.model import Agent, CallRequest, Credential
from routing.router import Dispatcher
from routing.rules import DEFAULT_RULES
from routing.store import AgentStore
from routing.tables import AgentRow, AgentSkill, CredentialRow
from telephony.consult import ConsultCategory

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
SKILLS = ("cardiology", "emergency_triage", "pharmacology", "pharmacovigilance", "vaccination", "pediatrics")
CATEGORY_WEIGHTS: dict[ConsultCategory, float] = {
    "general": 0.33,
    "appointment": 0.20,
    "medication": 0.12,
    "vaccination": 0.10,
    "diagnosis": 0.12,
    "adverse_reaction": 0.08,
    "emergency": 0.05,
}
STEP_SECONDS = 0.05  # simulated time between decisions
POSTGRES_ENV = "MEDHOTLINE_TEST_POSTGRES_URL"


@dataclass(frozen=True)
class Speed:
    per_second: float
    p50_ms: float
    p99_ms: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Speed:
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return cls(len(ordered) / sum(ordered), statistics.median(ordered) * 1000, p99 * 1000, len(ordered))

    def line(self, label: str) -> str:
        return (
            f"{label:<40} {self.per_second:>9.0f}/s  p50 {self.p50_ms:8.3f} ms  p99 {self.p99_ms:8.3f} ms  (n={self.n})"
        )


# --- the population ---------------------------------------------------------------------------------------------------


def _credential(rng: random.Random, kind: str, n: int) -> Credential:
    roll = rng.random()
    if roll < 0.08:  # expired
        return Credential(
            kind, f"{kind[:2].upper()}{n:06d}", T0 - 3 * YEAR, T0 - timedelta(days=rng.randint(1, 90)), T0 - 3 * YEAR
        )
    if roll < 0.13:  # uploaded, never verified
        return Credential(kind, f"{kind[:2].upper()}{n:06d}", T0 - YEAR, T0 + 2 * YEAR, None)
    return Credential(
        kind, f"{kind[:2].upper()}{n:06d}", T0 - YEAR, T0 + timedelta(days=rng.randint(5, 900)), T0 - YEAR
    )


def build_agents(rng: random.Random, count: int) -> list[Agent]:
    agents = []
    for n in range(count):
        roll = rng.random()
        if roll < 0.15:
            role, kinds = "physician", ["physician_license"]
        elif roll < 0.40:
            role, kinds = "nurse", ["nurse_license"] + (["vaccination_training"] if rng.random() < 0.4 else [])
        elif roll < 0.50:
            role, kinds = "pharmacist", ["pharmacist_license"]
        else:
            role, kinds = "agent", []
        skills = {s: rng.randint(1, 5) for s in rng.sample(SKILLS, rng.randint(0, 3))}
        agents.append(
            Agent(
                id=f"{role}{n:04d}",
                endpoint=f"ep{n:04d}",
                roles=frozenset({role}),
                credentials=tuple(_credential(rng, kind, n) for kind in kinds),
                skills=skills,
                frozen=rng.random() < 0.01,
            )
        )
    return agents


def new_call(rng: random.Random, at: datetime) -> CallRequest:
    categories = list(CATEGORY_WEIGHTS)
    category = rng.choices(categories, weights=[CATEGORY_WEIGHTS[c] for c in categories])[0]
    return CallRequest(
        call_id=str(uuid.UUID(int=rng.getrandbits(128))),
        category=category,
        priority="emergency" if category == "emergency" else "normal",
        enqueued_at=at,
        callback=category != "emergency" and rng.random() < 0.05,
    )


def build_dispatcher(agents: list[Agent], calls: int, rng: random.Random) -> Dispatcher:
    dispatcher = Dispatcher(DEFAULT_RULES)
    for agent in agents:
        dispatcher.add_agent(agent, T0 - timedelta(hours=1), "offline" if agent.frozen else "busy")
    for _ in range(calls):
        dispatcher.enqueue(new_call(rng, T0 - timedelta(seconds=rng.uniform(0, 1800))))
    return dispatcher


# --- the decision loop ------------------------------------------------------------------------------------------------


@dataclass
class LoopResult:
    decisions: list[float]  # seconds per next_assignment
    totals: list[float]  # seconds per decision including the database work
    assigned: int
    reserved: int


def decision_loop(
    dispatcher: Dispatcher,
    agents: list[Agent],
    iterations: int,
    rng: random.Random,
    reservation: Callable[[str, CallRequest, datetime], bool] | None = None,
) -> LoopResult:
    """Free one busy agent, decide, answer."""
    busy = sorted(a.id for a in agents if not a.frozen)
    busy_set = set(busy)
    result = LoopResult([], [], 0, 0)
    clock = time.perf_counter
    for i in range(iterations):
        now = T0 + timedelta(seconds=i * STEP_SECONDS)
        freed = busy.pop(rng.randrange(len(busy)))
        busy_set.discard(freed)
        dispatcher.agent_available(freed, now)
        started = clock()
        assignment = dispatcher.next_assignment(now)
        decided = clock()
        result.decisions.append(decided - started)
        if assignment is None:
            result.totals.append(decided - started)
            continue
        result.assigned += 1
        if reservation is not None:
            result.reserved += reservation(assignment.agent_id, assignment.call, now)
            result.totals.append(clock() - started)
        dispatcher.answered(assignment.call.call_id, assignment.agent_id, now)
        if assignment.agent_id not in busy_set:
            busy.append(assignment.agent_id)
            busy_set.add(assignment.agent_id)
        call = new_call(rng, now)
        dispatcher.enqueue(call)
    return result


# --- the database -----------------------------------------------------------------------------------------------------


def load_agents(engine: Engine, agents: list[Agent]) -> None:
    """Bulk insert (one transaction): the store's own add methods would take one transaction per row."""
    with Session(engine) as session, session.begin():
        session.add(Account(id="bench_admin", display_name="Bench admin", roles="admin", departments="", frozen=False,
                            session_epoch=0, created_at=T0 - 2 * YEAR, updated_at=T0 - 2 * YEAR))  # fmt: skip
        for agent in agents:
            session.add(
                Account(id=agent.id, display_name=f"Staff {agent.id}", roles=",".join(sorted(agent.roles)),
                        departments="", frozen=agent.frozen, session_epoch=0, created_at=T0 - 2 * YEAR,
                        updated_at=T0 - 2 * YEAR)
            )  # fmt: skip
        session.flush()
        for agent in agents:
            session.add(AgentRow(account_id=agent.id, endpoint=agent.endpoint, languages="zh",
                                 created_at=T0 - 2 * YEAR, updated_at=T0 - 2 * YEAR))  # fmt: skip
        session.flush()
        for agent in agents:
            session.add_all(AgentSkill(account_id=agent.id, skill=s, proficiency=p) for s, p in agent.skills.items())
            for c in agent.credentials:
                session.add(
                    CredentialRow(account_id=agent.id, kind=c.kind, number=c.number, issuer="Health Commission",
                                  valid_from=c.valid_from, valid_until=c.valid_until, verified_at=c.verified_at,
                                  verified_by="bench_admin" if c.verified_at else None, status=c.status,
                                  created_at=T0 - 2 * YEAR)
                )  # fmt: skip


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="medhotline-bench-") as directory:
        yield f"sqlite:///{Path(directory) / 'bench.db'}"


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    with db.scratch_postgres_database(admin_url, "medhotline_bench") as url:
        yield url


def run_database(label: str, url: str, agents: list[Agent], calls: int, iterations: int, seed: int) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        load_agents(engine, agents)
        store = AgentStore.for_engine(engine)

        def round_trip() -> None:
            with engine.begin() as connection:
                connection.execute(text("SELECT 1"))

        first = agents[0].id
        ticks = iter(range(1_000_000))

        def trivial_write() -> None:  # one durable one-row change: the least any reservation can cost
            with engine.begin() as connection:
                connection.execute(
                    update(AgentRow)
                    .where(AgentRow.account_id == first)
                    .values(updated_at=T0 + timedelta(microseconds=next(ticks)))
                )

        floor = [_timed(round_trip) for _ in range(300)]
        writes = [_timed(trivial_write) for _ in range(300)]
        snapshot = [_timed(store.routing_snapshot) for _ in range(20)]
        assert len(store.routing_snapshot()) == len(agents)
        reserves: list[float] = []
        releases: list[float] = []

        def reserve_and_release(agent_id: str, call: CallRequest, at: datetime) -> bool:
            required = DEFAULT_RULES.rule(call.category).required
            started = time.perf_counter()
            reserved = store.reserve(agent_id, call.call_id, "bench", at, required)
            reserves.append(time.perf_counter() - started)
            if reserved:
                started = time.perf_counter()
                store.release(agent_id, call.call_id)
                releases.append(time.perf_counter() - started)
            return reserved

        rng = random.Random(seed)
        dispatcher = build_dispatcher(agents, calls, rng)
        result = decision_loop(dispatcher, agents, iterations, rng, reserve_and_release)
    finally:
        engine.dispose()
    write = Speed.of(writes)
    reserve = Speed.of(reserves)
    print(f"\n{label}: {result.reserved} of {result.assigned} in-memory decisions confirmed by the database")
    print(Speed.of(result.totals).line(f"{label}: decision + reserve + release"))
    print(reserve.line(f"{label}: reserve alone"))
    print(Speed.of(releases).line(f"{label}: release alone"))
    print(Speed.of(floor).line(f"{label}: baseline SELECT 1 tx"))
    print(write.line(f"{label}: baseline one-row UPDATE tx"))
    print(Speed.of(snapshot).line(f"{label}: routing_snapshot ({len(agents)} agents)"))
    print(
        f"{label}: reserve = {reserve.p50_ms / write.p50_ms:.1f}x a one-row write transaction (p50), "
        f"{reserve.p50_ms / Speed.of(result.decisions).p50_ms:.2f}x the in-memory decision (p50)"
    )


def _timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


# --- main -------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5000, help="calls waiting (kept at about this many)")
    parser.add_argument("--decisions", type=int, default=2000, help="in-memory decisions to time (default 2000)")
    parser.add_argument("--db-decisions", type=int, default=500, help="decisions per database (default 500)")
    parser.add_argument(
        "--postgres", default=os.environ.get(POSTGRES_ENV, ""), help=f"admin URL (default ${POSTGRES_ENV})"
    )
    parser.add_argument("--seed", type=int, default=20260302)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the in-memory decisions")
    args = parser.parse_args()

    agents = build_agents(random.Random(args.seed), args.agents)
    roles = {r: sum(1 for a in agents if r in a.roles) for r in ("physician", "nurse", "pharmacist", "agent")}
    credentials = [c for a in agents for c in a.credentials]
    print(
        f"{len(agents)} agents ({', '.join(f'{n} {r}' for r, n in roles.items())}; "
        f"{sum(a.frozen for a in agents)} frozen), {len(credentials)} credentials "
        f"({sum(c.valid_until <= T0 for c in credentials)} expired, {sum(c.verified_at is None for c in credentials)} "
        f"unverified); {args.calls} waiting calls, categories {', '.join(get_args(ConsultCategory))}"
    )

    rng = random.Random(args.seed + 1)
    dispatcher = build_dispatcher(agents, args.calls, rng)
    waiting = list(dispatcher.waiting(T0))
    print(f"emergencies waiting: {sum(c.priority == 'emergency' for c in waiting)} of {len(waiting)}")
    baseline = Speed.of([_timed(lambda: sorted(waiting, key=lambda c: c.enqueued_at)) for _ in range(200)])

    result = decision_loop(dispatcher, agents, args.decisions, rng)
    memory = Speed.of(result.decisions)
    print(f"\nin memory: {result.assigned} of {args.decisions} decisions assigned a call")
    print(memory.line("in memory: Dispatcher.next_assignment"))
    print(baseline.line(f"baseline: sorted() of {len(waiting)} calls"))
    print(
        f"in memory: next_assignment p50 {memory.p50_ms / baseline.p50_ms:.1f}x one sort of the queue; "
        f"target p99 < 1 ms: {'met' if memory.p99_ms < 1 else 'MISSED'} ({memory.p99_ms:.2f} ms)"
    )
    if args.profile:
        profiler = cProfile.Profile()
        again = build_dispatcher(agents, args.calls, random.Random(args.seed + 1))
        profiler.enable()
        decision_loop(again, agents, min(args.decisions, 300), random.Random(args.seed + 3))
        profiler.disable()
        print("\nwhere next_assignment spends its time (cProfile, top 12 by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)

    with sqlite_database() as url:
        run_database("sqlite", url, agents, args.calls, args.db_decisions, args.seed + 2)
    if args.postgres:
        with postgres_database(args.postgres) as url:
            run_database("postgres", url, agents, args.calls, args.db_decisions, args.seed + 2)
    else:
        print(f"\npostgres: skipped (set {POSTGRES_ENV} or pass --postgres URL)")


if __name__ == "__main__":
    main()
