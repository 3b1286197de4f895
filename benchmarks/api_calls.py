"""The wallboard under real calls: SIPp patients through the shipped hotline flow, SIPp agent phones answering,
``medhotline serve`` on the Asterisk sandbox, ``medhotline api`` on the same database, one supervisor's stream.

``python -m benchmarks.api`` (default ``--real-calls 200``; ``--smoke`` for the short run the tests make). Root is
needed (the sandbox), like ``benchmarks.load``, whose machinery starts everything here.

Two phases in one run, on the same service: a baseline of ``--baseline`` calls (default 10), then ``--real-calls``
calls. Each phase places its calls at ``--rate`` calls/s with SIPp, one in five an emergency (key 0 during the
greeting), the rest general questions (key 5); every caller hangs up ``--hold`` seconds after the key unless the
agent ended the call first (still in the queue: an abandoned call). ``--agents`` SIPp agent phones (nurses with a
verified licence, so they take both queues) answer after 1 s and talk ``--talk`` seconds (default 20); wrap-up is 2
s. With the defaults (45 s, 10 calls/s) an unanswered call lasts about 52 s against 20 s of ramp, and an answered
one stays in progress while its agent talks, so all 200 are in progress at once (the report prints the most calls in
progress at once, from their records; with 4 s of talk the agents ended about 16 calls during the ramp).

What is measured, for every call, is each change the wallboard shows, from the event in Asterisk to the snapshot
read by the client:

- ``waiting``: the call appears in its queue. Origin: the end of the route's prompt ("正在为您转接…"), the last
  ``PlaybackFinished`` on the caller's channel before the call showed: the service queues the call on that event
  (the caller's key came earlier, but the prompts between it and the queue are the flow's, not the wallboard's).
- ``talking``: the agent is shown talking with the call. Origin: the agent's leg answered (its
  ``ChannelStateChange`` to ``Up``).
- ``ended``: the call leaves the wallboard (its queue or the agent's row). Origin: the first hang-up of the call's
  legs (``ChannelHangupRequest``, ``StasisEnd`` or ``ChannelDestroyed`` of the caller's or the agent's channel).

Origins are the ``timestamp`` Asterisk puts on the ARI event (an observer application subscribed to every channel,
as in ``benchmarks.load``), not the time the service recorded the event: a supervisor waits from what happened on
the phone, and the service's own delay in handling the event (its event loop under 200 calls, the database write)
is part of what the figure must show; the record time would hide it. Asterisk and the client read the same host
clock. The client is the page's own stream (``GET /api/wallboard/events``, Server-Sent Events, signed in as a
supervisor with password and TOTP), read with httpx; the page's rendering (a few milliseconds of DOM work per
snapshot) is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from sqlalchemy import select
from websockets.asyncio.client import connect

from benchmarks.load import CLK, _cpu_ticks, _stamp, run_sipp, running_service
from compliance.accounts import AccountStore
from compliance.credentials import secret_bytes, totp_code, totp_step
from ground import db
from ground.config import Config
from ground.models import Call, CallStep
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Press, patient_scenario
from medhotline.phones.agent import AgentPhone
from medhotline.sandbox import Sandbox
from routing.store import AgentStore

SUPERVISOR = "sup.bench"
PASSWORD = "benchmark password 1"
AGENT_PREFIX = "benchnurse"
KEYS = {"emergency": "0", "general": "5"}
KINDS = ("waiting", "talking", "ended")
HANGUPS = ("ChannelHangupRequest", "StasisEnd", "ChannelDestroyed")
ROUTING = """
[routing]
ring_timeout = 8
wrap_up = 2
no_answer_pause = 5
"""


@dataclass
class Phase:
    name: str
    calls: int
    sipp_ok: int = 0
    sipp_failed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    unmatched: int = 0
    peak: int = 0  # the most calls in progress at once
    # The waiting change split at the service's own stamp of the queue entry: event → record, record → stream.
    split: dict[str, list[float]] = field(default_factory=lambda: {"service": [], "api": []})
    gaps: list[float] = field(default_factory=list)  # between two snapshots read (ms): the poll's real period
    service_cpu: float = 0.0
    asterisk_cpu: float = 0.0
    api_cpu: float = 0.0

    def all_samples(self) -> list[float]:
        return [v for k in KINDS for v in self.samples[k]]


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


# -- Asterisk's side: when each event happened ---------------------------------------------------------------


class Origins:
    """ARI events of every channel (``subscribeAll``), with Asterisk's timestamps."""

    def __init__(self, config: Config, sandbox: Sandbox) -> None:
        creds = sandbox.credentials()
        query = urlencode({"app": "wallboard-observer", "subscribeAll": "true"})
        self.url = f"ws://{config.asterisk.host}:{config.asterisk.ari_port}/ari/events?{query}"
        token = base64.b64encode(f"{creds.ari_username}:{creds.ari_password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}
        self.played: dict[str, list[float]] = {}  # channel id → its prompts' ends
        self.answered: dict[str, list[tuple[float, str]]] = {}  # agent → (its leg up, channel id)
        self.hangup: dict[str, float] = {}  # channel id → its first hang-up event

    async def run(self) -> None:
        async with connect(self.url, additional_headers=self.headers, max_size=2**22) as ws:
            async for message in ws:
                event = json.loads(message)
                kind, channel = event.get("type"), event.get("channel") or {}
                if kind == "PlaybackFinished":
                    target = str(event.get("playback", {}).get("target_uri", ""))
                    if target.startswith("channel:"):
                        self.played.setdefault(target[8:], []).append(_stamp(event["timestamp"]))
                    continue
                if not channel:
                    continue
                if kind == "ChannelStateChange" and channel.get("state") == "Up":
                    name = str(channel.get("name", ""))
                    if name.startswith(f"PJSIP/{AGENT_PREFIX}"):
                        agent = name.removeprefix("PJSIP/").rsplit("-", 1)[0]
                        self.answered.setdefault(agent, []).append((_stamp(event["timestamp"]), channel["id"]))
                elif kind in HANGUPS:
                    self.hangup.setdefault(channel["id"], _stamp(event["timestamp"]))


# -- the client's side: when each change reached the wallboard's stream -----------------------------------------


class Stream:
    """The wallboard's SSE stream as the page reads it; notes when each call first shows in each state."""

    def __init__(self) -> None:
        self.waiting: dict[str, float] = {}
        self.talking: dict[str, tuple[float, str]] = {}  # call → (arrival, agent)
        self.ended: dict[str, float] = {}
        self.present: set[str] = set()
        self.snapshots = 0
        self.arrivals: list[float] = []

    async def run(self, base: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", "/api/wallboard/events", headers=headers) as response,
        ):
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    self.take(time.time(), json.loads(line[6:]))

    def take(self, now: float, board: dict[str, object]) -> None:
        self.snapshots += 1
        self.arrivals.append(now)
        current: set[str] = set()
        for queue in board["queues"]:  # type: ignore[attr-defined]
            for call in queue["calls"]:
                self.waiting.setdefault(call["call_id"], now)
                current.add(call["call_id"])
        for agent in board["agents"]:  # type: ignore[attr-defined]
            if agent["state"] == "talking" and agent["call_id"]:
                self.talking.setdefault(agent["call_id"], (now, agent["agent_id"]))
                current.add(agent["call_id"])
        for gone in self.present - current:
            self.ended.setdefault(gone, now)
        self.present = current


# -- the pieces around the service ---------------------------------------------------------------------------


def add_people(config: Config, phones: list[AgentPhone]) -> None:
    sessions = db.make_sessionmaker(config.database_url)
    store, accounts, now = AgentStore(sessions), AccountStore(sessions), datetime.now(UTC)
    accounts.add("admin.bench", "Credentials office", ["admin"], now)
    accounts.add(SUPERVISOR, "Benchmark supervisor", ["supervisor"], now)
    for phone in phones:
        store.add_agent_with_account(phone.name, phone.name, ["nurse"], phone.name, now, contact=phone.contact)
        licence = store.add_credential(phone.name, "nurse_license", f"L-{phone.name}", "卫健委",
                                       now - timedelta(days=365), now + timedelta(days=365), now)  # fmt: skip
        store.verify_credential(licence, "admin.bench", now)


def medhotline_cli(config_path: Path, *argv: str, stdin: str = "") -> str:
    """``medhotline --config CONFIG ARGV…`` → its standard output; RuntimeError with its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "medhotline", "--config", str(config_path), *argv],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"medhotline {' '.join(argv)} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def sign_in(base: str, config_path: Path, account: str, password: str = PASSWORD) -> str:
    """Give ``account`` a password and a TOTP secret with ``medhotline signin`` (the secret is sealed through the
    configured key service, which must be running), sign in over the API → the session token."""
    medhotline_cli(config_path, "signin", "password", account, stdin=password + "\n")
    uri = medhotline_cli(config_path, "signin", "totp", account).splitlines()[-1]
    secret = parse_qs(urlsplit(uri).query)["secret"][0]
    code = totp_code(secret_bytes(secret), totp_step(datetime.now(UTC)))
    response = httpx.post(f"{base}/api/login", json={"account": account, "password": password, "code": code})
    if response.status_code != 200:
        raise RuntimeError(f"sign-in of {account} refused: {response.status_code} {response.text}")
    token = response.json()["token"]
    if not isinstance(token, str):
        raise TypeError(f"sign-in of {account}: no session token in {response.text}")
    return token


@contextmanager
def api_server(config_path: Path, stderr_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``medhotline --config CONFIG api --port 0`` until the block ends → (its base URL, the process)."""
    errors = stderr_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "medhotline", "--config", str(config_path), "api", "--port", "0"],
        stdout=subprocess.PIPE, stderr=errors, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on http://127.0.0.1:"):
            raise RuntimeError(f"medhotline api did not start: {line!r} {stderr_path.read_text(encoding='utf-8')}")
        yield line.split()[-1], process
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
        errors.close()


