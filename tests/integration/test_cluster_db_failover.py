"""Two nodes behind Kamailio, each an Asterisk and a ``medhotline serve``, on a TLS-only PostgreSQL primary with a
synchronous standby (``tests.pg_replication``, the multi-host URL with ``target_session_attrs=read-write``). SIPp
patients call through the front one after another from two threads, press the general-desk key and are answered
by the agents' SIPp phones. The primary is SIGKILLed mid-stream and stays dead for longer than the lease, then
the standby is promoted.

Checked afterwards: both services still run; calls placed after the promotion are answered, routed and handled
by both nodes; both nodes hold their leases again under the epoch they started with (nobody was taken over as
dead because the database was away) and no ``cluster.node_taken_over`` was logged; no agent is left reserved;
every call record and audit entry committed before the kill is on the promoted server and ``medhotline audit
verify`` passes; the services' sessions on the promoted server are TLS; the logs show writes retried and none
given up; calls refused at the SIP level were dialled inside the kill window only (their number printed).

It replaced the single-node ``test_db_failover.py``: everything that test checked is checked here, through the
same service code (the call's writes, the audit, recordings, the routing engine's retried writes), with the
cluster's queue and leases on top; the engine's retries are covered without a cluster by
``tests/unit/routing/test_routing_engine_failover.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from compliance.audit import audit_entries
from ground import db
from ground.leases import NodeLease
from ground.models import Call
from medhotline.cli import main as cli
from medhotline.phones import PhoneCall
from routing.tables import AgentRow
from tests.integration.conftest import unavailable
from tests.integration.test_cluster_nodes import LEASE, Cluster, two_nodes
from tests.pg_replication import ReplicatedPostgres, pg_bin, replicated_postgres

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

# Warnings of a write retried while no primary answers, and errors of a write given up.
RETRIED = {"call.record_retry", "routing.database_retry", "routing.step_unavailable", "recording.database_retry"}
GAVE_UP = {"call.record_failed", "routing.database_failed", "recording.finish_failed", "recording.not_started"}

STREAMS = 2
# Each caller hangs up this long after the answer: time to press the key, be queued and talk to an agent.
HOLD_MS = 5_000
BEFORE_KILL = 3
AFTER_PROMOTION = 4
# Dead longer than the lease (3 s): when a primary answers again, every node's lease has expired unrenewed.
DEAD_FOR = LEASE + 1.5


@dataclass
class Stream:
    """Patients calling through the front one after another until stopped; (dialled, ended, what it saw)."""

    cluster: Cluster
    stop: threading.Event = field(default_factory=threading.Event)
    placed: list[tuple[float, float, PhoneCall]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while not self.stop.is_set():
            dialled = time.monotonic()
            seen = self.cluster.call(HOLD_MS).result(timeout=60)
            with self.lock:
                self.placed.append((dialled, time.monotonic(), seen))

    def dialled_after(self, moment: float) -> list[PhoneCall]:
        with self.lock:
            return [seen for dialled, _, seen in self.placed if dialled > moment]


def committed(url: str) -> tuple[set[str], int, int]:
    """Call ids, number of call rows and of audit entries on the server(s) of ``url`` right now."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            ids = set(connection.execute(select(Call.id)).scalars())
            audit = int(connection.execute(select(func.count()).select_from(audit_entries)).scalar_one())
        return ids, len(ids), audit
    finally:
        engine.dispose()


def wait_until(what: str, predicate: object, timeout: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedPostgres]:
    if pg_bin() is None:
        unavailable("PostgreSQL binaries not installed")
    with replicated_postgres(tls=True) as pg:
        yield pg


