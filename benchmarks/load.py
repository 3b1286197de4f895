"""Concurrent IVR calls: SIPp callers against the sandbox with the shipped hotline flow, in growing steps.

Run ``python -m benchmarks.load [--steps 10,50,100,200,300,400,500] [--hold 40] [--rate 15] [--chart load.png]
[--rest-transport websocket|http]``
(root: the Asterisk sandbox and SIPp, like the integration tests), or ``--quick`` for a smoke run with tiny
numbers that CI can afford. ``--profile`` samples the service with py-spy during the largest step and prints
where it spends its time.

Each step starts one SIPp process that places ``N`` calls at ``--rate`` calls/s; every caller hears the notices
and the main menu, then walks the vaccination menus and their FAQ with real RFC 4733 keys, each pressed once the
prompt before it has finished, for about ``--hold`` seconds, and hangs up. Per step it prints: calls attempted,
completed and failed (SIPp's count), calls the service dropped (records ending in connection_lost or error),
the service's and Asterisk's CPU (share of one core, from /proc, over the step), the service's peak RSS, and the
IVR's responsiveness: the time from a key press to the next prompt starting, p50/p99.

Responsiveness is measured at Asterisk, not at the caller's RTP: an observer ARI application subscribed to all
channels (``subscribeAll``) takes the timestamps Asterisk puts on ``ChannelDtmfReceived`` (the key's end, as
Asterisk decoded it from RTP) and on the channel's next ``PlaybackStarted``. That interval is the whole service
round trip (event, database step, play request); the RTP on loopback adds well under a millisecond. Capturing the
callers' RTP instead would cost a Python sniffer more CPU than the service at 500 calls (25,000 packets/s), on
the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

from websockets.asyncio.client import connect

from ground import db
from ground.config import Config, ConfigError, load_config
from ivr.flow_loader import load_flows
from ivr.prompts import Voice, sound_name
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Press, patient_scenario
from medhotline.prompts import build_prompts
from medhotline.sandbox import Sandbox, SandboxError
from medhotline.service_process import KeyServiceProcess, ServiceProcess

DIALPLANS = Path(__file__).resolve().parents[1] / "dialplans"
CALLER = "13900000000"  # made up
# Pause after a prompt ends before the caller presses: the key then falls in silence, so the next prompt is
# the answer to it (and not the rest of an interrupted one).
AFTER_PROMPT_MS = 600
CLK = os.sysconf("SC_CLK_TCK")


@dataclass
class Step:
    calls: int
    attempted: int = 0
    completed: int = 0
    failed: int = 0
    dropped: int = 0
    service_cpu: float = 0.0
    asterisk_cpu: float = 0.0
    service_rss_mb: float = 0.0
    key_to_prompt_ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        data = sorted(self.key_to_prompt_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]


# -- the sandbox and the service ----------------------------------------------------------------------------


def write_config(state: Path, max_calls: int, extra: str = "") -> Path:
    """The benchmark's configuration; ``extra`` is appended (TOML sections, e.g. ``[speech]``)."""
    ports = 6 * max_calls + 100
    start = free_rtp_range(ports)
    shutil.copytree(DIALPLANS, state / "dialplans")
    path = state / "medhotline.toml"
    path.write_text(
        f"""
[service]
state_dir = "{state}"
log_file = "{state / "service.jsonl"}"
log_level = "info"

[asterisk]
sip_port = {free_port(socket.SOCK_DGRAM)}
rtp_start = {start}
rtp_end = {start + ports}
max_calls = {max_calls}
ari_port = {free_port(socket.SOCK_STREAM)}
ami_port = {free_port(socket.SOCK_STREAM)}

[asterisk.sandbox]
instance = "load{os.getpid()}"

[fastagi]
port = {free_port(socket.SOCK_STREAM)}

[keyservice]
directory = "{state / "keys"}"

[hotline]
flows_dir = "{state / "dialplans"}"

[prompts]
speed = 240
"""
        + extra,
        encoding="utf-8",
    )
    return path


