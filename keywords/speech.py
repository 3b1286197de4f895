"""Offline speech recognition with Vosk: one model per process, one recognizer per call.

The engine is sans-telephony: it takes 16-bit little-endian mono PCM and returns partial and final
``SpeechEvent`` values; where the audio comes from (RTP, a file) is the caller's business.

- ``SpeechModel.load(path)`` checks the model directory's layout first, so a wrong ``speech.model_path`` gives
  an error naming the path and the missing part instead of Vosk's bare ``Exception`` and C-level log noise.
  The model owns a ``ThreadPoolExecutor`` sized to the CPU count, shared by every call of the process.
- ``SpeechModel.stream()`` gives a ``SpeechStream`` (one ``KaldiRecognizer``), synchronous and thread-safe;
  ``SpeechModel.async_stream()`` gives an ``AsyncSpeechStream`` whose ``await accept(...)`` runs the decoding
  on the model's pool: one stream's chunks are decoded one after another, in order; streams of different
  calls run in parallel (the Vosk C calls release the GIL).
- Endpointing: Vosk itself reports a final result when the caller stops talking (trailing-silence rules in the
  model's ``conf/model.conf``); in addition a stream stops after ``max_seconds`` of audio and returns its final.
- Chinese models put a space between every character; texts are passed through ``join_cjk``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ground.errors import MedhotlineError

DEFAULT_SAMPLE_RATE = 8000
DEFAULT_MAX_SECONDS = 20.0
_BYTES_PER_SAMPLE = 2


class SpeechModelError(MedhotlineError):
    """The speech model is missing, incomplete or unreadable."""


class SpeechStreamError(MedhotlineError):
    """Audio handed to a speech stream is not usable (odd byte count, stream already closed), or the stream broke
    (a speech server failed or closed mid-utterance). ``heard`` is what had been recognised until then, so the
    keywords in it can still be spotted; it is clinical data and never part of the message."""

    def __init__(self, message: str, *, heard: str = "") -> None:
        super().__init__(message)
        self.heard = heard


class SpeechBusy(MedhotlineError):
    """No recognizer is free for another stream now: this node's budget of concurrent recognitions is spent
    (``speech.max_streams``), or a speech engine with capacity of its own (e.g. every speech server) is full.
    Never waited on: the ``listen`` node gives the caller its key menu at once."""


@dataclass(frozen=True)
class SpeechEvent:
    """A recognition result: ``partial`` while the caller speaks, ``final`` at the end of an utterance."""

    kind: Literal["partial", "final"]
    text: str


# Han ideographs (with extensions and compatibility forms), CJK punctuation and full-width forms. Hangul and
# kana are deliberately absent: Korean separates words with spaces and those must stay.
_CJK = (
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3400-\u4dbf"  # extension A
    "\u4e00-\u9fff"  # unified ideographs
    "\uf900-\ufaff"  # compatibility ideographs
    "\uff00-\uffef"  # half-width and full-width forms
    "\U00020000-\U0003134f"  # extensions B-G
)
_CJK_SPACE = re.compile(f"(?<=[{_CJK}])\\s+(?=[{_CJK}])")


def join_cjk(text: str) -> str:
    """Remove the spaces Vosk puts between Chinese characters; other spacing is kept (trimmed at the ends).

    >>> join_cjk("我 胸口 疼 ok 好")
    '我胸口疼 ok 好'
    """
    return _CJK_SPACE.sub("", text).strip()


def model_layout_problems(path: Path) -> list[str]:
    """What is wrong with a Vosk model directory (empty list: it looks loadable).

    A Vosk model has ``am/final.mdl``, ``conf/mfcc.conf`` and a decoding graph: either ``graph/HCLG.fst``
    (big models) or ``graph/HCLr.fst`` plus ``graph/Gr.fst`` (small lookahead models). ``ivector/`` is optional.
    """
    if not path.exists():
        return ["the directory does not exist"]
    if not path.is_dir():
        return ["it is not a directory"]
    problems: list[str] = []
    for part in ("am/final.mdl", "conf/mfcc.conf"):
        candidate = path / part
        if not candidate.is_file():
            problems.append(f"{part} is missing")
        elif candidate.stat().st_size == 0:
            problems.append(f"{part} is empty")
    graph = path / "graph"
    if not (graph / "HCLG.fst").is_file() and not ((graph / "HCLr.fst").is_file() and (graph / "Gr.fst").is_file()):
        problems.append("no decoding graph (graph/HCLG.fst, or graph/HCLr.fst with graph/Gr.fst)")
    return problems


def _import_vosk() -> Any:
    try:
        # Lazily: vosk loads a native library; only nodes with a speech model configured pay for it.
        import vosk
    except ImportError as exc:
        raise SpeechModelError(
            f"the vosk package cannot be imported ({exc}): install medhotline's dependencies"
        ) from exc
    vosk.SetLogLevel(-1)  # Kaldi's C-level logging would go straight to stderr, around structlog
    return vosk


class SpeechModel:
    """One loaded Vosk model and the thread pool its recognizers decode on. Load once per process."""

    def __init__(self, path: Path, vosk_model: Any, vosk_module: Any, *, workers: int | None = None) -> None:
        self._path = path
        self._model = vosk_model
        self._vosk = vosk_module
        self._executor = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="speech")

    @classmethod
    def load(cls, path: Path, *, workers: int | None = None) -> SpeechModel:
        """Load the model at ``path``; ``SpeechModelError`` says which path and what is wrong with it."""
        path = Path(path)
        problems = model_layout_problems(path)
        if problems:
            raise SpeechModelError(
                f"speech model {path} is not usable: {'; '.join(problems)}. "
                "Point speech.model_path at an unpacked Vosk model directory (`medhotline keywords fetch-model`)"
            )
        vosk = _import_vosk()
        try:
            model = vosk.Model(str(path))
        except Exception as exc:  # Vosk raises a bare Exception("Failed to create a model")
            raise SpeechModelError(
                f"speech model {path} has the expected files but Vosk could not load it ({exc}): "
                "the files are corrupt, truncated or from an incompatible Vosk version; unpack the model again"
            ) from exc
        return cls(path, model, vosk, workers=workers)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The pool every ``AsyncSpeechStream`` of this model decodes on."""
        return self._executor

    def stream(
        self, sample_rate: int = DEFAULT_SAMPLE_RATE, *, max_seconds: float = DEFAULT_MAX_SECONDS
    ) -> SpeechStream:
        """A new recognizer for one call (or one listening turn of a call)."""
        if max_seconds <= 0:
            raise SpeechStreamError(f"max_seconds must be positive, not {max_seconds}")
        return SpeechStream(self.kaldi_recognizer(sample_rate), sample_rate, max_seconds)

    def kaldi_recognizer(self, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Any:
        """A bare ``KaldiRecognizer`` of this model, for the speech server, which answers with Vosk's own JSON."""
        if not 8000 <= sample_rate <= 48000:
            raise SpeechStreamError(f"sample rate {sample_rate} Hz is outside 8000..48000")
        return self._vosk.KaldiRecognizer(self._model, float(sample_rate))

    def async_stream(
        self, sample_rate: int = DEFAULT_SAMPLE_RATE, *, max_seconds: float = DEFAULT_MAX_SECONDS
    ) -> AsyncSpeechStream:
        """A stream whose decoding runs on this model's thread pool, off the event loop."""
        return AsyncSpeechStream(self.stream(sample_rate, max_seconds=max_seconds), self._executor)

    def close(self) -> None:
        """Stop the pool (waiting for running decodes). The model itself is freed with the object."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SpeechModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SpeechStream:
    """One ``KaldiRecognizer``: feed PCM, get events. Thread-safe; calls are serialized by a lock.

    ``accept`` returns a partial event when the partial text changed (empty partials are not reported) and a
    final event when Vosk detects the end of an utterance (empty finals, i.e. silence or noise, are not
    reported). After ``max_seconds`` of audio the stream finishes by itself: the final event is returned by
    that ``accept`` and later audio is ignored. ``finish()`` returns the final event of the audio not yet
    finalised (possibly with empty text); it is idempotent.
    """

    def __init__(self, recognizer: Any, sample_rate: int, max_seconds: float) -> None:
        self._recognizer: Any = recognizer
        self._sample_rate = sample_rate
        self._max_bytes = int(max_seconds * sample_rate) * _BYTES_PER_SAMPLE
        self._fed = 0
        self._last_partial = ""
        self._final: SpeechEvent | None = None
        self._lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def seconds_fed(self) -> float:
        return self._fed / _BYTES_PER_SAMPLE / self._sample_rate

    @property
    def finished(self) -> bool:
        return self._final is not None

    def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        """Decode a chunk of 16-bit little-endian mono PCM (any length, e.g. 20 ms)."""
        if len(pcm16) % _BYTES_PER_SAMPLE:
            raise SpeechStreamError(f"PCM chunk of {len(pcm16)} bytes is not whole 16-bit samples")
        with self._lock:
            if self._final is not None:
                return []
            room = self._max_bytes - self._fed
            chunk = pcm16[:room]
            events: list[SpeechEvent] = []
            if chunk:
                self._fed += len(chunk)
                if self._recognizer.AcceptWaveform(chunk):
                    self._last_partial = ""
                    text = _text(self._recognizer.Result(), "text")
                    if text:
                        events.append(SpeechEvent("final", text))
                else:
                    partial = _text(self._recognizer.PartialResult(), "partial")
                    if partial and partial != self._last_partial:
                        events.append(SpeechEvent("partial", partial))
                    self._last_partial = partial
            if self._fed >= self._max_bytes:
                events.append(self._finish_locked())
            return events

    def finish(self) -> SpeechEvent:
        """The final result of the audio since the last final; the stream accepts no more audio."""
        with self._lock:
            return self._finish_locked()

    def _finish_locked(self) -> SpeechEvent:
        if self._final is None:
            self._final = SpeechEvent("final", _text(self._recognizer.FinalResult(), "text"))
            self._recognizer = None  # free the recognizer's decoder memory now, not when the stream goes
        return self._final


def _text(result_json: str, key: str) -> str:
    try:
        value = json.loads(result_json).get(key, "")
    except (ValueError, AttributeError):
        return ""
    return join_cjk(value) if isinstance(value, str) else ""


class AsyncSpeechStream:
    """A ``SpeechStream`` whose decoding runs on the model's pool; chunks are decoded in the order awaited."""

    def __init__(self, stream: SpeechStream, executor: ThreadPoolExecutor) -> None:
        self._stream = stream
        self._executor = executor
        self._order = asyncio.Lock()  # FIFO: one chunk of this stream in the pool at a time

    @property
    def stream(self) -> SpeechStream:
        return self._stream

    @property
    def finished(self) -> bool:
        return self._stream.finished

    @property
    def seconds_fed(self) -> float:
        return self._stream.seconds_fed

    async def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        async with self._order:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._stream.accept, pcm16)

    async def finish(self) -> SpeechEvent:
        async with self._order:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._stream.finish)

    async def aclose(self) -> None:
        """Give the stream up without its final result (the listening ended early, e.g. on an emergency term).
        An in-process recognizer holds nothing shared, so there is nothing to give back."""

    async def __aenter__(self) -> AsyncSpeechStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.finish()