def call_channels(config: Config) -> dict[str, str]:
    """Every call's id → its caller's channel id (the benchmark's own mapping; the wallboard never shows it)."""
    engine = db.make_engine(config.database_url)
    try:
        with engine.connect() as connection:
            return {row.id: row.channel_id for row in connection.execute(select(Call.id, Call.channel_id))}
    finally:
        engine.dispose()


def outcomes(config: Config, ids: set[str]) -> tuple[dict[str, int], int]:
    """How the phase's calls ended, and the most of them in progress at once (from their records)."""
    engine = db.make_engine(config.database_url)
    counts: dict[str, int] = {}
    edges: list[tuple[datetime, int]] = []
    try:
        with engine.connect() as connection:
            for row in connection.execute(select(Call.id, Call.outcome, Call.started_at, Call.ended_at)):
                if row.id in ids:
                    counts[str(row.outcome)] = counts.get(str(row.outcome), 0) + 1
                    edges += [(row.started_at, 1)] + ([(row.ended_at, -1)] if row.ended_at else [])
    finally:
        engine.dispose()
    current = peak = 0
    for _, step in sorted(edges):
        current += step
        peak = max(peak, current)
    return counts, peak


def queued_at(config: Config) -> dict[str, float]:
    """Every call's ``queued`` step as the service stamped it (its clock when it queued the call)."""
    engine = db.make_engine(config.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(CallStep.call_id, CallStep.at).where(CallStep.flow == "queue", CallStep.node == "queued")
            )
            return {row.call_id: row.at.timestamp() for row in rows}
    finally:
        engine.dispose()


