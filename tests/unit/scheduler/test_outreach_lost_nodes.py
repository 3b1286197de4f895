"""Outreach calls of a node that died: the scheduler leader closes them once its lease is taken over.

Two other nodes hold leases (``ground.leases``): ``node-b`` dies (its lease is taken over by the leader's node),
``node-c`` lives (a previous leader still on its calls). Checked on SQLite and PostgreSQL: the dead node's
``dialing`` and ``answered`` attempts are closed as ``node_lost`` with the takeover's time, once, only after the
ring time has passed, and their rounds retried or escalated under the policy; the live node's attempt and the
leader's own are never touched; the trunk cap is freed; two leaders racing close each attempt once; a node that
restarted under its name (live lease again) is left to its own recovery.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from ground.leases import LostLease, NodeLease, acquire_lease, take_over_lease
from scheduler.store import AttemptRecord
from scheduler.tables import OutreachAttempt
from tests.unit.scheduler import test_outreach_dialer
from tests.unit.scheduler.test_outreach_dialer import Desk, attempts, fire, plan_for

# The dialer tests' desk (a real key service, registry and database, ARI faked at the HTTP edge), reused here.
desk = test_outreach_dialer.desk

DEAD, LIVE = "node-b", "node-c"
LEASE = 6.0
RING = timedelta(seconds=5)  # the desk's MEDHOTLINE__OUTREACH__RING_SECONDS


def _leader(desk: Desk) -> str:
    return desk.outreach.dialer._node


def _leases(sessions: sessionmaker[Session], at: datetime, *nodes: str) -> None:
    with sessions.begin() as session:
        for node in nodes:
            acquire_lease(session, node, at, LEASE)


def _take_over(sessions: sessionmaker[Session], node: str, by: str, at: datetime) -> None:
    with sessions.begin() as session:
        row = session.get(NodeLease, node)
        assert row is not None
        lease = LostLease(row.node, row.epoch, row.renewed_at, row.expires_at)
        assert take_over_lease(session, lease, by, at)


def _placed(desk: Desk, node: str, *, answered: bool = False) -> AttemptRecord:
    """A new round's first attempt, claimed by ``node`` (and answered there if asked) at the desk's time."""
    fire(desk, plan_for(desk))
    store = desk.outreach.attempts
    (due,) = [a for a in store.due(desk.clock.now) if a.node is None]
    assert store.claim(due.id, node, "patients", f"outreach-{due.id}", desk.clock.now)
    if answered:
        assert store.answered(due.id, "00000000-0000-4000-8000-0000000000aa")
    return store.get(due.id)


def _row(desk: Desk, attempt_id: str) -> OutreachAttempt:
    (row,) = [a for a in attempts(desk) if a.id == attempt_id]
    return row


def _rounds(desk: Desk, round_id: str) -> list[OutreachAttempt]:
    return [a for a in attempts(desk) if a.round_id == round_id]


async def test_a_dead_nodes_calls_are_closed_once_and_retried_a_live_nodes_never(desk: Desk) -> None:
    sessions = desk.outreach._sessions
    start = desk.clock.now
    _leases(sessions, start, _leader(desk), DEAD, LIVE)
    ringing = _placed(desk, DEAD)
    talking = _placed(desk, DEAD, answered=True)
    other = _placed(desk, LIVE)
    own = _placed(desk, _leader(desk))
    assert desk.outreach.attempts.in_flight("patients") == 4

    lost_at = start + timedelta(seconds=10)
    _take_over(sessions, DEAD, _leader(desk), lost_at)
    desk.clock.now = lost_at + RING - timedelta(seconds=1)
    assert await desk.outreach.close_lost_attempts() == 0  # the dead node's Asterisk may still be ringing
    assert _row(desk, ringing.id).state == "dialing"

    desk.clock.now = lost_at + RING
    assert await desk.outreach.close_lost_attempts() == 2
    assert await desk.outreach.close_lost_attempts() == 0  # closed once
    for closed in (ringing, talking):
        row = _row(desk, closed.id)
        assert (row.state, row.outcome, row.ended_at) == ("failed", "node_lost", lost_at)
        _first, retry = _rounds(desk, closed.round_id)
        assert (retry.attempt, retry.state, retry.node) == (2, "scheduled", None)
        assert retry.not_before == desk.clock.now + timedelta(minutes=30)  # POLICY's backoff
    assert _row(desk, other.id).state == "dialing"
    assert _row(desk, own.id).state == "dialing"
    assert desk.outreach.attempts.in_flight("patients") == 2  # the trunk cap no longer counts the dead calls
    assert desk.outreach.tasks.open_tasks(kind="unreachable") == []


async def test_the_last_attempt_lost_is_escalated_and_frees_the_trunk(desk: Desk) -> None:
    sessions = desk.outreach._sessions
    start = desk.clock.now
    _leases(sessions, start, _leader(desk), DEAD)
    first = _placed(desk, DEAD)
    store = desk.outreach.attempts
    assert store.finish(first.id, state="failed", outcome="no_answer", at=start)
    second = store.next_attempt(first, start)
    assert second is not None
    assert store.claim(second.id, DEAD, "patients", f"outreach-{second.id}", start)
    fire(desk, plan_for(desk))  # another patient's call, due now
    assert await desk.outreach.dial_due() == 0  # trunk_cap = 1, held by the dead node's call
    assert desk.ari.originated == []

    _take_over(sessions, DEAD, _leader(desk), start + timedelta(seconds=8))
    desk.clock.now = start + timedelta(seconds=8) + RING
    assert await desk.outreach.close_lost_attempts() == 1
    assert [a.outcome for a in _rounds(desk, first.round_id)] == ["no_answer", "node_lost"]  # max_attempts = 2
    (task,) = desk.outreach.tasks.open_tasks(kind="unreachable")
    assert (task.role, task.patient_id) == ("nurse", desk.patient)
    assert await desk.outreach.dial_due() == 1  # the trunk is free again
    await desk.settle()


async def test_two_leaders_racing_close_each_attempt_once(desk: Desk) -> None:
    sessions = desk.outreach._sessions
    start = desk.clock.now
    _leases(sessions, start, _leader(desk), DEAD)
    placed = [_placed(desk, DEAD), _placed(desk, DEAD, answered=True)]
    _take_over(sessions, DEAD, _leader(desk), start + timedelta(seconds=8))
    desk.clock.now = start + timedelta(seconds=8) + RING

    store = desk.outreach.attempts
    seen_by_one = store.on_lost_nodes(desk.clock.now, settle=RING, besides="node-x")
    seen_by_other = store.on_lost_nodes(desk.clock.now, settle=RING, besides="node-y")
    assert {lost.attempt.id for lost in seen_by_one} == {a.id for a in placed}
    assert [store.close_lost(lost) for lost in seen_by_one] == [True, True]
    assert [store.close_lost(lost) for lost in seen_by_other] == [False, False]  # the other leader lost the race

    # Through the dialer: both leaders list the same attempts, each closes (and retries) only what it won.
    more = [_placed(desk, DEAD) for _ in range(3)]
    with sessions.begin() as session:  # the dead node's calls placed before the takeover
        for attempt in more:
            session.get_one(OutreachAttempt, attempt.id).started_at = start
    closed = await asyncio.gather(desk.outreach.close_lost_attempts(), desk.outreach.close_lost_attempts())
    assert sum(closed) == 3
    for attempt in more:
        assert [(a.attempt, a.state) for a in _rounds(desk, attempt.round_id)] == [(1, "failed"), (2, "scheduled")]


async def test_a_node_restarted_under_its_name_recovers_its_own_calls(desk: Desk) -> None:
    sessions = desk.outreach._sessions
    start = desk.clock.now
    _leases(sessions, start, _leader(desk), DEAD)
    placed = _placed(desk, DEAD)
    _take_over(sessions, DEAD, _leader(desk), start + timedelta(seconds=8))
    desk.clock.now = start + timedelta(seconds=8) + RING
    lost = desk.outreach.attempts.on_lost_nodes(desk.clock.now, settle=RING, besides=_leader(desk))
    _leases(sessions, desk.clock.now, DEAD)  # it came back between the leader's read and its close
    assert [desk.outreach.attempts.close_lost(one) for one in lost] == [False]
    assert await desk.outreach.close_lost_attempts() == 0  # live again: its own start recovers the call
    assert _row(desk, placed.id).state == "dialing"


async def _one_beat(desk: Desk, *, cluster: bool) -> None:
    """Run the dialer's loop as the leader for one beat, with ``[cluster]`` on or off."""
    dialer = desk.outreach.dialer
    config = dialer._config
    dialer._config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"enabled": cluster})})
    leading = asyncio.Event()
    leading.set()
    loop = asyncio.ensure_future(dialer.dialer_loop(leading))
    try:
        await desk.settle()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        dialer._config = config


async def test_the_leaders_loop_closes_them_only_with_the_cluster_on(desk: Desk) -> None:
    sessions = desk.outreach._sessions
    start = desk.clock.now
    _leases(sessions, start, _leader(desk), DEAD)
    placed = _placed(desk, DEAD)
    _take_over(sessions, DEAD, _leader(desk), start + timedelta(seconds=8))
    desk.clock.now = start + timedelta(seconds=8) + RING
    await _one_beat(desk, cluster=False)
    assert _row(desk, placed.id).state == "dialing"  # a single node has no leases to read
    await _one_beat(desk, cluster=True)
    assert (_row(desk, placed.id).state, _row(desk, placed.id).outcome) == ("failed", "node_lost")
