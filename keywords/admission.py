"""Admission control for speech recognition: a per-node budget of concurrent recognitions. Sans I/O.

Why: every ``listen`` node decodes on one pool sized to the cores. ``python -m benchmarks.asr`` measured 3 streams
in real time on 2 cores (at 4 the slowest stream fell to 0.97×); beyond that knee *every* stream falls behind, so
in a surge an emergency said at the start of a call is recognised late, or after the caller gave up. A bounded
number of callers is listened to; the others get the key menu at once (never a wait for a recognizer), where key 0
reaches the emergency route as it does everywhere in the flow.

- :class:`SpeechBudget` holds the slots: ``try_acquire()`` gives a :class:`SpeechSlot` or None, never waits;
  it counts what it admitted and refused. Not thread-safe on purpose: it lives on the service's event loop.
- :class:`SpeechSlot` is released exactly once, by ``release()`` or leaving its ``with`` block (also on a
  hang-up, an error or a cancelled task: ``__exit__`` runs for every exception).
- :class:`AdmittedRecognizer` puts the budget in front of any recognizer (embedded Vosk, the scripted stand-in, a
  speech-server engine): a slot per ``listen`` node visit, taken before the node's question is asked, so a caller
  over the budget is never first invited to speak and then refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import TracebackType

from ground.logs import get_logger
from keywords.speech import SpeechBusy
from telephony.channel import CallChannel
from telephony.ports import Recognition, Recognizer, RecognizerBusy

log = get_logger(__name__)

# The live knee (benchmarks.asr --sandbox: SIPp callers into listen, in-process Vosk): 2 streams on 2 cores kept
# real time; at 3 a stream fell behind and dropped frames, deciding on a third of the audio without any sign.
# Past the knee recognition degrades silently (an emergency term missed, not late), while a caller over the budget
# gets the key menu with key 0 at once: so the default errs low, one per core, rounded down, at least one.
# (The in-process ramp alone, without Asterisk and the RTP tap on the same cores, held 3 on 2 cores.)
STREAMS_PER_CORE = 1.0


def default_max_streams(cores: int | None) -> int:
    """The budget for a node with ``cores`` CPUs (None: unknown, taken as one)."""
    return max(1, math.floor(STREAMS_PER_CORE * (cores or 1)))


@dataclass(frozen=True)
class AdmissionCounts:
    """A snapshot of a budget, for logs and metrics: counters since the service started, and the slots held now."""

    max_streams: int
    in_use: int
    peak: int
    admitted: int
    refused: int


class SpeechSlot:
    """One admitted recognition. Releasing twice is harmless (a ``finally`` and a ``with`` may both do it)."""

    def __init__(self, budget: SpeechBudget) -> None:
        self._budget: SpeechBudget | None = budget

    @property
    def held(self) -> bool:
        return self._budget is not None

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._released()

    def __enter__(self) -> SpeechSlot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class SpeechBudget:
    """At most ``max_streams`` recognitions at once on this node; never a queue."""

    def __init__(self, max_streams: int) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self._max = max_streams
        self._in_use = 0
        self._peak = 0
        self._admitted = 0
        self._refused = 0

    @property
    def max_streams(self) -> int:
        return self._max

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self) -> SpeechSlot | None:
        """A slot if one is free now, else None (counted as refused). Never waits."""
        if self._in_use >= self._max:
            self._refused += 1
            return None
        self._in_use += 1
        self._admitted += 1
        self._peak = max(self._peak, self._in_use)
        return SpeechSlot(self)

    def acquire(self) -> SpeechSlot:
        """A slot, or :class:`SpeechBusy` naming the budget."""
        slot = self.try_acquire()
        if slot is None:
            raise SpeechBusy(f"all {self._max} speech recognition slots of this node are in use (speech.max_streams)")
        return slot

    def counts(self) -> AdmissionCounts:
        return AdmissionCounts(self._max, self._in_use, self._peak, self._admitted, self._refused)

    def _released(self) -> None:
        # Only a SpeechSlot calls this, once per slot; below zero would mean a slot released twice.
        assert self._in_use > 0, "a speech slot was released more often than acquired"
        self._in_use -= 1


@dataclass
class AdmittedRecognizer:
    """A recognizer behind a :class:`SpeechBudget`. ``admit`` raises ``RecognizerBusy`` when the budget is spent;
    the interpreter then sends the caller to the node's key menu at once. A speech engine that finds no capacity of
    its own (``SpeechBusy``, e.g. every speech server full) ends up the same way, through ``recognize``."""

    inner: Recognizer
    budget: SpeechBudget

    def available_for(self, channel: CallChannel) -> bool:
        return self.inner.available_for(channel)

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        slot = self.budget.try_acquire()
        if slot is None:
            counts = self.budget.counts()
            # The metric: counters per node in the structured log a collector scrapes (there is no metrics
            # endpoint); the call record keeps it per call (calls.speech_admission).
            log.warning("speech.busy", reason="budget", **_fields(counts))
            raise RecognizerBusy(f"all {counts.max_streams} speech recognition slots of this node are in use")
        return self._holding(slot, channel)

    @contextmanager
    def _holding(self, slot: SpeechSlot, channel: CallChannel) -> Iterator[SpeechSlot]:
        # The slot is released whatever ends the node: a result, a hang-up, an error, a cancelled call task.
        with slot:
            try:
                inner = self.inner.admit(channel)  # an engine with a capacity of its own may refuse too
            except RecognizerBusy:
                log.warning("speech.busy", reason="engine", **_fields(self.budget.counts()))
                raise
            with inner:
                yield slot

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        try:
            return await self.inner.recognize(channel, max_seconds)
        except RecognizerBusy:
            log.warning("speech.busy", reason="engine", **_fields(self.budget.counts()))
            raise


def budgeted(recognizer: Recognizer, max_streams: int | None, cores: int | None) -> AdmittedRecognizer:
    """``recognizer`` behind a budget of ``max_streams`` (None: :func:`default_max_streams` of ``cores``)."""
    budget = SpeechBudget(max_streams if max_streams is not None else default_max_streams(cores))
    log.info(
        "speech.budget",
        max_streams=budget.max_streams,
        cores=cores,
        source="configured" if max_streams is not None else f"default {STREAMS_PER_CORE} per core",
    )
    return AdmittedRecognizer(recognizer, budget)


def _fields(counts: AdmissionCounts) -> dict[str, int]:
    return {
        "max_streams": counts.max_streams,
        "in_use": counts.in_use,
        "peak": counts.peak,
        "admitted_total": counts.admitted,
        "refused_total": counts.refused,
    }