def measure(phase: Phase, ids: set[str], channels: dict[str, str], origins: Origins, stream: Stream,
            queued: dict[str, float]) -> None:  # fmt: skip
    """Each change the stream saw for the phase's calls, against its origin in Asterisk (ms)."""
    for call_id in ids:
        channel = channels.get(call_id)
        if channel is None:
            continue
        seen = stream.waiting.get(call_id)
        if seen is not None:
            ends = [t for t in origins.played.get(channel, []) if t <= seen]
            if ends:
                phase.samples["waiting"].append(1000 * (seen - max(ends)))
                if call_id in queued:
                    phase.split["service"].append(1000 * (queued[call_id] - max(ends)))
                    phase.split["api"].append(1000 * (seen - queued[call_id]))
            else:
                phase.unmatched += 1
        agent_channel = None
        if call_id in stream.talking:
            seen, agent = stream.talking[call_id]
            ups = [(t, c) for t, c in origins.answered.get(agent, []) if t <= seen]
            if ups:
                up, agent_channel = max(ups)
                phase.samples["talking"].append(1000 * (seen - up))
            else:
                phase.unmatched += 1
        if call_id in stream.ended:
            ends = [origins.hangup[c] for c in (channel, agent_channel) if c is not None and c in origins.hangup]
            if ends:
                phase.samples["ended"].append(1000 * (stream.ended[call_id] - min(ends)))
            else:
                phase.unmatched += 1


