"""Two nodes, each an Asterisk AND a medhotline service, behind Kamailio, on one PostgreSQL (``cluster up``'s
``ClusterSandbox(services=True)``): 40 concurrent calls through the front are all answered and spread over both
nodes, one queue for both (an emergency on A goes before an older normal call on B), calls through the front are
handled by both services, and when node B's service and Asterisk are killed
(SIGKILL) during calls, node A takes everything over.

The agents' SIPp phones have static contacts that both nodes dial. Which node handled a call is the record's
``node``; which node rang an agent is the ring's ``node``. The lease is 3 s here (takeover at most 4 s after the
last renewal) so the 10 s of the issue's criterion leave room on a loaded machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from ground import db
from ground.config import Config, load_config
from medhotline.cluster_sandbox import ClusterSandbox, Node, sip_options
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.kamailio_config import HEALTH_USER
from medhotline.phones import PhoneCall, Press, place_call
from medhotline.phones.agent import AgentPhone
from medhotline.phones.batch import place_calls
from medhotline.prompts import build_prompts
from routing.store import AgentStore, RingRecord

from .conftest import CALLER, check_prerequisites, unavailable, write_config
from .test_routing import DESK, KEYS, ROUTING

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

AGENTS = ("gen1", "gen2")
# Every category open to every agent (the agents here hold no licence), no escalation: the order of answers is
# the cluster queue's alone.
RULES = "".join(
    f"{category}: {{}}\n"
    for category in (
        "emergency",
        "diagnosis",
        "medication",
        "adverse_reaction",
        "vaccination",
        "triage",
        "appointment",
        "general",
    )
)
LEASE = 3
# 40 concurrent calls through the front: placed at RATE/s (2 s for all), each hangs up HOLD_MS after its answer,
# before the desk menu's 5 s timeout, so every caller ends in the IVR and none reaches an agent.
CONCURRENT, RATE, HOLD_MS = 40, 20, 6_000
# Each node sized for all of them, so the RTP range is not what limits the spread.
NODE_MAX_CALLS = CONCURRENT
# The bound: within 10 s of the kill, B's calls are closed and its agents ring again from A.
WITHIN = 10.0
CLUSTER = f"""
[cluster]
enabled = true
lease_seconds = {LEASE}

