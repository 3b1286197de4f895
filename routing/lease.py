"""A node's lease, kept alive: acquire at start, renew every third of the lease time, take over expired ones.

The :class:`LeaseKeeper` is the only writer of this node's lease row (``ground.leases``). On every tick it renews
the lease and takes over the leases of nodes that stopped renewing theirs (``routing.cluster.ClusterStore``):
their agents are free again and their calls closed as lost at most one tick after their lease expired, i.e.
within ``seconds + seconds / 3`` of their last renewal.

A renewal that finds the lease taken over is final for this process: :attr:`LeaseKeeper.live` becomes False, the
routing engine stops dispatching, and the keeper says so at error level once. Only a restart (which acquires a
new epoch) brings the node back: by then another node has closed its calls and released its agents, and a node
that carried on regardless would reserve agents behind the survivors' backs.

A node that was itself cut off from the database (its renewals failed, or one took longer than a tick: a database
failover, a network cut) takes nobody over for one lease time after it renews again. The other nodes were most
likely cut off too and their leases expired for the same reason, not because they died: they get that lease time
to renew theirs. Without it, the first node back after a promotion longer than the lease took every other node
over, closing their calls in progress as lost and stopping them for good. A node that really died meanwhile is
still taken over, one lease time later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ground.leases import LeaseLost
from ground.logs import get_logger
from routing.cluster import Takeover

log = get_logger(__name__)

__all__ = ["LeaseKeeper", "LeaseSettings", "LeaseStore"]

# The default lease: a dead node's agents ring again from another node within 8 s (lease + one renewal tick),
# and a live node must miss three renewals in a row before it is taken over.
DEFAULT_LEASE_SECONDS = 6.0
# After a failed acquisition at start (database not reachable yet), try again after this long.
ACQUIRE_RETRY = 1.0


class LeaseStore(Protocol):
    """``routing.cluster.ClusterStore``'s lease methods; synchronous, called through a thread."""

    def acquire(self, node: str, at: datetime, seconds: float) -> int: ...
    def renew(self, node: str, epoch: int, at: datetime, seconds: float) -> bool: ...
    def take_over_expired(self, node: str, epoch: int, at: datetime) -> list[Takeover]: ...


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    seconds: float = DEFAULT_LEASE_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.seconds <= 60:
            raise ValueError(f"lease seconds {self.seconds!r}: expected more than 0 and at most 60")

    @property
    def renew_every(self) -> float:
        return self.seconds / 3


def _now() -> datetime:
    return datetime.now(UTC)


class LeaseKeeper:
    def __init__(
        self,
        store: LeaseStore,
        node: str,
        settings: LeaseSettings = LeaseSettings(),
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.node = node
        self.settings = settings
        self.epoch: int | None = None
        self.lost = False
        self._clock = clock
        self._stalled = False
        # When this node last renewed (or acquired) its lease, and until when it takes nobody over.
        self._renewed: datetime | None = None
        self._no_takeover_until: datetime | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def live(self) -> bool:
        """This node may act for the cluster: it holds a lease that nobody has taken over (as far as it knows)."""
        return self.epoch is not None and not self.lost

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called when the lease is acquired or lost (the engine wakes to start or stop dispatching)."""
        self._listeners.append(listener)

    def stall(self, stalled: bool = True) -> None:
        """Fault drills and tests: stop (or resume) renewing, as a node that hangs or is cut off would."""
        self._stalled = stalled

    async def acquire(self) -> int:
        """This node's lease with a new epoch, retried until the database answers."""
        while True:
            try:
                epoch = await asyncio.to_thread(self.store.acquire, self.node, self._clock(), self.settings.seconds)
            except Exception:
                log.exception("cluster.lease_acquire_failed", node=self.node)
                await asyncio.sleep(ACQUIRE_RETRY)
                continue
            self.epoch, self.lost = epoch, False
            self._renewed = self._clock()
            log.warning("cluster.lease_acquired", node=self.node, epoch=epoch, seconds=self.settings.seconds)
            self._changed()
            return epoch

    async def keep(self) -> None:
        """Renew and take over, every third of the lease time, until cancelled or the lease is lost."""
        while not self.lost:
            await asyncio.sleep(self.settings.renew_every)
            if not self._stalled:
                await self.tick()

    async def tick(self) -> None:
        """One renewal, then the takeover of every other node's expired lease."""
        epoch = self.epoch
        if epoch is None or self.lost:
            return
        try:
            renewed = await asyncio.to_thread(self.store.renew, self.node, epoch, self._clock(), self.settings.seconds)
        except Exception:
            # The database is unreachable: keep trying; if it stays so past the lease time, others take over.
            log.exception("cluster.lease_renew_failed", node=self.node, epoch=epoch)
            return
        if not renewed:
            self._lose()
            return
        if not self._may_take_over(self._clock()):
            return
        try:
            taken = await asyncio.to_thread(self.store.take_over_expired, self.node, epoch, self._clock())
        except LeaseLost:
            self._lose()
            return
        except Exception:
            log.exception("cluster.takeover_failed", node=self.node)
            return
        for takeover in taken:
            log.error(
                "cluster.node_taken_over",
                lost_node=takeover.lease.node,
                lost_epoch=takeover.lease.epoch,
                last_renewed=takeover.lease.renewed_at.isoformat(),
                expired=takeover.lease.expires_at.isoformat(),
                agents_released=takeover.released,
                rings_closed=takeover.rings,
                waiting_dropped=takeover.dropped,
                calls_closed=takeover.calls,
            )

    def _may_take_over(self, now: datetime) -> bool:
        """Whether this tick may take other nodes over: not within one lease time of this node's own return from
        a gap in its renewals (over one and a half ticks since the last one: a failed renewal, or one that hung)."""
        previous, self._renewed = self._renewed, now
        gap = (now - previous).total_seconds() if previous is not None else 0.0
        if gap > 1.5 * self.settings.renew_every:
            self._no_takeover_until = now + timedelta(seconds=self.settings.seconds)
            log.warning(
                "cluster.takeover_deferred",
                node=self.node,
                unrenewed_for=round(gap, 1),
                until=self._no_takeover_until.isoformat(),
                reason="this node was cut off from the database; the others get one lease time to renew",
            )
        if self._no_takeover_until is not None and now < self._no_takeover_until:
            return False
        self._no_takeover_until = None
        return True

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        log.error(
            "cluster.lease_lost",
            node=self.node,
            epoch=self.epoch,
            action="this node no longer dispatches calls; another node took over its agents and calls; restart it",
        )
        self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()
