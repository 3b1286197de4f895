"""A node's lease, kept alive: acquire at start, renew every third of the lease time, take over expired ones.

The :class:`LeaseKeeper` is the only writer of this node's lease row (``ground.leases``). On every tick it renews
the lease and takes over the leases of nodes that stopped renewing theirs (``routing.cluster.ClusterStore``):
their agents are free again and their calls closed as lost at most one tick after their lease expired, i.e.
within ``seconds + seconds / 3`` of their last renewal.

A renewal that finds the lease taken over is final for this process: :attr:`LeaseKeeper.live` becomes False, the
routing engine stops dispatching, and the keeper says so at error level once. Only a restart (which acquires a
new epoch) brings the node back: by then another node has closed its calls and released its agents, and a node
that carried on regardless would reserve agents behind the survivors' backs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from ground.leases import LeaseLost
from routing.cluster import Takeover

log = structlog.get_logger(__name__)

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