[cluster.front]
listen = "127.0.0.1:{{front_port}}"
"""


class Cluster:
    def __init__(self, sandbox: ClusterSandbox, config: Config, config_path: Path) -> None:
        self.sandbox = sandbox
        self.config = config
        self.config_path = config_path
        self.exit_codes: dict[str, int] = {}
        self.engine = db.make_engine(config.database_url)
        sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.repo = db.CallRepository(sessions)
        self.store = AgentStore(sessions)
        self.pool = ThreadPoolExecutor(max_workers=6)

    def call(self, hang_up_after_ms: int, category: str = "general", node: Node | None = None) -> Future[PhoneCall]:
        """A call through the front (or straight to ``node``'s Asterisk); the patient presses ``category``'s key,
        then hangs up ``hang_up_after_ms`` later."""
        front = self.sandbox
        host, port = (
            (front.front_host, front.front_port) if node is None else ("127.0.0.1", node.config.asterisk.sip_port)
        )
        return self.pool.submit(
            place_call,
            target_host=host,
            target_port=port,
            service=self.config.hotline.number,
            local_port=free_port(socket.SOCK_DGRAM),
            # Outside the nodes' RTP ranges: a node's Asterisk restarted during the call must find its ports free.
            media_port=free_rtp_range(4, "127.0.0.1", front.rtp_ranges()),
            caller=CALLER,
            presses=[Press(300, KEYS[category])],
            hang_up_after_ms=hang_up_after_ms,
            timeout=40,
            proxied=node is None,
        )

    def routed(self, before: set[str], category: str) -> list[db.CallRecord]:
        """New calls whose caller reached the flow's ``category`` node (the route to that queue)."""
        return [r for r in self.records(before) if any(step.node == category for step in self.repo.steps(r.id))]

    def records(self, before: set[str]) -> list[db.CallRecord]:
        return sorted((r for r in self.repo.list_recent(200) if r.id not in before), key=lambda r: r.started_at)

    def record(self, call_id: str) -> db.CallRecord:
        record = self.repo.get(call_id)
        assert record is not None, call_id
        return record

    def rings(self, records: list[db.CallRecord]) -> list[RingRecord]:
        return [ring for record in records for ring in self.store.rings(record.id)]


def wait_for(what: str, condition: Callable[[], bool], deadline: float) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within the time allowed: {what}")
        time.sleep(0.2)


def add_agents(config: Config, phones: dict[str, AgentPhone]) -> None:
    db.upgrade(config.database_url)
    engine = db.make_engine(config.database_url)
    try:
        store = AgentStore(sessionmaker(engine, expire_on_commit=False))
        now = datetime.now(UTC)
        for agent_id, phone in phones.items():
            store.add_agent_with_account(agent_id, agent_id, ["agent"], agent_id, now, contact=phone.contact)
    finally:
        engine.dispose()


def endpoints_configured(node: Node, agents: tuple[str, ...] = AGENTS) -> bool:
    """The node's service wrote the agents' PJSIP endpoints into its Asterisk: it can dial them."""
    out = node.sandbox.cli_output("pjsip show endpoints")
    return all(f" {agent}/" in out for agent in agents)


@contextlib.contextmanager
def two_nodes(
    tmp_path: Path, postgres_url: str, extra: str = "", *, agents: tuple[str, ...] = AGENTS
) -> Iterator[Cluster]:
    """Two nodes with their services behind the front, ``extra`` config appended, ``agents`` (each a SIPp phone)
    in the agent table and in both nodes' Asterisks. After the block, ``Cluster.exit_codes`` holds the services'
    exit codes (a killed service has none: ``down`` only stops those still running)."""
    check_prerequisites()
    if shutil.which("kamailio") is None:
        unavailable("kamailio is not installed (scripts/bootstrap installs it)")
    rules = tmp_path / "routing.yaml"
    rules.write_text(RULES, encoding="utf-8")
    extra = ROUTING.format(rules=rules) + CLUSTER.format(front_port=free_port(socket.SOCK_DGRAM)) + extra
    extra += f'\n[database]\nurl = "{postgres_url}"\n'
    path = write_config(tmp_path, f"nodes{os.getpid()}", extra, flow="routing_desk", extra_flows=(DESK,))
    config = load_config(path, environ={})
    front = ClusterSandbox(config, 2, tmp_path / "front", services=True, config_path=path, max_calls=NODE_MAX_CALLS)
    # The phones' media ports outside the nodes' RTP ranges, as the callers' (Cluster.call).
    phones = {
        agent: AgentPhone(
            agent,
            free_port(socket.SOCK_DGRAM),
            free_rtp_range(4, "127.0.0.1", front.rtp_ranges()),
            answer_after_ms=500,
            talk_ms=60_000,
        )
        for agent in agents
    }
    build_prompts(front.nodes[0].config)
    running: Cluster | None = None
    try:
        for phone in phones.values():
            phone.start()
        add_agents(config, phones)
        front.up()
        running = Cluster(front, config, path)
        deadline = time.monotonic() + 30
        for node in front.nodes:
            wait_for(
                f"agent endpoints on {node.config.service.node_name}",
                partial(endpoints_configured, node, agents),
                deadline,
            )
        try:
            yield running
        finally:
            running.pool.shutdown(wait=True)
            running.engine.dispose()
    finally:
        codes = front.down()
        if running is not None:
            running.exit_codes = codes
        for phone in phones.values():
            phone.stop()
        for node in front.nodes:
            shutil.rmtree(node.sandbox.instance_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    with two_nodes(tmp_path, postgres_url) as running:
        yield running
    # The survivor stops cleanly (SIGTERM, its calls finished); the killed node's exit code is SIGKILL's.
    assert running.exit_codes.get("node1") == 0, f"node1's service exited with {running.exit_codes}; see {tmp_path}"


def peak_overlap(records: list[db.CallRecord]) -> int:
    """The most calls whose records were open at the same moment."""
    edges = sorted(
        [(r.started_at, 1) for r in records] + [(r.ended_at, -1) for r in records if r.ended_at is not None],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def concurrent_calls_spread(cluster: Cluster, name_a: str, name_b: str) -> None:
    """(d) 40 calls at once through the front, one SIPp: all answered, each node holds at least a third of
    them, all open together, and every record closed afterwards."""
    before = {r.id for r in cluster.repo.list_recent(200)}
    front = cluster.sandbox
    batch = place_calls(
        target_host=front.front_host,
        target_port=front.front_port,
        service=cluster.config.hotline.number,
        local_port=free_port(socket.SOCK_DGRAM),
        media_port=free_rtp_range(4),
        caller=CALLER,
        count=CONCURRENT,
        rate=RATE,
        hang_up_after_ms=HOLD_MS,
        proxied=True,
    )
    assert (batch.successful, batch.failed) == (CONCURRENT, 0), batch.errors
    wait_for(
        f"{CONCURRENT} records, all closed",
        lambda: (
            len(records := cluster.records(before)) == CONCURRENT
            and all(r.outcome != "in_progress" and r.ended_at is not None for r in records)
        ),
        time.monotonic() + 15,
    )
    records = cluster.records(before)
    per_node = {name: sum(r.node == name for r in records) for name in (name_a, name_b)}
    assert sum(per_node.values()) == CONCURRENT, per_node
    assert min(per_node.values()) >= CONCURRENT // 3, per_node
    # They really overlapped: every call's record was open at one moment (the hold is longer than placing all).
    assert peak_overlap(records) == CONCURRENT, [(r.started_at, r.ended_at) for r in records]
    # Nobody reached the queue: the agents are free for what follows.
    assert not cluster.rings(records)


def test_calls_spread_over_two_services_and_a_killed_node_is_taken_over(cluster: Cluster) -> None:
    node_a, node_b = cluster.sandbox.nodes
    name_a, name_b = node_a.config.service.node_name, node_b.config.service.node_name

    concurrent_calls_spread(cluster, name_a, name_b)

    # (c) One queue for both nodes: a normal caller waits on node B, then an emergency arrives on node A (each
    # straight to its node). The one agent who becomes free is rung for the emergency, by node A.
    store = cluster.store
    for agent in AGENTS:
        store.pause(agent, "not yet", datetime.now(UTC))
    start = {r.id for r in cluster.repo.list_recent(200)}
    waiting = [cluster.call(8_000, "general", node_b)]
    deadline = time.monotonic() + 15
    wait_for("a normal caller waiting on B", lambda: len(cluster.routed(start, "general")) == 1, deadline)
    waiting.append(cluster.call(8_000, "emergency", node_a))
    wait_for("an emergency waiting on A", lambda: len(cluster.routed(start, "emergency")) == 1, deadline)
    normal, emergency = cluster.routed(start, "general")[0], cluster.routed(start, "emergency")[0]
    assert (normal.node, emergency.node) == (name_b, name_a)
    assert normal.started_at < emergency.started_at
    time.sleep(0.6)  # both nodes' dispatchers have read both waiting calls (refresh_interval 0.2 s)
    store.unpause(AGENTS[0], datetime.now(UTC))
    wait_for("the free agent rung", lambda: bool(cluster.rings([normal, emergency])), deadline)
    first_ring = cluster.rings([normal, emergency])
    assert [(r.call_id, r.account_id, r.node) for r in first_ring] == [(emergency.id, AGENTS[0], name_a)]
    store.unpause(AGENTS[1], datetime.now(UTC))
    wait_for("the normal caller's agent rung, by B", lambda: bool(store.rings(normal.id)), deadline)
    assert [(r.account_id, r.node) for r in store.rings(normal.id)] == [(AGENTS[1], name_b)]
    for future in waiting:
        future.result(timeout=40)
    wait_for(
        "both agents free again",
        lambda: all(r.outcome != "in_progress" for r in cluster.records(start)),
        time.monotonic() + 10,
    )
    time.sleep(1.0)  # wrap-up (0.5 s) over

    # (a) Two calls a second apart: the front sends the second to the node with fewer calls, and each node's
    # service answers its caller, queues it and has an agent (each its own) answer it.
    before = {r.id for r in cluster.repo.list_recent(200)}
    first = [cluster.call(hang_up_after_ms=12_000)]
    time.sleep(1.0)
    first.append(cluster.call(hang_up_after_ms=12_000))
    deadline = time.monotonic() + 20
    wait_for(
        "both first calls answered by an agent",
        lambda: sum(ring.outcome == "answered" for ring in cluster.rings(cluster.records(before))) == 2,
        deadline,
    )
    records = cluster.records(before)
    assert sorted(r.node for r in records) == [name_a, name_b], records
    rings = cluster.rings(records)
    # Each node dialled the agent for its own caller.
    assert {(ring.node, ring.outcome) for ring in rings} == {(name_a, "answered"), (name_b, "answered")}, rings
    lost_call = next(r for r in records if r.node == name_b)
    b_agent = next(ring.account_id for ring in rings if ring.call_id == lost_call.id)

    # (b) Node B's service and Asterisk die mid-call. New calls through the front, placed at once, are all
    # answered by node A (the front fails over from an unanswered INVITE, then its probes take B out).
    cluster.sandbox.kill_node(node_b)
    killed_at = time.monotonic()
    killed_wall = datetime.now(UTC)
    seen = {r.id for r in records} | before
    later = [cluster.call(hang_up_after_ms=6_000)]
    time.sleep(1.0)
    later.append(cluster.call(hang_up_after_ms=6_000))
    deadline = killed_at + WITHIN
    wait_for("B's call closed as node_lost", lambda: cluster.record(lost_call.id).outcome == "node_lost", deadline)
    # B's agent was reserved under B's lease: freed by the takeover, A rings it for a caller A holds.
    wait_for(
        f"{b_agent} ringing again, from {name_a}",
        lambda: any(
            ring.account_id == b_agent and ring.node == name_a and ring.rung_at >= killed_wall
            for ring in cluster.rings(cluster.records(seen))
        ),
        deadline,
    )
    closed = cluster.record(lost_call.id)
    assert closed.ended_at is not None
    assert name_b in (closed.error or ""), closed.error

    new_calls = [future.result(timeout=60) for future in later]
    assert all("ANSWERED" in call.stamps for call in new_calls), [call.errors[-500:] for call in new_calls]
    new_records = cluster.records(seen)
    assert len(new_records) == 2, new_records
    assert {r.node for r in new_records} == {name_a}, new_records
    # A's own first call ended normally; it was never touched by the takeover.
    for future in first:
        future.result(timeout=60)
    kept = next(r for r in records if r.node == name_a)
    assert cluster.record(kept.id).outcome not in ("node_lost", "in_progress")


def health(node: Node) -> int | None:
    """What the node's Asterisk answers the front's service probe (200 only while its service is connected)."""
    return sip_options("127.0.0.1", node.config.asterisk.sip_port, 0.5, user=HEALTH_USER)


def test_a_node_whose_service_died_leaves_the_front_and_returns_with_it(cluster: Cluster) -> None:
    node_a, node_b = cluster.sandbox.nodes
    name_a, name_b = node_a.config.service.node_name, node_b.config.service.node_name
    front = cluster.sandbox.front
    probe_period = front.ping_interval + front.ping_timeout + 1
    assert (health(node_a), health(node_b)) == (200, 200)

    # Only B's service dies: B's Asterisk still answers SIP, but no longer the health user.
    cluster.sandbox.kill_service(node_b)
    wait_for("B's health probe refused", lambda: health(node_b) == 404, time.monotonic() + 5)
    assert sip_options("127.0.0.1", node_b.config.asterisk.sip_port, 0.5) == 200

    # At once, before the front's probes have seen it: a call the front sends to B is refused with 503 and goes
    # on to A. After a probe period: B is out. Every caller is answered by A's service, which records the call:
    # a caller who heard B's unavailable prompt would have no record.
    before = {r.id for r in cluster.repo.list_recent(200)}
    calls = [cluster.call(hang_up_after_ms=2_000) for _ in range(2)]
    time.sleep(probe_period)
    log_before = cluster.sandbox.log_path.read_text(errors="replace")
    calls += [cluster.call(hang_up_after_ms=2_000) for _ in range(2)]
    placed = [future.result(timeout=40) for future in calls]
    # Taken out by its probes: after the probe period no INVITE was even tried on B.
    tried = cluster.sandbox.log_path.read_text(errors="replace")[len(log_before) :]
    assert f"INVITE to sip:{HEALTH_USER}@{node_b.sip_address}" not in tried, tried[-2000:]
    assert all("ANSWERED" in call.stamps for call in placed), [call.errors[-500:] for call in placed]
    wait_for("4 records", lambda: len(cluster.records(before)) == 4, time.monotonic() + 10)
    assert {r.node for r in cluster.records(before)} == {name_a}, cluster.records(before)

    # B's service returns: its probes succeed again, and the front gives it calls (a second call while the first
    # is up goes to the node with fewer calls).
    cluster.sandbox.start_service(node_b)
    assert health(node_b) == 200
    time.sleep(front.ping_interval * front.inactive_threshold + 1)
    again = {r.id for r in cluster.repo.list_recent(200)}
    back = [cluster.call(hang_up_after_ms=4_000)]
    time.sleep(1.0)
    back.append(cluster.call(hang_up_after_ms=4_000))
    assert all("ANSWERED" in future.result(timeout=40).stamps for future in back)
    wait_for("2 records", lambda: len(cluster.records(again)) == 2, time.monotonic() + 10)
    assert sorted(r.node for r in cluster.records(again)) == [name_a, name_b], cluster.records(again)


def test_node_b_asterisk_restarts_during_calls(cluster: Cluster) -> None:
    node_a, node_b = cluster.sandbox.nodes
    name_a, name_b = node_a.config.service.node_name, node_b.config.service.node_name
    front = cluster.sandbox.front

    # One caller on each node, each talking with an agent.
    before = {r.id for r in cluster.repo.list_recent(200)}
    first = [cluster.call(hang_up_after_ms=20_000)]
    time.sleep(1.0)
    first.append(cluster.call(hang_up_after_ms=20_000))
    wait_for(
        "both first calls answered by an agent",
        lambda: sum(ring.outcome == "answered" for ring in cluster.rings(cluster.records(before))) == 2,
        time.monotonic() + 20,
    )
    records = cluster.records(before)
    assert sorted(r.node for r in records) == [name_a, name_b], records
    on_b = next(r for r in records if r.node == name_b)
    b_agent = next(ring.account_id for ring in cluster.rings(records) if ring.call_id == on_b.id)

    # B's Asterisk stops (its service stays and waits for it). B's call drops: SIP can't keep it. Its record is
    # closed by B's own service, and its agent is free again: a new call, sent to A, rings that agent from A.
    node_b.sandbox.down()
    stopped = datetime.now(UTC)
    wait_for(
        "B's call closed",
        lambda: (r := cluster.record(on_b.id)).outcome != "in_progress" and r.ended_at is not None,
        time.monotonic() + 10,
    )
    seen = {r.id for r in records} | before
    later = cluster.call(hang_up_after_ms=4_000)
    wait_for(
        f"{b_agent} rung from {name_a} for a new caller",
        lambda: any(
            ring.account_id == b_agent and ring.node == name_a and ring.rung_at >= stopped
            for ring in cluster.rings(cluster.records(seen))
        ),
        time.monotonic() + 15,
    )
    assert {r.node for r in cluster.records(seen)} == {name_a}
    assert "ANSWERED" in later.result(timeout=40).stamps

    # B's Asterisk is back: B's service reconnects, the probe answers 200 again, and B takes calls again.
    node_b.sandbox.up()
    wait_for("B's service connected again", lambda: health(node_b) == 200, time.monotonic() + 30)
    time.sleep(front.ping_interval * front.inactive_threshold + 1)
    again = {r.id for r in cluster.repo.list_recent(200)}
    back = [cluster.call(hang_up_after_ms=3_000)]
    time.sleep(1.0)
    back.append(cluster.call(hang_up_after_ms=3_000))
    assert all("ANSWERED" in future.result(timeout=40).stamps for future in back)
    wait_for("2 records", lambda: len(cluster.records(again)) == 2, time.monotonic() + 10)
    assert name_b in {r.node for r in cluster.records(again)}, cluster.records(again)
    for future in first:
        future.exception(timeout=60)  # B's caller was cut off; A's hung up itself
    assert cluster.record(next(r.id for r in records if r.node == name_a)).outcome != "node_lost"
