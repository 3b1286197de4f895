"""One service node's outreach scheduler in a process of its own, for ``test_scheduler_nodes_pg``.

``python -m tests.unit.races.scheduler_node URL NAME DIR``: the real ``OutreachScheduler`` with the real
PostgreSQL leader lock and the real job functions (a plan's job opens its round with ``open_followup_round``);
while it leads, it places every due attempt the way the dialer does: claim it (the conditional UPDATE of
``AttemptStore.claim``), and only if the claim succeeded, "dial" it, here one line appended to ``DIR/placed.log``
instead of an ARI originate. ``DIR/NAME.state`` says every tenth of a second whether it leads.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from ground import db
from scheduler.leader import PostgresLeaderLock
from scheduler.policy import DialPolicy, Window
from scheduler.rounds import open_followup_round
from scheduler.runner import Due, OutreachScheduler
from scheduler.store import AttemptStore, PlanStore

# Calls allowed all day but one minute: the test is about who places them, not about calling hours.
POLICY = DialPolicy(quiet=Window.parse("00:00-00:01"))
BEAT = 0.2


def write_state(path: Path, state: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state, encoding="utf-8")
    os.replace(tmp, path)


async def main(url: str, name: str, out: Path) -> None:
    engine = db.make_engine(url)
    sessions = sessionmaker(engine, expire_on_commit=False)
    plans, attempts = PlanStore(sessions), AttemptStore(sessions)

    def due_items() -> list[Due]:
        return [("followup", plan.id, plan.next_due_at) for plan in plans.active()]

    async def on_fire(kind: str, subject_id: str) -> None:
        await asyncio.to_thread(open_followup_round, sessions, attempts, POLICY, subject_id, datetime.now(UTC))

    scheduler = OutreachScheduler(engine, PostgresLeaderLock(engine), due_items=due_items, on_fire=on_fire, beat=BEAT)
    runner = asyncio.create_task(scheduler.run())
    placed = os.open(out / "placed.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    state = out / f"{name}.state"
    while not runner.done():
        leading = scheduler.leading.is_set()
        write_state(state, "leading" if leading else "following")
        if leading:
            now = datetime.now(UTC)
            for attempt in await asyncio.to_thread(attempts.due, now):
                channel = f"outreach-{attempt.id}"
                if await asyncio.to_thread(attempts.claim, attempt.id, name, "trunk", channel, now):
                    # One write with O_APPEND: whole lines, even from two processes.
                    os.write(placed, f"{attempt.id} {attempt.subject_id} {name}\n".encode())
        await asyncio.sleep(0.1)
    await runner  # it only ends by failing: show why


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