# -- one phase -------------------------------------------------------------------------------------------------


async def run_phase(phase: Phase, config: Config, sandbox: Sandbox, pids: dict[str, int], args: argparse.Namespace,
                    origins: Origins, stream: Stream) -> None:  # fmt: skip
    state = config.service.state_dir / phase.name
    state.mkdir()
    emergencies = max(1, phase.calls // 5)
    groups = {"emergency": emergencies, "general": phase.calls - emergencies}
    before = set(call_channels(config))
    ticks = {name: _cpu_ticks(pid) for name, pid in pids.items()}
    started, start_wall = time.monotonic(), time.time()
    runs = []
    for category, count in groups.items():
        if count == 0:
            continue
        work = state / category
        work.mkdir()
        scenario = work / "caller.xml"
        scenario.write_text(patient_scenario([Press(1000, KEYS[category])], int(args.hold * 1000)), encoding="utf-8")
        rate = args.rate * count / phase.calls
        runs.append(asyncio.to_thread(run_sipp, config, scenario, count, rate, work))
    for ok, failed in await asyncio.gather(*runs):
        phase.sipp_ok += ok
        phase.sipp_failed += failed
    wall, end_wall = time.monotonic() - started, time.time()
    cpu = {name: (_cpu_ticks(pid) - ticks[name]) / CLK / wall for name, pid in pids.items()}
    phase.service_cpu, phase.asterisk_cpu, phase.api_cpu = cpu["service"], cpu["asterisk"], cpu["api"]
    # The last changes reach the stream (a poll and a snapshot); then nothing of this phase is left on the board.
    for _ in range(60):
        await asyncio.sleep(1)
        if not stream.present:
            break
    channels = call_channels(config)
    ids = set(channels) - before
    phase.outcomes, phase.peak = outcomes(config, ids)
    measure(phase, ids, channels, origins, stream, queued_at(config))
    # While the calls ran (afterwards an empty board no longer changes, and nothing is sent).
    times = [t for t in stream.arrivals if start_wall <= t <= end_wall]
    phase.gaps = [1000 * (b - a) for a, b in itertools.pairwise(times)]


def report(phases: list[Phase]) -> None:
    print("event → wallboard stream, origin = Asterisk's ARI event timestamp (ms)")
    print(f"{'phase':>9} {'calls':>5} {'event':>8} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    for phase in phases:
        rows = [(k, phase.samples[k]) for k in KINDS] + [("all", phase.all_samples())]
        for kind, values in rows:
            worst = max(values, default=float("nan"))
            print(f"{phase.name:>9} {phase.calls:>5} {kind:>8} {len(values):>5} {pct(values, 0.5):>7.0f} "
                  f"{pct(values, 0.95):>7.0f} {pct(values, 0.99):>7.0f} {worst:>7.0f}")  # fmt: skip
        outcome = ", ".join(f"{k} {v}" for k, v in sorted(phase.outcomes.items()))
        print(f"{'':>9} calls: {outcome}; at most {phase.peak} at once; SIPp ok {phase.sipp_ok} / failed "
              f"{phase.sipp_failed} (a call the agent ended counts as failed: the caller's script expects to hang up "
              f"itself); unmatched {phase.unmatched}; "
              f"CPU (share of one core): service {100 * phase.service_cpu:.0f}%, Asterisk "
              f"{100 * phase.asterisk_cpu:.0f}%, api {100 * phase.api_cpu:.0f}%")  # fmt: skip
        service, api = phase.split["service"], phase.split["api"]
        print(f"{'':>9} waiting split at the service's queued stamp: route prompt end → queued p50/p99 "
              f"{pct(service, 0.5):.0f}/{pct(service, 0.99):.0f} ms, queued → stream p50/p99 {pct(api, 0.5):.0f}/"
              f"{pct(api, 0.99):.0f} ms; between snapshots p50/p99 {pct(phase.gaps, 0.5):.0f}/"
              f"{pct(phase.gaps, 0.99):.0f} ms")  # fmt: skip
    base, load = phases[0].all_samples(), phases[-1].all_samples()
    if base and load:
        print(f"p99 at {phases[-1].calls} calls: {pct(load, 0.99) / pct(base, 0.99):.2f}x its value at "
              f"{phases[0].calls} calls (same run; the machine is shared)")  # fmt: skip


async def main_async(args: argparse.Namespace) -> list[Phase]:
    state = Path(tempfile.mkdtemp(prefix="medhotline-bench-wallboard-"))
    phones = [AgentPhone(f"{AGENT_PREFIX}{i}", free_port(socket.SOCK_DGRAM), free_rtp_range(4),
                         answer_after_ms=1000, talk_ms=int(args.talk * 1000)) for i in range(args.agents)]  # fmt: skip
    for phone in phones:
        phone.start()
    phases = [Phase("baseline", args.baseline), Phase("load", args.real_calls)]
    try:
        with (
            running_service(state, args.real_calls + 20, ROUTING, lambda c: add_people(c, phones)) as (
                config, sandbox, service),
            api_server(config.service.state_dir / "medhotline.toml", config.service.state_dir / "api.stderr") as (
                base, api),
        ):  # fmt: skip
            deadline = time.monotonic() + 30
            while not all(f" {p.name}/" in sandbox.cli_output("pjsip show endpoints") for p in phones):
                if time.monotonic() > deadline:
                    raise SystemExit("the agents' endpoints were not configured in Asterisk")
                await asyncio.sleep(0.5)
            token = await asyncio.to_thread(sign_in, base, config.service.state_dir / "medhotline.toml", SUPERVISOR)
            origins, stream = Origins(config, sandbox), Stream()
            tasks = [asyncio.create_task(origins.run()), asyncio.create_task(stream.run(base, token))]
            await asyncio.sleep(1)
            assert service.proc is not None
            asterisk = sandbox.pid()
            assert asterisk is not None
            pids = {"service": service.proc.pid, "asterisk": asterisk, "api": api.pid}
            for phase in phases:
                await run_phase(phase, config, sandbox, pids, args, origins, stream)
                print(f"{phase.name}: {phase.calls} calls done, {stream.snapshots} snapshots so far", flush=True)
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
            print(f"state (logs, SIPp errors): {config.service.state_dir}")
    finally:
        for phone in phones:
            phone.stop()
        if args.smoke:  # the tests' run keeps nothing behind; a full run keeps its logs (path printed above)
            shutil.rmtree(state, ignore_errors=True)
    return phases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real-calls", type=int, default=200, help="concurrent SIPp calls (default 200)")
    parser.add_argument("--baseline", type=int, default=10, help="calls of the low-load baseline (default 10)")
    parser.add_argument("--agents", type=int, default=10, help="SIPp agent phones (default 10)")
    parser.add_argument("--hold", type=float, default=45.0, help="seconds a caller waits before giving up")
    parser.add_argument("--talk", type=float, default=20.0, help="seconds an agent talks (default 20)")
    parser.add_argument("--rate", type=float, default=10.0, help="new calls per second")
    parser.add_argument("--smoke", action="store_true", help="short run for the tests: 2 then 6 calls, 2 agents")


def smoke(args: argparse.Namespace) -> None:
    """The short run the tests make (about 45 s): 2 then 6 calls, 2 agents; callers wait 12 s after their key,
    long enough for the emergency route's prompt (about 6 s) and a ring."""
    args.real_calls, args.baseline, args.agents, args.hold, args.rate, args.talk = 6, 2, 2, 12.0, 5.0, 4.0


def run(args: argparse.Namespace) -> int:
    """Run the real-call benchmark; 1 when a phase saw no event at all (nothing was measured)."""
    if args.smoke:
        smoke(args)
    if os.geteuid() != 0 or shutil.which("sipp") is None:
        print("needs root (the Asterisk sandbox) and sipp", file=sys.stderr)
        return 2
    phases = asyncio.run(main_async(args))
    report(phases)
    return 0 if all(p.samples["waiting"] and p.samples["ended"] for p in phases) else 1
