"""The lease keeper against a database that goes away and comes back (a failover): a node cut off itself takes
nobody over until the others have had one lease time to renew; a node that was never cut off takes over at once.

A fake store with a hand-driven clock: the keeper's decisions only (``tests/unit/routing/test_cluster.py`` runs
the real takeover on a database)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from ground.db import DatabaseUnavailable
from routing.cluster import Takeover
from routing.lease import LeaseKeeper, LeaseSettings

START = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)
LEASE = 3.0  # a tick every second


@dataclass
class FakeStore:
    now: datetime = START
    down: bool = False
    renewals: list[datetime] = field(default_factory=list)
    takeover_scans: list[datetime] = field(default_factory=list)

    def clock(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def acquire(self, node: str, at: datetime, seconds: float) -> int:
        return 1

    def renew(self, node: str, epoch: int, at: datetime, seconds: float) -> bool:
        if self.down:
            raise DatabaseUnavailable("database postgresql://127.0.0.1/medhotline: no writable server")
        self.renewals.append(at)
        return True

    def take_over_expired(self, node: str, epoch: int, at: datetime) -> list[Takeover]:
        self.takeover_scans.append(at)
        return []


async def keeper(store: FakeStore) -> LeaseKeeper:
    kept = LeaseKeeper(store, "node0", LeaseSettings(LEASE), clock=store.clock)
    await kept.acquire()
    return kept


async def test_a_node_never_cut_off_looks_for_expired_leases_on_every_tick() -> None:
    store = FakeStore()
    kept = await keeper(store)
    for _ in range(5):
        store.advance(1.0)
        await kept.tick()
    assert len(store.takeover_scans) == 5


async def test_a_node_back_from_a_database_outage_takes_nobody_over_for_one_lease_time() -> None:
    store = FakeStore()
    kept = await keeper(store)
    store.advance(1.0)
    await kept.tick()
    assert len(store.takeover_scans) == 1
    # The primary dies: four ticks fail (longer than the lease: every node's lease expires unrenewed).
    store.down = True
    with capture_logs() as failed:
        for _ in range(4):
            store.advance(1.0)
            await kept.tick()
    assert [e["event"] for e in failed] == ["cluster.lease_renew_failed"] * 4
    assert kept.live
    # Promoted: the renewal succeeds at once, but no takeover for one lease time (3 s): the others renew meanwhile.
    store.down = False
    back = store.now + timedelta(seconds=1.0)
    with capture_logs() as deferred:
        for _ in range(3):
            store.advance(1.0)
            await kept.tick()
    assert len(store.renewals) == 4
    assert len(store.takeover_scans) == 1, "took over during the grace"
    assert [e["event"] for e in deferred] == ["cluster.takeover_deferred"]
    assert deferred[0]["unrenewed_for"] == 5.0
    assert deferred[0]["until"] == (back + timedelta(seconds=LEASE)).isoformat()
    # One lease time after its return, a node that did not renew meanwhile is really dead: taken over as before.
    store.advance(1.0)
    await kept.tick()
    assert store.takeover_scans == [START + timedelta(seconds=1), back + timedelta(seconds=LEASE)]
    store.advance(1.0)
    await kept.tick()
    assert len(store.takeover_scans) == 3


async def test_a_renewal_that_hung_longer_than_a_tick_defers_the_takeovers_too() -> None:
    store = FakeStore()
    kept = await keeper(store)
    store.advance(1.0)
    await kept.tick()
    # No exception, but the renewal came 2 s after the last one (a connection that hung until the promotion).
    store.advance(2.0)
    await kept.tick()
    assert len(store.renewals) == 2
    assert len(store.takeover_scans) == 1
    # Normal ticks (1 s apart) are no gap: the takeovers resume one lease time after the return.
    for _ in range(2):
        store.advance(1.0)
        await kept.tick()
    assert len(store.takeover_scans) == 1
    store.advance(1.0)
    await kept.tick()
    assert store.takeover_scans[-1] == START + timedelta(seconds=6)
