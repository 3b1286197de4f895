"""The cluster behind Kamailio: one node against two, in the same run.

Run ``python -m benchmarks.cluster [--quick] [--rates 5,10,20] [--calls 60] [--hold 3] [--rounds 20] [--keep]``
as root (the Asterisk sandbox), with a PostgreSQL for the nodes' services: ``source scripts/postgres.sh`` first
(its ``MEDHOTLINE_TEST_POSTGRES_URL`` is used), or ``--database-url``.

For each configuration, one node then two (``ClusterSandbox(services=True)``: per node a sandbox Asterisk and a
``medhotline serve``, one key service, Kamailio in front, ``[cluster] enabled``), two agent phones (SIPp UAS at
static contacts that every node dials) and the route-first flow of ``benchmarks.ring``:

- **Accepted calls at stepped rates.** With both agents paused (so no caller leaves the queue), one SIPp process
  per step places ``--calls`` calls through the front at the step's rate; each caller hangs up ``--hold`` s after
  its answer, so about rate × hold calls are up at once. Per step: SIPp's successful and failed calls (failed:
  an error answer or no answer in time), SIPp's mean INVITE → 200 OK, and, for two nodes, how many calls each
  node's records hold. Every step waits until every record is closed before the next.
- **Ring latency through the front.** Both agents unpaused, ``--rounds`` calls one after another, measured as
  ``benchmarks.ring`` does (its code): the caller's INVITE sent → the first agent phone's INVITE received, both on
  SIPp's clock. The caller lands on some node, which dials the agent itself.

The one-node figures are the baseline; the two-node ones are printed beside them with the ratio. Both nodes run on
the same two cores here, so two nodes do not add CPU: what the ratio shows is the cost or gain of spreading (the
proxy hop, a second service, the shared queue in PostgreSQL), not a second machine's capacity. The figures are
only meaningful as ratios within one run; the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from benchmarks.ring import (
    AGENTS,
    CALLER,
    CALLER_XML,
    percentile,
    ring_once,
    wait_for,
    write_config,
)
from ground import db
from ground.config import Config, load_config
from medhotline.cluster_sandbox import ClusterSandbox, Node
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones.agent import AgentPhone
from medhotline.phones.batch import place_calls
from medhotline.prompts import build_prompts
from routing.store import AgentStore

POSTGRES_ENV = "MEDHOTLINE_TEST_POSTGRES_URL"


def cluster_settings(front_port: int, database_url: str) -> str:
    """What the ring benchmark's config lacks for a cluster: one queue over nodes, the front, the database."""
    return f"""
[cluster]
enabled = true

[cluster.front]
listen = "127.0.0.1:{front_port}"

[database]
url = "{database_url}"
"""


def proxied(caller_xml: str) -> str:
    """The ring benchmark's caller through a record-routing proxy: ACK along the 200 OK's route set (the BYE
    comes from the node, through the proxy, and is answered on its own Via)."""
    for direct, routed in (
        ('<recv response="200" rtd="true"/>', '<recv response="200" rtd="true" rrs="true"/>'),
        ("ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0", "ACK [next_url] SIP/2.0\n      [routes]"),
    ):
        if direct not in caller_xml:
            raise RuntimeError(f"benchmarks.ring's caller changed: no {direct!r} to route through the front")
        caller_xml = caller_xml.replace(direct, routed)
    return caller_xml


@dataclass
class Step:
    rate: float
    placed: int
    successful: int
    failed: int
    answer_ms: list[float]
    per_node: dict[str, int]
    unclosed: int


@dataclass
class Result:
    nodes: int
    steps: list[Step] = field(default_factory=list)
    ring: list[float] = field(default_factory=list)
    ring_failed: int = 0


@dataclass
class Run:
    config: Config
    config_path: Path
    state: Path
    phones: dict[str, AgentPhone]
    caller_xml: Path


