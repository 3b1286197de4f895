"""The ``listen`` node's recognizer: caller audio → streaming speech recognition → keyword classification.

Partial results go to the spotter as they arrive, so an emergency term ends the listening at once, while the
caller is still talking; otherwise the first final result (Vosk's end-of-utterance) or the time limit decides.
Implements ``telephony.ports.Recognizer``; calls whose transport carries no audio (FastAGI) are "not available",
so their flow takes the key-menu fallback instead of waiting in silence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from ground.logs import get_logger
from keywords.registry import LexiconRegistry
from keywords.speech import SpeechBusy, SpeechEvent, SpeechStreamError
from telephony.channel import AudioSource, CallChannel, CallerHungUp, ChannelError, ConnectionLost
from telephony.ports import Recognition, RecognitionUnavailable, RecognizerBusy
from telephony.rtp import RtpError

log = get_logger(__name__)

# What a transcript means (category, emergency, terms, triage level), as the interpreter reads it.
Classify = Callable[[str], Recognition]


class SpeechStreamLike(Protocol):
    async def accept(self, pcm16: bytes) -> list[SpeechEvent]: ...

    async def finish(self) -> SpeechEvent: ...

    async def aclose(self) -> None:
        """Give the stream up, also unfinished (an early decision, a hang-up); idempotent."""
        ...


class SpeechEngine(Protocol):
    def async_stream(self, sample_rate: int = 8000, *, max_seconds: float = 20.0) -> SpeechStreamLike: ...


@dataclass
class StreamingRecognizer:
    engine: SpeechEngine
    classify: Classify

    def available_for(self, channel: CallChannel) -> bool:
        return isinstance(channel, AudioSource)

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        # The node's budget is keywords.admission.AdmittedRecognizer's; an engine that is full says so per stream.
        return nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        if not isinstance(channel, AudioSource):
            return None
        try:
            stream = self.engine.async_stream(8000, max_seconds=max_seconds)
        except SpeechBusy as exc:
            raise RecognizerBusy(str(exc)) from None
        transcript = ""
        # Seconds of audio fed and seconds spent waiting on the engine for them (pool queue included): their ratio
        # is the stream's speed factor, logged at the end with the time since the caller's first audio arrived
        # (benchmarks.asr --sandbox reads both). Two clock reads a 20 ms frame.
        fed = 0
        decoding = 0.0
        first_audio: float | None = None
        try:
            try:
                async with asyncio.timeout(max_seconds + 2.0), channel.caller_audio(max_seconds) as frames:
                    async for pcm in frames:
                        fed += len(pcm)
                        started = time.perf_counter()
                        if first_audio is None:
                            first_audio = started
                        events = await stream.accept(pcm)
                        decoding += time.perf_counter() - started
                        for event in events:
                            transcript = event.text or transcript
                            decided = self._decide(event)
                            if decided is not None:
                                return decided
            except TimeoutError:
                pass
            started = time.perf_counter()
            final = await stream.finish()
            decoding += time.perf_counter() - started
        except (CallerHungUp, ConnectionLost):
            raise
        except SpeechBusy as exc:
            raise RecognizerBusy(str(exc)) from None
        except SpeechStreamError as exc:
            return self._broken_off(exc, exc.heard or transcript)
        except (ChannelError, RtpError) as exc:
            raise RecognitionUnavailable(f"speech recognition failed: {exc}") from None
        finally:
            # Also after an early decision or a hang-up: a speech server's stream is given back at once.
            await stream.aclose()
            audio = fed / 16000  # 16-bit samples at 8 kHz
            log.info(
                "speech.stream",
                audio_s=round(audio, 3),
                decode_s=round(decoding, 3),
                speed=round(audio / decoding, 2) if decoding > 0 else None,
                since_first_audio_s=None if first_audio is None else round(time.perf_counter() - first_audio, 3),
            )
        transcript = final.text or transcript
        return self._decide(SpeechEvent("final", transcript)) if transcript else None

    def _broken_off(self, exc: SpeechStreamError, heard: str) -> Recognition:
        """Recognition broke off (a speech server failed mid-utterance). What was heard until then is still
        classified: an emergency in it is decided as if the stream had gone on; anything else goes with the
        failure to the listen node, which gives the caller the key menu and records what was spotted."""
        if not heard:
            raise RecognitionUnavailable(f"speech recognition failed: {exc}") from None
        recognition = self.classify(heard)
        log.warning(
            "speech.broken_off",
            reason=str(exc),
            chars=len(heard),
            category=recognition.category,
            emergency=recognition.emergency,
            matched=list(recognition.matched),
        )
        if recognition.emergency:
            return recognition
        raise RecognitionUnavailable(f"speech recognition failed: {exc}", heard=recognition) from None

    def _decide(self, event: SpeechEvent) -> Recognition | None:
        if not event.text:
            return None
        recognition = self.classify(event.text)
        if recognition.emergency or event.kind == "final":
            # Only sizes and terms are logged: the transcript itself is clinical data.
            log.info(
                "speech.recognized",
                kind=event.kind,
                chars=len(event.text),
                category=recognition.category,
                emergency=recognition.emergency,
                matched=list(recognition.matched),
                level=recognition.level,
                discriminator=recognition.discriminator,
                confirm=recognition.confirm,
            )
            return recognition
        return None


@dataclass
class _ScriptedStream:
    text: str
    seconds_before: float
    _fed: float = 0.0
    _said: bool = False

    async def accept(self, pcm16: bytes) -> list[SpeechEvent]:
        self._fed += len(pcm16) / 16000
        if not self._said and self._fed >= self.seconds_before:
            self._said = True
            return [SpeechEvent("final", self.text)]
        return []

    async def finish(self) -> SpeechEvent:
        # Nothing is "heard" without audio: the stand-in proves the media path, it does not bypass it.
        heard = not self._said and self._fed >= min(self.seconds_before, 0.3)
        return SpeechEvent("final", self.text if heard else "")

    async def aclose(self) -> None:
        pass


@dataclass
class ScriptedSpeech:
    """A stand-in speech engine for demos and tests: it consumes the caller's real audio through the real
    media path, and after ``seconds_before`` seconds of it "hears" the next scripted sentence. With it, the
    Chinese keyword path runs end to end where no Chinese model can be installed."""

    script: list[str] = field(default_factory=list)
    seconds_before: float = 1.0

    def async_stream(self, sample_rate: int = 8000, *, max_seconds: float = 20.0) -> SpeechStreamLike:
        text = self.script.pop(0) if self.script else ""
        return _ScriptedStream(text, self.seconds_before)


def registry_classifier(registry: LexiconRegistry) -> Classify:
    """Classify with whatever lexicon the registry holds now (it is refreshed by the service's reload task)."""

    def classify(text: str) -> Recognition:
        classifier = registry.current
        if classifier is None:
            raise RecognitionUnavailable("no valid keyword lexicon loaded")
        result = classifier.classify(text)
        category, emergency, matched = result.as_recognition_fields()
        level, confidence, discriminator, confirm = result.triage_fields()
        return Recognition(text, category, emergency, matched, level, confidence, discriminator, confirm)

    return classify