@contextmanager
def running_service(
    state: Path, max_calls: int, extra: str = "", before_start: Callable[[Config], None] | None = None
) -> Iterator[tuple[Config, Sandbox, ServiceProcess]]:
    """The sandbox, the key service and ``medhotline serve``; ``before_start`` runs on the migrated database
    before the service starts (e.g. to add agents, whose PJSIP endpoints the service writes at its start)."""
    for attempt in range(10):
        # The machine is shared: a port of the random RTP range may be taken; another range then.
        attempt_dir = state / f"attempt{attempt}"
        attempt_dir.mkdir(mode=0o700)
        try:
            path = write_config(attempt_dir, max_calls, extra)
            config = load_config(path, environ={})  # an ephemeral SIP port may fall into the random RTP range
            sandbox = Sandbox(config)
            sandbox.up()
            break
        except (SandboxError, ConfigError) as exc:
            print(f"sandbox not started ({exc}); another port range", file=sys.stderr)
    else:
        raise SystemExit("the sandbox could not start on ten port ranges")
    state = attempt_dir
    try:
        db.upgrade(config.database_url)
        build_prompts(config)
        if before_start is not None:
            before_start(config)
        keyservice = KeyServiceProcess(config, path, state / "keyservice.stdout")
        keyservice.start()
        try:
            service = ServiceProcess(config, path, state / "service.stdout")
            service.start(timeout=60)
            try:
                yield config, sandbox, service
            finally:
                service.stop()
        finally:
            keyservice.stop()
    finally:
        sandbox.down()
        shutil.rmtree(sandbox.instance_dir, ignore_errors=True)


# -- the callers ------------------------------------------------------------------------------------------------


def _seconds(config: Config, sandbox: Sandbox, text: str) -> float:
    voice = Voice(config.prompts.voice, config.prompts.speed)
    with wave.open(str(sandbox.sounds_dir / f"{sound_name(text, voice)}.wav")) as wav:
        return float(wav.getnframes()) / float(wav.getframerate())


def caller_script(config: Config, sandbox: Sandbox, hold: float) -> tuple[list[Press], int]:
    """The keys of one caller (each after the prompt before it has ended) and the pause before hanging up.

    3 during the greeting (vaccination), 2 (FAQ), then 1 (before the jab: the answer, then "more?") and 1 (back to the
    FAQ) until ``hold`` seconds have passed."""
    flow = load_flows(config.hotline.flows_dir)["hotline"].flow

    def say(node: str) -> float:
        text = flow.nodes[node].say
        return _seconds(config, sandbox, text) if text else 0.0

    # The first key during the greeting (type-ahead, as callers who know the menu do); the others in silence.
    walk = [(1.0, "3"), (say("vaccination_menu"), "2")]
    elapsed = sum(seconds for seconds, _ in walk)
    while elapsed < hold:
        walk += [(say("vaccine_faq"), "1"), (say("faq_before") + say("faq_more"), "1")]
        elapsed += say("vaccine_faq") + say("faq_before") + say("faq_more")
    presses = [Press(int(seconds * 1000) + AFTER_PROMPT_MS, key) for seconds, key in walk]
    # Hang up once the last answer (the FAQ menu) has been heard.
    return presses, int(say("vaccine_faq") * 1000) + AFTER_PROMPT_MS


def run_sipp(config: Config, scenario: Path, calls: int, rate: float, work: Path) -> tuple[int, int]:
    """Place ``calls`` calls at ``rate``/s; returns (successful, failed) as SIPp counted them."""
    stats = work / "stats.csv"
    args = [
        "sipp", f"127.0.0.1:{config.asterisk.sip_port}", "-sf", str(scenario), "-s", config.hotline.number,
        "-key", "caller", CALLER, "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)),
        "-mp", str(free_port(socket.SOCK_DGRAM)),
        "-r", str(rate), "-l", str(calls), "-m", str(calls), "-nostdin", "-timeout", "300s",
        "-trace_stat", "-stf", str(stats), "-fd", "3600", "-trace_err", "-error_file", str(work / "errors.log"),
    ]  # fmt: skip
    subprocess.run(args, capture_output=True, check=False, timeout=600, cwd=work)
    rows = stats.read_text(errors="replace").strip().splitlines() if stats.exists() else []
    if len(rows) < 2:
        return 0, calls
    header, last = rows[0].split(";"), rows[-1].split(";")
    value = dict(zip(header, last, strict=False))
    return int(value.get("SuccessfulCall(C)", 0)), int(value.get("FailedCall(C)", 0))


