"""The cluster's side of routing in the database: one queue of waiting calls for every node, under node leases.

Every node publishes its waiting calls (``queued_calls``) and reads everybody's on each refresh, so each node's
dispatcher chooses among all waiting calls of the cluster. The choice is confirmed by :meth:`ClusterStore.claim`,
one transaction that

1. locks for share the live leases of the choosing node and of the node holding the caller (a node whose lease
   was taken over can no longer reserve anything, and a takeover waits for the claim and then undoes it);
2. for a normal call, refuses if a waiting emergency exists that the chooser did not consider (it arrived since
   its last read): the chooser reads again and decides again, so no emergency waits behind a normal call;
3. reserves the agent with the conditional UPDATE of ``routing.store`` (for the holding node: the reservation
   lives under its lease) and records the ring;
4. marks the call's row ``offered`` only if it is still ``waiting``.

Any step that does not hold rolls the whole transaction back. Nothing here is a consensus of our own: the
database's row locks and conditional UPDATEs decide, on PostgreSQL (READ COMMITTED re-checks a WHERE after a
lock wait) and on SQLite (one writer at a time).

:meth:`ClusterStore.take_over_expired` is what a surviving node runs on every lease tick: each expired lease of
another node is marked lost and, in the same transaction, that node's reservations are released, its open rings
closed as failed, its waiting calls dropped and its calls in progress closed as ``node_lost``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, exists, insert, select, update
from sqlalchemy.orm import Session

from ground.db import Repository, rowcount
from ground.leases import (
    LeaseLost,
    LostLease,
    acquire_lease,
    close_lost_calls,
    expired_leases,
    lock_live_leases,
    renew_lease,
    take_over_lease,
)
from routing.cluster_tables import QueuedCall
from routing.model import CallPriority, CallRequest
from routing.store import _check_call_id, _check_node, _reservation
from routing.tables import AgentRing, AgentRow

__all__ = ["ClaimRefused", "ClusterStore", "QueuedView", "Takeover"]

# Why a claim was refused: the agent is not free for it, the call is not waiting any more, a waiting emergency
# was not considered, or a lease (the chooser's or the holder's) is not live.
ClaimRefused = Literal["agent", "call", "emergency", "lease"]


@dataclass(frozen=True, slots=True)
class QueuedView:
    """One row of the cluster queue as a node reads it."""

    request: CallRequest
    node: str
    epoch: int
    state: Literal["waiting", "offered"]
    agent_id: str | None
    ring_id: int | None


@dataclass(frozen=True, slots=True)
class Takeover:
    """What one takeover did: whose lease, and how many reservations, rings, waiting calls and calls it closed."""

    lease: LostLease
    released: int
    rings: int
    dropped: int
    calls: int


class _Refused(Exception):
    """Leaves a claim's transaction so that it rolls back whatever it wrote."""

    def __init__(self, reason: ClaimRefused) -> None:
        super().__init__(reason)
        self.reason: ClaimRefused = reason


def _priority(value: str) -> CallPriority:
    return "emergency" if value == "emergency" else "normal"


