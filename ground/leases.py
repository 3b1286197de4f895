"""Node leases: each service node of a cluster holds its reservations and calls under a lease row it renews.

A node *acquires* its lease at start (a new ``epoch`` each time: a fencing token), *renews* it every third of the
lease time, and other nodes *take it over* once it has expired: the row goes to ``lost`` with who took it over
and when, in the same transaction as the clean-up of what the dead node held (``routing.cluster`` adds its
reservations, rings and waiting calls; :func:`close_lost_calls` closes its calls in progress as ``node_lost``).

Every decision is a conditional UPDATE on the lease row, so two survivors cannot both take a node over, and a node
whose lease was taken over can no longer renew it: its :func:`renew_lease` returns False and it must stop. Writes
that act *for* a node (a reservation, a waiting call) lock its live lease row for share in their transaction
(:func:`lock_live_leases`), so a takeover waits for them and then cleans up what they wrote, or they see the lease
lost and write nothing.

Times are the nodes' own clocks (UTC): keep them NTP-synchronised; the skew must stay far below the lease time.
These are session-level functions: the caller owns the transaction (``routing.cluster.ClusterStore``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import CheckConstraint, Integer, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from ground.db import DatabaseError, rowcount
from ground.models import Base, Call, UTCDateTime

__all__ = [
    "LEASE_STATES",
    "LeaseLost",
    "LostLease",
    "NodeLease",
    "acquire_lease",
    "close_lost_calls",
    "expired_leases",
    "lock_live_leases",
    "renew_lease",
    "take_over_lease",
]

LEASE_STATES: Final = ("live", "lost")


class LeaseLost(DatabaseError):
    """This node's lease was taken over by another node (or never acquired): it must not act for the cluster."""


class NodeLease(Base):
    __tablename__ = "node_leases"

    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Raised on every acquisition: a write for (node, epoch) is refused once a later epoch or a takeover exists.
    epoch: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(8))
    taken_over_by: Mapped[str | None] = mapped_column(String(64))
    taken_over_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("state IN ('live', 'lost')", name="state"),
        CheckConstraint("epoch >= 1", name="epoch"),
        CheckConstraint("renewed_at < expires_at", name="expiry"),
        CheckConstraint(
            "(state = 'live' AND taken_over_by IS NULL AND taken_over_at IS NULL) OR "
            "(state = 'lost' AND taken_over_by IS NOT NULL AND taken_over_at IS NOT NULL)",
            name="takeover",
        ),
    )


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease taken over: whose, which epoch, when it was last renewed and when it expired."""

    node: str
    epoch: int
    renewed_at: datetime
    expires_at: datetime


def _seconds(seconds: float) -> timedelta:
    if not seconds > 0:
        raise DatabaseError(f"lease time {seconds!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def acquire_lease(session: Session, node: str, at: datetime, seconds: float) -> tuple[int, LostLease | None]:
    """Take ``node``'s lease with a new epoch. Returns the epoch and, when the previous holder under this name
    never had its lease taken over (a crash and restart within the lease time, or a second process started with
    the same name), that previous lease: the caller cleans up what it held, in this transaction."""
    length = _seconds(seconds)
    row = session.get(NodeLease, node, with_for_update=True)
    if row is None:
        session.add(NodeLease(node=node, epoch=1, acquired_at=at, renewed_at=at, expires_at=at + length, state="live"))
        session.flush()
        return 1, None
    previous = LostLease(row.node, row.epoch, row.renewed_at, row.expires_at) if row.state == "live" else None
    row.epoch += 1
    row.state = "live"
    row.acquired_at = at
    row.renewed_at = at
    row.expires_at = at + length
    row.taken_over_by = None
    row.taken_over_at = None
    session.flush()
    return row.epoch, previous


def renew_lease(session: Session, node: str, epoch: int, at: datetime, seconds: float) -> bool:
    """Extend the lease by ``seconds`` from ``at``; False when it is no longer this node's (taken over, or a later
    epoch). A lease that expired but that nobody took over yet is still this node's: renewing it is allowed."""
    statement = (
        update(NodeLease)
        .where(NodeLease.node == node, NodeLease.epoch == epoch, NodeLease.state == "live")
        .values(renewed_at=at, expires_at=at + _seconds(seconds))
    )
    return rowcount(session.execute(statement)) == 1


def lock_live_leases(session: Session, leases: dict[str, int]) -> bool:
    """Lock each (node → epoch) lease row for share if it is live; False (nothing to do) if any is not.

    Held until the transaction ends, so a takeover of one of these nodes waits for it, then sees what it wrote.
    """
    query = (
        select(NodeLease.node, NodeLease.epoch)
        .where(NodeLease.node.in_(list(leases)), NodeLease.state == "live")
        .with_for_update(read=True)
    )
    found = {node: epoch for node, epoch in session.execute(query)}
    return found == leases


def expired_leases(session: Session, at: datetime, *, besides: str) -> list[LostLease]:
    """Live leases of other nodes that expired before ``at`` (candidates for :func:`take_over_lease`)."""
    query = (
        select(NodeLease.node, NodeLease.epoch, NodeLease.renewed_at, NodeLease.expires_at)
        .where(NodeLease.state == "live", NodeLease.expires_at < at, NodeLease.node != besides)
        .order_by(NodeLease.node)
    )
    return [LostLease(*row) for row in session.execute(query)]


def take_over_lease(session: Session, lease: LostLease, by: str, at: datetime) -> bool:
    """Mark ``lease`` lost, taken over by ``by`` at ``at``; False when it is not ours to take (renewed meanwhile,
    another survivor was first, or a new epoch started)."""
    statement = (
        update(NodeLease)
        .where(
            NodeLease.node == lease.node,
            NodeLease.epoch == lease.epoch,
            NodeLease.state == "live",
            NodeLease.expires_at < at,
        )
        .values(state="lost", taken_over_by=by, taken_over_at=at)
    )
    return rowcount(session.execute(statement)) == 1


def close_lost_calls(session: Session, lease: LostLease, by: str, at: datetime, *, started_before: datetime) -> int:
    """Close the lost node's calls still in progress: outcome ``node_lost``, ended at ``at`` (when they were
    found lost), the error naming the node, its last renewal and who closed them. Calls that started at or after
    ``started_before`` are left alone (a restarted node's own new calls)."""
    reason = (
        f"node {lease.node} (lease epoch {lease.epoch}) stopped renewing its lease; last renewed "
        f"{lease.renewed_at.isoformat()}, expired {lease.expires_at.isoformat()}; closed by node {by}"
    )
    statement = (
        update(Call)
        .where(Call.node == lease.node, Call.outcome == "in_progress", Call.started_at < started_before)
        .values(outcome="node_lost", ended_at=at, error=reason)
    )
    return rowcount(session.execute(statement))