# -- what is measured -------------------------------------------------------------------------------------------


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stamp(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


class KeyToPrompt:
    """Asterisk's own timestamps of each key (ChannelDtmfReceived) and the channel's next PlaybackStarted."""

    def __init__(self, config: Config, sandbox: Sandbox) -> None:
        creds = sandbox.credentials()
        query = urlencode({"app": "load-observer", "subscribeAll": "true"})
        self.url = f"ws://{config.asterisk.host}:{config.asterisk.ari_port}/ari/events?{query}"
        token = base64.b64encode(f"{creds.ari_username}:{creds.ari_password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}
        self.pending: dict[str, float] = {}
        self.samples: list[float] = []

    async def run(self) -> None:
        async with connect(self.url, additional_headers=self.headers, max_size=2**22) as ws:
            async for message in ws:
                event = json.loads(message)
                kind = event.get("type")
                if kind == "ChannelDtmfReceived":
                    self.pending[event["channel"]["id"]] = _stamp(event["timestamp"])
                elif kind == "PlaybackStarted":
                    target = str(event.get("playback", {}).get("target_uri", ""))
                    pressed = self.pending.pop(target.removeprefix("channel:"), None)
                    if pressed is not None:
                        self.samples.append(1000 * (_stamp(event["timestamp"]) - pressed))

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples


async def run_step(
    calls: int, config: Config, sandbox: Sandbox, service: ServiceProcess, scenario: Path, rate: float,
    observer: KeyToPrompt, work: Path,
) -> Step:  # fmt: skip
    step = Step(calls, attempted=calls)
    assert service.proc is not None
    service_pid, asterisk_pid = service.proc.pid, sandbox.pid()
    assert asterisk_pid is not None
    repo = db.CallRepository(db.make_sessionmaker(config.database_url))
    before = {r.id for r in repo.list_recent(100000)}
    observer.take()
    started = time.monotonic()
    s0, a0 = _cpu_ticks(service_pid), _cpu_ticks(asterisk_pid)
    sipp = asyncio.create_task(asyncio.to_thread(run_sipp, config, scenario, calls, rate, work))
    while not sipp.done():
        step.service_rss_mb = max(step.service_rss_mb, _rss_mb(service_pid))
        await asyncio.wait({sipp}, timeout=1.0)
    wall = time.monotonic() - started
    step.service_cpu = (_cpu_ticks(service_pid) - s0) / CLK / wall
    step.asterisk_cpu = (_cpu_ticks(asterisk_pid) - a0) / CLK / wall
    step.completed, step.failed = sipp.result()
    await asyncio.sleep(2)  # the last records are finished
    new = [r for r in repo.list_recent(100000) if r.id not in before]
    step.dropped = sum(1 for r in new if r.outcome in ("connection_lost", "error"))
    step.key_to_prompt_ms = observer.take()
    return step


def print_step(step: Step) -> None:
    print(
        f"{step.calls:>6} {step.attempted:>9} {step.completed:>9} {step.failed:>6} {step.dropped:>7} "
        f"{100 * step.service_cpu:>7.0f}% {100 * step.asterisk_cpu:>7.0f}% {step.service_rss_mb:>7.0f} "
        f"{step.pct(0.5):>8.1f} {step.pct(0.99):>8.1f} {len(step.key_to_prompt_ms):>7}",
        flush=True,
    )


def chart(steps: list[Step], target: Path) -> None:
    # Only with --chart: matplotlib is a development dependency and slow to import.
    import matplotlib

    matplotlib.use("Agg")
    # After use("Agg"): pyplot picks its backend when first imported, and there is no display here.
    import matplotlib.pyplot as plt

    x = [s.calls for s in steps]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    top.plot(x, [s.pct(0.5) for s in steps], "o-", label="key→prompt p50")
    top.plot(x, [s.pct(0.99) for s in steps], "o-", label="key→prompt p99")
    top.set_ylabel("ms")
    top.legend()
    middle.plot(x, [100 * s.service_cpu for s in steps], "o-", label="service CPU")
    middle.plot(x, [100 * s.asterisk_cpu for s in steps], "o-", label="Asterisk CPU")
    middle.set_ylabel("% of one core")
    middle.legend()
    bottom.plot(x, [s.failed for s in steps], "o-", label="failed (SIPp)")
    bottom.plot(x, [s.dropped for s in steps], "o-", label="dropped by the service")
    twin = bottom.twinx()
    twin.plot(x, [s.service_rss_mb for s in steps], "s--", color="grey", label="service RSS (MB)")
    twin.set_ylabel("MB")
    bottom.set_xlabel("concurrent calls")
    bottom.set_ylabel("calls")
    bottom.legend(loc="upper left")
    fig.suptitle("medhotline under load (SIPp, shipped hotline flow)")
    fig.tight_layout()
    fig.savefig(target, dpi=100)


def profile(pid: int, seconds: int, target: Path) -> None:
    """Sample the service with py-spy; print the functions most often on CPU (own time) and in the stack."""
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("py-spy is not installed (pip install py-spy)")
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = target.with_suffix(".txt")
    subprocess.run(
        [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "50", "--format", "raw", "-o", str(raw)],
        capture_output=True,
        check=False,
    )
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines() if raw.exists() else []:
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or not samples.isdigit():
            continue
        total += int(samples)
        own[frames[-1]] = own.get(frames[-1], 0) + int(samples)
    print(f"\nprofile of the service ({total} samples, {raw}); own time:")
    for frame, hits in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {100 * hits / max(1, total):5.1f}%  {frame[:150]}")


async def main_async(args: argparse.Namespace) -> list[Step]:
    steps_wanted = [int(s) for s in args.steps.split(",")]
    state = Path(tempfile.mkdtemp(prefix="medhotline-load-"))
    results: list[Step] = []
    with running_service(state, max(steps_wanted) + 20) as (config, sandbox, service):
        state = config.service.state_dir
        presses, tail_ms = caller_script(config, sandbox, args.hold)
        scenario = state / "caller.xml"
        scenario.write_text(patient_scenario(presses, tail_ms), encoding="utf-8")
        observer = KeyToPrompt(config, sandbox)
        listening = asyncio.create_task(observer.run())
        await asyncio.sleep(1)
        print(f"hold {sum(p.after_ms for p in presses) / 1000 + tail_ms / 1000:.0f} s per call, {len(presses)} keys")
        print("   calls attempted completed failed dropped svc-cpu ast-cpu rss(MB) k2p-p50 k2p-p99 samples")
        for index, calls in enumerate(steps_wanted):
            work = state / f"step{index}"
            work.mkdir()
            profiling = None
            if args.profile and calls == max(steps_wanted):
                assert service.proc is not None
                pid = service.proc.pid
                profiling = asyncio.create_task(asyncio.to_thread(profile, pid, int(args.hold), state / "profile.raw"))
            step = await run_step(calls, config, sandbox, service, scenario, args.rate, observer, work)
            results.append(step)
            print_step(step)
            if profiling is not None:
                await profiling
        listening.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await listening
    if args.asyncio_debug:
        # asyncio's debug mode logs "Executing <callback> took 0.123 seconds" for every slow callback.
        output = (state / "service.stdout").read_text(errors="replace")
        slow = [line for line in output.splitlines() if "Executing" in line and " took " in line]
        print(f"asyncio debug: {len(slow)} callbacks held the event loop over 100 ms")
        for line in slow[:10]:
            print(f"  {line[:200]}")
    service_log = state / "service.jsonl"
    lines = service_log.read_text(errors="replace").splitlines() if service_log.exists() else []
    over_ws = any("ari.rest_transport" in line and '"websocket"' in line for line in lines)
    print(f"ARI REST transport: {'websocket' if over_ws else 'http'} (asked: {args.rest_transport or 'as configured'})")
    print(f"state (logs, SIPp errors): {state}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10,50,100,200,300,400,500", help="concurrent calls per step")
    parser.add_argument("--hold", type=float, default=40.0, help="seconds each caller stays in the IVR")
    parser.add_argument("--rate", type=float, default=15.0, help="new calls per second")
    parser.add_argument("--chart", type=Path, default=Path("load.png"), help="PNG chart of the figures")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 and 5 calls, 8 s each")
    parser.add_argument("--profile", action="store_true", help="py-spy the service during the largest step")
    parser.add_argument(
        "--asyncio-debug",
        action="store_true",
        help="run the service in asyncio debug mode and report callbacks that held the event loop over 100 ms",
    )
    parser.add_argument(
        "--rest-transport",
        choices=("websocket", "http"),
        help="ARI REST transport of the service ([asterisk] rest_transport; default: as configured)",
    )
    args = parser.parse_args(argv)
    if args.rest_transport:
        os.environ["MEDHOTLINE__ASTERISK__REST_TRANSPORT"] = args.rest_transport  # inherited by `medhotline serve`
    if args.asyncio_debug:
        os.environ["PYTHONASYNCIODEBUG"] = "1"  # inherited by `medhotline serve`
    if args.quick:
        args.steps, args.hold = "2,5", 8.0
    if os.geteuid() != 0 or shutil.which("sipp") is None:
        print("needs root (the Asterisk sandbox) and sipp", file=sys.stderr)
        return 2
    steps = asyncio.run(main_async(args))
    chart(steps, args.chart)
    print(f"chart: {args.chart}")
    base = steps[0]
    for step in steps[1:]:
        ratio = step.pct(0.99) / base.pct(0.99) if base.key_to_prompt_ms else float("nan")
        print(f"key→prompt p99 at {step.calls} calls: {ratio:.2f}x its value at {base.calls}")
    bad = [s for s in steps if s.failed or s.dropped or s.completed != s.attempted]
    return 1 if args.quick and bad else 0


if __name__ == "__main__":
    sys.exit(main())
