"""The primary database dies (SIGKILL) during a stream of calls to the running service; its synchronous standby
is promoted with ``pg_ctl promote``; the service carries on through its libpq multi-host URL.

The real thing end to end: the sandboxed Asterisk, ``medhotline serve`` with ``[database] url`` naming both
PostgreSQL servers (``tests.pg_replication``, the same helper as the repositories' failover test), a SIPp agent
phone and SIPp patients who press the general-desk key, are queued, and are answered by the agent. Checked
afterwards: every call placed after the promotion was answered by the hotline and recorded as routed with the
agent's ring answered; the service process never stopped; every call record and audit entry committed before the
kill is on the promoted server; ``medhotline audit verify`` passes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from compliance.audit import audit_entries
from ground import db
from ground.config import Config
from ground.models import Call
from medhotline.cli import main as cli
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import PhoneCall, Press
from medhotline.phones.agent import AgentPhone
from routing.store import AgentStore
from tests.integration.conftest import Hotline, running_hotline, unavailable
from tests.integration.test_cluster_nodes import RULES
from tests.pg_replication import ReplicatedPostgres, pg_bin, replicated_postgres

# Warnings of a write retried while no primary answers, and errors of a write given up.
RETRIED = {"call.record_retry", "routing.database_retry", "routing.step_unavailable", "recording.database_retry"}
GAVE_UP = {"call.record_failed", "routing.database_failed", "recording.finish_failed", "recording.not_started"}

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / "routing_desk.yaml"
GENERAL_KEY = "2"
# Callers in parallel; each places its calls one after another.
STREAMS = 2
# Calls answered by the agent before the kill, and calls placed after the promotion that must all be answered.
BEFORE_KILL = 2
AFTER_PROMOTION = 3
# The primary is dead this long before the standby is promoted: calls meet a database with no writable server.
DEAD_FOR = 1.0
SETTINGS = """
[routing]
rules_file = "{rules}"
ring_timeout = 6
wrap_up = 0.2
first_announcement = 30
refresh_interval = 0.2