class ClusterStore(Repository):
    """Reads and writes ``node_leases`` and ``queued_calls``; takeovers also touch agents, rings and calls."""

    # -- leases -----------------------------------------------------------------------------------------------
    def acquire(self, node: str, at: datetime, seconds: float) -> int:
        """This node's lease with a new epoch. What an earlier process under this name left behind without being
        taken over (it crashed and this one started within the lease time) is cleaned up first, as a takeover."""
        _check_node(node)
        with self._transaction(f"acquiring the lease of node {node}") as session:
            epoch, previous = acquire_lease(session, node, at, seconds)
            if previous is not None:
                self._clean_up(session, previous, node, at)
            return epoch

    def renew(self, node: str, epoch: int, at: datetime, seconds: float) -> bool:
        with self._transaction(f"renewing the lease of node {node}") as session:
            return renew_lease(session, node, epoch, at, seconds)

    def take_over_expired(self, node: str, epoch: int, at: datetime) -> list[Takeover]:
        """Take over every other node's expired lease (one transaction each). :class:`LeaseLost` when this node's
        own lease is not live: a node that lost its lease takes nothing over."""
        with self._transaction("reading expired leases") as session:
            candidates = expired_leases(session, at, besides=node)
        done: list[Takeover] = []
        for lease in candidates:
            with self._transaction(f"taking over the lease of node {lease.node}") as session:
                if not lock_live_leases(session, {node: epoch}):
                    raise LeaseLost(f"node {node}: lease epoch {epoch} is no longer live; taking over nothing")
                if take_over_lease(session, lease, node, at):
                    done.append(self._clean_up(session, lease, node, at))
        return done

    @staticmethod
    def _clean_up(session: Session, lease: LostLease, by: str, at: datetime) -> Takeover:
        released = rowcount(
            session.execute(
                update(AgentRow)
                .where(AgentRow.reserved_by == lease.node)
                .values(reserved_call_id=None, reserved_by=None, reserved_at=None)
            )
        )
        rings = rowcount(
            session.execute(
                update(AgentRing)
                .where(AgentRing.node == lease.node, AgentRing.ended_at.is_(None))
                .values(ended_at=at, outcome="failed")
            )
        )
        dropped = rowcount(session.execute(delete(QueuedCall).where(QueuedCall.node == lease.node)))
        calls = close_lost_calls(session, lease, by, at, started_before=at)
        return Takeover(lease, released, rings, dropped, calls)

    # -- the queue --------------------------------------------------------------------------------------------
    def publish(self, request: CallRequest, node: str, epoch: int) -> None:
        """Add this node's waiting call to the cluster queue (:class:`LeaseLost` if the node's lease is not live)."""
        _check_call_id(request.call_id)
        with self._transaction(f"queueing call {request.call_id}") as session:
            if not lock_live_leases(session, {node: epoch}):
                raise LeaseLost(f"node {node}: lease epoch {epoch} is not live; call {request.call_id} not queued")
            session.execute(
                insert(QueuedCall).values(
                    call_id=request.call_id,
                    node=node,
                    epoch=epoch,
                    category=request.category,
                    priority=request.priority,
                    enqueued_at=request.enqueued_at,
                    callback=request.callback,
                    state="waiting",
                )
            )

    def withdraw(self, call_id: str) -> bool:
        """The call left the queue (answered, hung up, escalated, handed to a callback)."""
        with self._transaction(f"removing call {call_id} from the queue") as session:
            return rowcount(session.execute(delete(QueuedCall).where(QueuedCall.call_id == call_id))) == 1

    def requeue(self, call_id: str) -> bool:
        """The offered agent did not answer (or was frozen): the call waits again, in its place."""
        statement = (
            update(QueuedCall)
            .where(QueuedCall.call_id == call_id, QueuedCall.state == "offered")
            .values(state="waiting", agent_id=None, ring_id=None, offered_by=None)
        )
        with self._transaction(f"putting call {call_id} back in the queue") as session:
            return rowcount(session.execute(statement)) == 1

    def reclassify(self, call_id: str, category: str, priority: CallPriority) -> bool:
        statement = update(QueuedCall).where(QueuedCall.call_id == call_id).values(category=category, priority=priority)
        with self._transaction(f"reclassifying queued call {call_id}") as session:
            return rowcount(session.execute(statement)) == 1

    def queue_view(self, node: str) -> list[QueuedView]:
        """Every waiting call of the cluster, and this node's calls offered to an agent."""
        query = select(QueuedCall).where((QueuedCall.state == "waiting") | (QueuedCall.node == node))
        with self._transaction("reading the cluster queue") as session:
            return [
                QueuedView(
                    CallRequest(
                        row.call_id,
                        row.category,  # type: ignore[arg-type]  # the row was written from a RouteCategory
                        _priority(row.priority),
                        row.enqueued_at,
                        callback=bool(row.callback),
                    ),
                    row.node,
                    row.epoch,
                    "offered" if row.state == "offered" else "waiting",
                    row.agent_id,
                    row.ring_id,
                )
                for row in session.scalars(query)
            ]

    def claim(  # noqa: PLR0917 - one decision, all of it checked in one transaction
        self,
        call: QueuedView,
        agent_id: str,
        node: str,
        epoch: int,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
        known_emergencies: Sequence[str] = (),
    ) -> int | ClaimRefused:
        """Reserve ``agent_id`` for ``call`` (held by ``call.node``) on behalf of ``node``: the ring's id, or why
        not (and nothing written). ``known_emergencies``: the waiting emergencies the chooser considered."""
        owner = call.node
        call_id = call.request.call_id
        statement, parameters = _reservation(agent_id, call_id, owner, at, required, excluded=excluded)
        try:
            with self._transaction(f"claiming call {call_id} for agent {agent_id}") as session:
                if not lock_live_leases(session, {node: epoch, owner: call.epoch}):
                    raise _Refused("lease")
                connection = session.connection()
                if call.request.priority == "normal":
                    unseen = exists().where(
                        QueuedCall.state == "waiting",
                        QueuedCall.priority == "emergency",
                        QueuedCall.call_id.not_in(list(known_emergencies)),
                    )
                    if connection.execute(select(unseen)).scalar():
                        raise _Refused("emergency")
                if rowcount(connection.execute(statement, parameters)) != 1:
                    raise _Refused("agent")
                ring = {"call_id": call_id, "account_id": agent_id, "node": owner, "rung_at": at}
                ring_id = int(connection.execute(insert(AgentRing).values(ring).returning(AgentRing.id)).scalar_one())
                offered = connection.execute(
                    update(QueuedCall)
                    .where(QueuedCall.call_id == call_id, QueuedCall.node == owner, QueuedCall.state == "waiting")
                    .values(state="offered", agent_id=agent_id, ring_id=ring_id, offered_by=node)
                )
                if rowcount(offered) != 1:
                    raise _Refused("call")  # rolls back the reservation and the ring too
                return ring_id
        except _Refused as refused:
            return refused.reason