def test_two_nodes_carry_on_through_a_promotion_keep_their_leases_and_lose_nothing(
    tmp_path: Path, replicated: ReplicatedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    pg = replicated
    with two_nodes(tmp_path, pg.url) as cluster:
        node_a, node_b = cluster.sandbox.nodes
        names = {node_a.config.service.node_name, node_b.config.service.node_name}
        with cluster.engine.connect() as connection:
            epochs = dict(connection.execute(select(NodeLease.node, NodeLease.epoch)).all())
        assert set(epochs) == names
        stream = Stream(cluster)
        callers = [threading.Thread(target=stream.run, daemon=True) for _ in range(STREAMS)]
        for caller in callers:
            caller.start()
        try:
            wait_until(f"{BEFORE_KILL} calls before the kill", lambda: len(stream.placed) >= BEFORE_KILL, 40)
            before_ids, before_calls, before_audit = committed(pg.url_of(pg.primary))
            killed, killed_wall = time.monotonic(), datetime.now(UTC)
            pg.kill_primary()
            time.sleep(DEAD_FOR)
            pg.promote_standby()
            promoted, promoted_wall = time.monotonic(), datetime.now(UTC)
            cluster.engine.dispose()  # the test's own pool held connections to the dead primary
            wait_until(
                f"{AFTER_PROMOTION} calls after the promotion",
                lambda: len(stream.dialled_after(promoted)) >= AFTER_PROMOTION,
                60,
            )
        finally:
            stream.stop.set()
            for caller in callers:
                caller.join(timeout=70)

        services = [node.service for node in cluster.sandbox.nodes]
        assert all(s is not None and s.proc is not None and s.proc.poll() is None for s in services), services

        # Calls dialled after the promotion: each answered; their records routed, rung and answered, on both nodes.
        after = stream.dialled_after(promoted)
        assert all("ANSWERED" in seen.stamps for seen in after), [seen.errors[-500:] for seen in after]
        wait_until(
            "every record closed",
            lambda: all(r.outcome != "in_progress" for r in cluster.repo.list_recent(500)),
            15,
        )
        # Started after the promotion (a call started in the window has its start written late, with its own time).
        new = [r for r in cluster.repo.list_recent(500) if r.started_at > promoted_wall]
        assert len(new) >= len(after)
        assert {r.node for r in new} == names, [(r.node, r.outcome) for r in new]
        for record in new:
            assert record.outcome == "routed", record
            assert [ring.outcome for ring in cluster.store.rings(record.id)] == ["answered"], record
        # Nothing was closed as lost, and both leases are live again under their first epochs.
        assert not [r for r in cluster.repo.list_recent(500) if r.outcome == "node_lost"]
        with cluster.engine.connect() as connection:
            leases = {row.node: row for row in connection.execute(select(NodeLease)).all()}
        assert {n: (row.epoch, row.state) for n, row in leases.items()} == {n: (e, "live") for n, e in epochs.items()}

        # No agent left reserved once the last calls' wrap-up (0.5 s) is over.
        def reserved() -> list[str]:
            query = select(AgentRow.account_id).where(AgentRow.reserved_call_id.is_not(None))
            with cluster.engine.connect() as connection:
                return list(connection.execute(query).scalars())

        wait_until("no agent reserved", lambda: not reserved(), 10)

        # When each node dispatched again: its first ring after the promotion.
        first_ring: dict[str, datetime] = {}
        for record in cluster.repo.list_recent(500):
            for ring in cluster.store.rings(record.id):
                if ring.rung_at > promoted_wall:
                    first_ring[ring.node] = min(first_ring.get(ring.node, ring.rung_at), ring.rung_at)
        assert set(first_ring) == names, first_ring
        window = [r for r in cluster.repo.list_recent(500) if killed_wall <= r.started_at <= promoted_wall]

        # Nothing committed before the kill is missing on the promoted server; the audit chain verifies.
        after_ids, after_calls, after_audit = committed(pg.url_of(pg.standby))
        assert before_ids <= after_ids, f"{len(before_ids - after_ids)} committed call records lost"
        assert after_calls >= before_calls + len(after)
        assert after_audit >= before_audit
        # The services' sessions on the promoted server are TLS (the servers refuse anything else; this says it did).
        sessions_ssl = "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s"
        sessions_ssl += f" USING (pid) WHERE a.datname = '{pg.database}' AND a.client_port IS NOT NULL"
        total, plain = map(int, pg.sql(pg.standby, sessions_ssl).split("|"))
        assert total > 0
        assert plain == 0
        capsys.readouterr()
        assert cli(["--config", str(cluster.config_path), "audit", "verify"]) == 0
        verdict = capsys.readouterr().out
        assert "OK" in verdict.upper(), verdict

    # Both services stopped cleanly.
    assert cluster.exit_codes == dict.fromkeys(names, 0), cluster.exit_codes

    # The logs: writes met the dead primary and were retried, none given up, nobody taken over.
    events = []
    for node in (node_a, node_b):
        log_file = node.config.service.log_file
        assert log_file is not None
        events += [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert [e for e in events if e["event"] in RETRIED or e["event"] == "cluster.lease_renew_failed"]
    failed = GAVE_UP | {"routing.cluster_write_failed", "routing.step_failed", "cluster.takeover_failed"}
    assert not [e for e in events if e["event"] in failed], [e for e in events if e["event"] in failed]
    assert not [e for e in events if e["event"] in ("cluster.node_taken_over", "cluster.lease_lost")]

    # SIP-level refusals: only calls dialled between the kill and the promotion (plus one call length).
    refused = [(dialled, seen) for dialled, _, seen in stream.placed if "ANSWERED" not in seen.stamps]
    window_end = promoted + HOLD_MS / 1000 + 5
    assert all(killed - 1 <= dialled <= window_end for dialled, _ in refused), [
        (dialled - killed, seen.errors[-300:]) for dialled, seen in refused
    ]
    print(
        f"\nkill→promoted {promoted - killed:.1f} s; kill→dispatching again "
        + ", ".join(f"{node} {(at - killed_wall).total_seconds():.1f} s" for node, at in sorted(first_ring.items()))
        + f"; calls {before_calls}→{after_calls}, audit {before_audit}→{after_audit}; {len(stream.placed)} calls,"
        f" {len(after)} after the promotion, {len(refused)} refused at the SIP level; calls started in the window:"
        f" {sorted(r.outcome for r in window)}"
    )