[database]
url = "{url}"
"""


@dataclass
class Stream:
    """Patients calling one after another from ``STREAMS`` threads until stopped; what each phone saw, in order."""

    hotline: Hotline
    stop: threading.Event = field(default_factory=threading.Event)
    placed: list[tuple[float, float, PhoneCall]] = field(default_factory=list)  # (dialled, ended, what it saw)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while not self.stop.is_set():
            dialled = time.monotonic()
            # The caller listens until the hotline hangs up (after the agent did): a caller left waiting fails below.
            seen = self.hotline.call(self.hotline.config.hotline.number, [Press(300, GENERAL_KEY)])
            with self.lock:
                self.placed.append((dialled, time.monotonic(), seen))

    def answered_after(self, moment: float) -> list[PhoneCall]:
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


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def failover(tmp_path: Path) -> Iterator[tuple[Hotline, ReplicatedPostgres, AgentPhone]]:
    if pg_bin() is None:
        unavailable("PostgreSQL binaries not installed")
    phone = AgentPhone("gen1", free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=300, talk_ms=1200)
    phone.start()

    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        try:
            AgentStore(sessions).add_agent_with_account(
                "gen1", "gen1", ["agent"], "gen1", datetime.now(UTC), contact=phone.contact
            )
        finally:
            sessions.kw["bind"].dispose()  # no pooled connection to the primary left for the garbage collector

    rules = tmp_path / "routing.yaml"
    rules.write_text(RULES, encoding="utf-8")
    try:
        # TLS only, as between hosts: the service, the replication and the checks below all verify the servers.
        with replicated_postgres(tls=True) as pg:
            settings = SETTINGS.format(rules=rules, url=pg.url)
            with running_hotline(
                tmp_path, "dbfo", settings, flow="routing_desk", extra_flows=(DESK,), before_start=setup
            ) as hotline:
                deadline = time.monotonic() + 30
                while " gen1/" not in hotline.sandbox.cli_output("pjsip show endpoints"):
                    assert time.monotonic() < deadline, "the agent's endpoint was not configured in Asterisk"
                    time.sleep(0.3)
                yield hotline, pg, phone
    finally:
        phone.stop()


def test_the_service_carries_on_through_a_promotion_and_loses_nothing_committed(
    failover: tuple[Hotline, ReplicatedPostgres, AgentPhone], capsys: pytest.CaptureFixture[str]
) -> None:
    hotline, pg, _ = failover
    assert hotline.service.proc is not None
    primary_url = pg.url_of(pg.primary)
    stream = Stream(hotline)
    pool = ThreadPoolExecutor(max_workers=STREAMS)
    callers: list[Future[None]] = [pool.submit(stream.run) for _ in range(STREAMS)]
    try:
        wait_until(lambda: len(stream.placed) >= BEFORE_KILL, 40, f"{BEFORE_KILL} calls before the kill")
        # What the primary has committed (and, synchronous replication, the standby has flushed) at the kill.
        before_ids, before_calls, before_audit = committed(primary_url)
        killed = time.monotonic()
        pg.kill_primary()
        time.sleep(DEAD_FOR)
        pg.promote_standby()
        promoted = time.monotonic()
        at_promotion = set(hotline.call_ids())
        wait_until(
            lambda: len(stream.answered_after(promoted)) >= AFTER_PROMOTION, 45, f"{AFTER_PROMOTION} calls after it"
        )
    finally:
        stream.stop.set()
        for caller in callers:
            caller.result(timeout=60)
        pool.shutdown()

    assert hotline.service.proc.poll() is None, "the service process stopped during the failover"

    # Calls placed after the promotion: each answered by the hotline, queued, rung to the agent who answered.
    after = stream.answered_after(promoted)
    assert all(seen.succeeded for seen in after), [seen.errors[-500:] for seen in after if not seen.succeeded]
    store_sessions = db.make_sessionmaker(hotline.config.database_url)
    store = AgentStore(store_sessions)
    # The phones have hung up; the service records each call's end right after.
    wait_until(
        lambda: all(r.outcome != "in_progress" for r in hotline.repo.list_recent(1000)), 15, "every record closed"
    )
    records = {r.id: r for r in hotline.repo.list_recent(1000)}
    dialled_after = [r for r in records.values() if r.id not in at_promotion]
    assert len(dialled_after) >= len(after)
    try:
        for record in dialled_after:
            assert record.outcome == "routed", record
            assert [(r.account_id, r.outcome) for r in store.rings(record.id)] == [("gen1", "answered")]
    finally:
        store_sessions.kw["bind"].dispose()

    # Nothing committed before the kill is missing on the promoted server.
    standby_url = pg.url_of(pg.standby)
    after_ids, after_calls, after_audit = committed(standby_url)
    assert before_ids <= after_ids, f"{len(before_ids - after_ids)} committed call records lost"
    assert after_calls >= before_calls + AFTER_PROMOTION
    assert after_audit >= before_audit

    # The service's sessions on the promoted server are TLS (the servers refuse anything else; this says it did).
    sessions_ssl = "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s "
    sessions_ssl += f"USING (pid) WHERE a.datname = '{pg.database}' AND a.client_port IS NOT NULL"
    total, plain = map(int, pg.sql(pg.standby, sessions_ssl).split("|"))
    assert total > 0
    assert plain == 0

    # The project's own verification of the audit chain, on the promoted server through the service's URL.
    capsys.readouterr()
    assert cli(["--config", str(hotline.config_path), "audit", "verify"]) == 0
    verdict = capsys.readouterr().out
    assert "OK" in verdict.upper(), verdict

    # The stream did meet the failover (writes were retried), and the service gave up on none of them.
    log_file = hotline.config.service.log_file
    assert log_file is not None
    events = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    retried = [e for e in events if e["event"] in RETRIED]
    assert retried, "no write met the dead primary: the kill was not during the stream"
    gave_up = [e for e in events if e["event"] in GAVE_UP]
    assert not gave_up, gave_up

    # Figures for docs/cluster.md: the kill, the promotion, the span of writes retried, the slowest caller.
    spans = [ended - dialled for dialled, ended, _ in stream.placed]
    times = sorted(datetime.fromisoformat(e["timestamp"]) for e in retried)
    print(
        f"\nkill→promoted {promoted - killed:.1f} s; writes retried over {(times[-1] - times[0]).total_seconds():.1f} s"
        f" ({len(retried)} retries); calls {before_calls}→{after_calls}, audit {before_audit}→{after_audit};"
        f" {len(stream.placed)} calls, {len(after)} after the promotion; call length max {max(spans):.1f} s,"
        f" min {min(spans):.1f} s"
    )
