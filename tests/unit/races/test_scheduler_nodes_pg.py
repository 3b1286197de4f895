"""The outreach scheduler's leader election across processes: two scheduler nodes, each its own process (the
real ``OutreachScheduler`` and PostgreSQL advisory lock, ``scheduler_node``) on one PostgreSQL. One leads at a
time; when the leader is SIGKILLed, the other leads within a few beats (the database releases the lock when the
dead process's connection closes); and no outreach call is placed twice, before, across or after the takeover.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from ground import db
from scheduler.leader import ADVISORY_KEY
from scheduler.store import PlanStore, Threshold

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[3]
PATIENT = "cd" * 16
# How long the follower may take to lead after the leader's death: a few of its 0.2 s beats, and the database
# noticing the closed connection, with room for a loaded machine (the service's own beat is 2 s).
TAKEOVER = 8.0


def eventually(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Nodes:
    def __init__(self, url: str, out: Path) -> None:
        self.url, self.out = url, out
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with (self.out / f"{name}.stdout").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.unit.races.scheduler_node", self.url, name, str(self.out)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def state(self, name: str) -> str:
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = (self.out / f"{name}.stdout").read_text(errors="replace")[-1500:]
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")
        path = self.out / f"{name}.state"
        return path.read_text(encoding="utf-8") if path.exists() else "starting"

    def leaders(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if self.state(name) == "leading"]

    def placed(self) -> list[tuple[str, str, str]]:
        path = self.out / "placed.log"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return [(a, p, n) for a, p, n in (line.split() for line in lines)]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def nodes(postgres_url: str, tmp_path: Path) -> Iterator[Nodes]:
    db.upgrade(postgres_url)
    running = Nodes(postgres_url, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def add_plans(engine: Engine, count: int, due_in: float) -> list[str]:
    plans = PlanStore(sessionmaker(engine, expire_on_commit=False))
    now = datetime.now(UTC)
    return [
        plans.add(
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
        ).id
        for _ in range(count)
    ]


def lock_holders(engine: Engine) -> int:
    """Sessions holding the scheduler's advisory lock, as PostgreSQL itself sees them."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": ADVISORY_KEY},
            ).scalar_one()
        )


def test_one_leader_at_a_time_the_other_takes_over_after_sigkill_and_no_call_is_placed_twice(
    nodes: Nodes, postgres_url: str
) -> None:
    engine = db.make_engine(postgres_url)
    try:
        nodes.start("node1")
        nodes.start("node2")
        both = ("node1", "node2")
        eventually("both nodes running", lambda: all(nodes.state(n) != "starting" for n in both))
        eventually("a leader", lambda: len(nodes.leaders(both)) == 1)
        # For a while, with both alive: always exactly one leads, in the nodes' view and in PostgreSQL's.
        for _ in range(10):
            assert len(nodes.leaders(both)) == 1, [nodes.state(n) for n in both]
            assert lock_holders(engine) == 1
            time.sleep(0.1)
        (leader,) = nodes.leaders(both)
        follower = next(n for n in both if n != leader)

        first = add_plans(engine, 3, due_in=1.0)
        eventually("the first plans' calls placed", lambda: {p for _, p, _ in nodes.placed()} == set(first))
        assert {n for _, _, n in nodes.placed()} == {leader}

        # Plans due while the leader dies: the follower must take them over, and place each call once.
        second = add_plans(engine, 3, due_in=1.5)
        nodes.procs[leader].send_signal(signal.SIGKILL)
        nodes.procs[leader].wait()
        killed = time.monotonic()
        eventually(f"{follower} leading", lambda: nodes.state(follower) == "leading", TAKEOVER)
        took_over = time.monotonic() - killed
        assert lock_holders(engine) == 1
        eventually(
            "the second plans' calls placed", lambda: {p for _, p, _ in nodes.placed()} == set(first) | set(second)
        )
        time.sleep(1.0)  # a second placement would show up here

        placed = nodes.placed()
        attempts = Counter(a for a, _, _ in placed)
        assert all(count == 1 for count in attempts.values()), attempts
        per_plan = Counter(p for _, p, _ in placed)
        assert per_plan == Counter({p: 1 for p in first + second}), per_plan
        assert {n for _, p, n in placed if p in second} == {follower}
        print(f"takeover after SIGKILL: {took_over:.2f} s")  # shown with -s, for the docs
    finally:
        engine.dispose()