@contextlib.contextmanager
def prepared(database_url: str, keep: bool) -> Iterator[Run]:
    """The shared pieces: config, flows, prompts, the agents in the database and their phones."""
    state = Path(tempfile.mkdtemp(prefix="clusterbench-"))
    phones = {
        name: AgentPhone(
            name, free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=100, talk_ms=300
        ).start()
        for name in AGENTS
    }
    try:
        path = write_config(state)
        with path.open("a", encoding="utf-8") as out:
            out.write(cluster_settings(free_port(socket.SOCK_DGRAM), database_url))
        config = load_config(path, environ={})
        db.upgrade(config.database_url)
        build_prompts(config)
        engine = db.make_engine(config.database_url)
        try:
            store = AgentStore(sessionmaker(engine, expire_on_commit=False))
            now = datetime.now(UTC)
            known = {agent.id for agent in store.routing_snapshot()}
            for name in AGENTS:
                # A database kept from an earlier run already has them: only their phones' ports are new.
                if name in known:
                    store.set_contact(name, phones[name].contact, now)
                else:
                    store.add_agent_with_account(name, name, ["agent"], name, now, contact=phones[name].contact)
        finally:
            engine.dispose()
        caller_xml = state / "caller.xml"
        caller_xml.write_text(proxied(CALLER_XML), encoding="utf-8")
        yield Run(config, path, state, phones, caller_xml)
    finally:
        for phone in phones.values():
            phone.stop()
        if keep:
            print(f"state kept in {state}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


def endpoints(node: Node) -> bool:
    """The node's service wrote both agents' PJSIP endpoints into its Asterisk: it can dial them."""
    out = node.sandbox.cli_output("pjsip show endpoints")
    return all(f" {agent}/" in out for agent in AGENTS)


@contextlib.contextmanager
def cluster(run: Run, nodes: int, max_calls: int) -> Iterator[ClusterSandbox]:
    """``nodes`` nodes with their services behind Kamailio, the agents' endpoints written on every node."""
    front = ClusterSandbox(
        run.config,
        nodes,
        run.state / f"front{nodes}",
        services=True,
        config_path=run.config_path,
        max_calls=max_calls,
    )
    front.up()
    try:
        for node in front.nodes:
            wait_for(f"the agents' endpoints on {node.config.service.node_name}", partial(endpoints, node), 60)
        yield front
    finally:
        front.down()
        for node in front.nodes:
            shutil.rmtree(node.sandbox.instance_dir, ignore_errors=True)


def step(front: ClusterSandbox, repo: db.CallRepository, number: str, rate: float, calls: int, hold: float) -> Step:
    """One SIPp batch through the front at ``rate``; then every record of it closed (or counted as not)."""
    before = {r.id for r in repo.list_recent(10_000)}
    batch = place_calls(
        target_host=front.front_host,
        target_port=front.front_port,
        service=number,
        local_port=free_port(socket.SOCK_DGRAM),
        media_port=free_rtp_range(4),
        caller=CALLER,
        count=calls,
        rate=rate,
        hang_up_after_ms=int(hold * 1000),
        proxied=True,
        timeout=calls / rate + hold + 60,
    )
    if batch.failed:
        print(f"  {rate:g}/s: {batch.failed} failed; SIPp's errors end with:\n{batch.errors[-600:]}", file=sys.stderr)

    def new() -> list[db.CallRecord]:
        return [r for r in repo.list_recent(10_000) if r.id not in before]

    with contextlib.suppress(RuntimeError):
        wait_for("every record closed", lambda: all(r.outcome != "in_progress" for r in new()), 30)
    records = new()
    per_node: dict[str, int] = {}
    for record in records:
        per_node[record.node or "?"] = per_node.get(record.node or "?", 0) + 1
    return Step(
        rate=rate,
        placed=calls,
        successful=batch.successful,
        failed=batch.failed,
        answer_ms=[1000 * t for t in batch.answer_times],
        per_node=dict(sorted(per_node.items())),
        unclosed=sum(r.outcome == "in_progress" for r in records),
    )


def measure(run: Run, nodes: int, rates: list[float], calls: int, hold: float, rounds: int) -> Result:
    result = Result(nodes)
    max_calls = max(10, int(max(rates) * hold) + 20)
    engine = db.make_engine(run.config.database_url)
    try:
        sessions = sessionmaker(engine, expire_on_commit=False)
        repo, store = db.CallRepository(sessions), AgentStore(sessions)
        with cluster(run, nodes, max_calls) as front:
            print(f"{nodes} node(s) up; front {front.front_address}", file=sys.stderr)
            # Accepted calls: both agents paused, so the callers stay in the queue until they hang up.
            for agent in AGENTS:
                store.pause(agent, "benchmark: accepted calls", datetime.now(UTC))
            # Warm-up, not counted: a fresh node's first calls pay for first use (prompt files, connections).
            step(front, repo, run.config.hotline.number, min(rates), min(calls, 10), hold)
            for rate in rates:
                result.steps.append(step(front, repo, run.config.hotline.number, rate, calls, hold))
                done = result.steps[-1]
                print(f"  {rate:g}/s: {done.successful} ok, {done.failed} failed, {done.per_node}", file=sys.stderr)
            for agent in AGENTS:
                store.unpause(agent, datetime.now(UTC))
            time.sleep(1.0)  # both nodes' dispatchers have read the agents as free
            target = (front.front_host, front.front_port)
            number = run.config.hotline.number
            # One warm-up call: first-use costs on each side are not ring latency.
            ring_once(target, number, run.caller_xml, run.phones, f"{nodes} node(s) warm-up")
            time.sleep(0.6)
            for _ in range(rounds):
                timing = ring_once(target, number, run.caller_xml, run.phones, f"{nodes} node(s)")
                if timing is None:
                    result.ring_failed += 1
                else:
                    result.ring.append(timing[1] - timing[0])
                time.sleep(0.6)  # both agents free again (wrap-up 0.2 s, reservation released)
    finally:
        engine.dispose()
    return result


def ring_cells(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8}"
    return " ".join(f"{1000 * percentile(values, q):8.1f}" for q in (50, 95, 99))


def report(results: list[Result], rates: list[float], calls: int, hold: float) -> list[str]:
    load = os.getloadavg()
    base = results[0]
    lines = [
        f"cluster behind Kamailio: {calls} calls per step, each held {hold:g} s; ring latency caller INVITE → agent "
        "INVITE (SIPp clocks)",
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
        "answer = the caller's INVITE → 200 OK (SIPp, whole ms); p95 vs 1 node at the same rate",
        f"{'nodes':>5} {'rate/s':>6} {'ok':>4} {'failed':>6} {'ans p50':>8} {'ans p95':>8} {'p95 ratio':>9}  per node",
    ]
    for result in results:
        for index, current in enumerate(result.steps):
            mine, theirs = current.answer_ms, base.steps[index].answer_ms
            cells = " ".join(f"{percentile(mine, q):8.0f}" if mine else f"{'-':>8}" for q in (50, 95))
            ratio = (
                f"{percentile(mine, 95) / percentile(theirs, 95):8.2f}x"
                if mine and theirs and percentile(theirs, 95)
                else f"{'-':>9}"
            )
            spread = " ".join(f"{name}={count}" for name, count in current.per_node.items())
            unclosed = f" ({current.unclosed} records still open)" if current.unclosed else ""
            lines.append(
                f"{result.nodes:>5} {current.rate:>6g} {current.successful:>4} {current.failed:>6} {cells} {ratio}"
                f"  {spread}{unclosed}"
            )
    for result in results:
        clean = [s.rate for s in result.steps if s.failed == 0 and s.successful == s.placed]
        best = f"{max(clean):g}" if clean else "none"
        lines.append(f"{result.nodes} node(s): highest stepped rate with 0 failed calls: {best}/s")
    lines.append(f"{'nodes':>5} {'calls':>5} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  ring latency")
    for result in results:
        lines.append(f"{result.nodes:>5} {len(result.ring):>5} {result.ring_failed:>6} {ring_cells(result.ring)}")
    for result in results[1:]:
        if result.ring and base.ring:
            ratios = (percentile(result.ring, q) / percentile(base.ring, q) for q in (50, 95))
            lines.append(
                f"ring latency, {result.nodes} nodes / 1 node: p50 {next(ratios):.2f}x, p95 {next(ratios):.2f}x"
            )
            lines.append(
                f"  (means {1000 * statistics.mean(result.ring):.1f} ms vs {1000 * statistics.mean(base.ring):.1f} ms)"
            )
    return lines


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates: comma-separated numbers, not {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"--rates: positive calls per second, not {text!r}")
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", type=parse_rates, default=[5.0, 10.0, 20.0, 40.0], help="calls/s per step (5,10,20,40)"
    )
    parser.add_argument("--calls", type=int, default=60, help="calls per step (default 60)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds each caller stays after its answer")
    parser.add_argument("--rounds", type=int, default=20, help="ring latency calls per configuration")
    parser.add_argument("--quick", action="store_true", help="a smoke run: rates 5,10, 20 calls, 5 rounds")
    parser.add_argument("--database-url", default=os.environ.get(POSTGRES_ENV, ""), help=f"default: ${POSTGRES_ENV}")
    parser.add_argument("--keep", action="store_true", help="keep the state directory (logs) afterwards")
    args = parser.parse_args(argv)
    rates: list[float] = [5.0, 10.0] if args.quick else args.rates
    calls, rounds = (20, 5) if args.quick else (args.calls, args.rounds)
    if calls < 1 or rounds < 1 or args.hold <= 0:
        parser.error("--calls and --rounds must be at least 1, --hold positive")
    if not args.database_url.startswith("postgresql"):
        parser.error(
            f"the nodes' services share a PostgreSQL: `source scripts/postgres.sh` (sets ${POSTGRES_ENV}) or "
            "--database-url postgresql+psycopg://..."
        )
    if os.geteuid() != 0:
        print("benchmarks.cluster needs root (the Asterisk sandbox)", file=sys.stderr)
        return 2
    for tool in ("sipp", "kamailio", "espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/bootstrap installs it)", file=sys.stderr)
            return 2
    with prepared(args.database_url, args.keep) as run:
        results = [measure(run, nodes, rates, calls, args.hold, rounds) for nodes in (1, 2)]
    print("\n".join(report(results, rates, calls, args.hold)))
    failed = any(s.failed or s.unclosed for r in results for s in r.steps) or any(r.ring_failed for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
