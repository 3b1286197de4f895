"""The active scheduler with real APScheduler jobs in the database: a due plan fires once, a restart between
scheduling and firing loses nothing, a job that came due while every node was down still fires once, and of two
nodes only the leader fires — until it dies and the other takes over. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from scheduler.leader import FileLeaderLock, LeaderLock, PostgresLeaderLock, leader_lock_for
from scheduler.policy import DialPolicy, Window
from scheduler.rounds import open_followup_round
from scheduler.runner import JOB_TABLE, OutreachScheduler
from scheduler.store import AttemptStore, PlanStore, Threshold

PATIENT = "ab" * 16
# Calls allowed all day but one minute: these tests are about when jobs fire, not about calling hours.
POLICY = DialPolicy(quiet=Window.parse("00:00-00:01"))


class Node:
    """One service node's scheduler over the shared database, counting what it fired."""

    def __init__(self, engine: Engine, lock: LeaderLock) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.plans = PlanStore(self.sessions)
        self.attempts = AttemptStore(self.sessions)
        self.fired: list[str] = []
        self.scheduler = OutreachScheduler(engine, lock, due_items=self.due_items, on_fire=self.on_fire, beat=0.2)
        self.task: asyncio.Task[None] | None = None

    def due_items(self) -> list[tuple[str, str, datetime]]:
        return [("followup", p.id, p.next_due_at) for p in self.plans.active()]

    async def on_fire(self, kind: str, subject_id: str) -> None:
        self.fired.append(subject_id)
        await asyncio.to_thread(
            open_followup_round, self.sessions, self.attempts, POLICY, subject_id, datetime.now(UTC)
        )

    def start(self) -> Node:
        self.task = asyncio.create_task(self.scheduler.run())
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def lock_for(engine: Engine, tmp_path: Path) -> LeaderLock:
    return leader_lock_for(engine, tmp_path / "state")


def add_plan(engine: Engine, due_in: float) -> str:
    plans = PlanStore(sessionmaker(engine, expire_on_commit=False))
    now = datetime.now(UTC)
    plan = plans.add(
        patient_id=PATIENT,
        condition="hypertension",
        interval_days=7,
        window=("00:00", "23:59"),
        flow="followup",
        thresholds={"systolic": Threshold(90, 139)},
        responsible="doc1",
        first_due=now + timedelta(seconds=due_in),
        at=now,
        by="test",
    )
    return plan.id


def rounds(engine: Engine, plan_id: str) -> int:
    return len(AttemptStore(sessionmaker(engine)).for_subject(plan_id))


async def until(condition: object, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


def persisted_jobs(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {JOB_TABLE}")).scalar_one())


async def test_a_due_plan_fires_once_and_advances(engine: Engine, tmp_path: Path) -> None:
    plan = add_plan(engine, due_in=1.0)
    node = Node(engine, lock_for(engine, tmp_path)).start()
    try:
        await until(lambda: rounds(engine, plan) == 1)
        await asyncio.sleep(1.0)  # a second fire would show up here
    finally:
        await node.stop()
    assert node.fired == [plan]
    assert rounds(engine, plan) == 1
    next_due = PlanStore(sessionmaker(engine)).get(plan).next_due_at
    assert next_due > datetime.now(UTC) + timedelta(days=6)


async def test_a_restart_between_scheduling_and_firing_fires_once(engine: Engine, tmp_path: Path) -> None:
    plan = add_plan(engine, due_in=3.0)
    first = Node(engine, lock_for(engine, tmp_path)).start()
    await until(lambda: persisted_jobs(engine) >= 1)  # the job is in the database, not only in memory
    await first.stop()
    assert first.fired == []
    second = Node(engine, lock_for(engine, tmp_path)).start()
    try:
        await until(lambda: rounds(engine, plan) == 1)
        await asyncio.sleep(1.0)
    finally:
        await second.stop()
    assert second.fired == [plan]
    assert rounds(engine, plan) == 1


async def test_a_job_due_while_every_node_was_down_fires_once_at_start(engine: Engine, tmp_path: Path) -> None:
    plan = add_plan(engine, due_in=1.5)
    first = Node(engine, lock_for(engine, tmp_path)).start()
    await until(lambda: persisted_jobs(engine) >= 1)
    await first.stop()
    await asyncio.sleep(2.5)  # the due time passes with no scheduler running
    second = Node(engine, lock_for(engine, tmp_path)).start()
    try:
        await until(lambda: rounds(engine, plan) == 1)
        await asyncio.sleep(1.0)
    finally:
        await second.stop()
    assert rounds(engine, plan) == 1


async def test_of_two_nodes_only_the_leader_fires_and_the_other_takes_over(engine: Engine, tmp_path: Path) -> None:
    one = Node(engine, lock_for(engine, tmp_path)).start()
    two = Node(engine, lock_for(engine, tmp_path)).start()
    try:
        await until(lambda: one.scheduler.leading.is_set() or two.scheduler.leading.is_set())
        await asyncio.sleep(1.0)
        assert one.scheduler.leading.is_set() != two.scheduler.leading.is_set(), "exactly one node leads"
        leader, follower = (one, two) if one.scheduler.leading.is_set() else (two, one)
        plan = add_plan(engine, due_in=1.0)
        await until(lambda: rounds(engine, plan) == 1)
        await asyncio.sleep(1.0)
        assert rounds(engine, plan) == 1
        assert (leader.fired, follower.fired) == ([plan], [])
        await leader.stop()  # the leader dies: its lock goes with it
        await until(follower.scheduler.leading.is_set)
        second_plan = add_plan(engine, due_in=1.0)
        await until(lambda: rounds(engine, second_plan) == 1)
        assert follower.fired == [second_plan]
    finally:
        for node in (one, two):
            if node.task is not None and not node.task.done():
                await node.stop()


def test_the_lock_kind_follows_the_database(engine: Engine, tmp_path: Path) -> None:
    lock = lock_for(engine, tmp_path)
    assert isinstance(lock, PostgresLeaderLock if engine.dialect.name == "postgresql" else FileLeaderLock)
    other = lock_for(engine, tmp_path)
    try:
        assert lock.try_acquire()
        assert not other.try_acquire()
        assert lock.held()
        lock.release()
        assert other.try_acquire()
    finally:
        lock.release()
        other.release()
