"""Ports the interpreter needs besides the call itself: speech recognition and the patient directory.

Both are pluggable; the defaults here are the honest "not available" versions, so a flow written for speech
or patient lookup still works (through its fallback / not-found edges) on a node that has neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ivr.channel import CallChannel


@dataclass(frozen=True)
class Recognition:
    """What the caller said and what it means. ``matched`` explains the classification (terms that fired)."""

    transcript: str
    category: str | None
    emergency: bool = False
    matched: tuple[str, ...] = ()


class Recognizer(Protocol):
    @property
    def available(self) -> bool: ...

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        """Listen to the caller for up to ``max_seconds``; None when nothing intelligible was said."""
        ...


class NoRecognizer:
    """No speech recognition on this node: ``listen`` nodes take their fallback (the DTMF menu)."""

    available = False

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        return None


@dataclass
class ScriptedRecognizer:
    """A recognizer that returns prepared results in order (tests, demos). None entries mean silence."""

    results: list[Recognition | None] = field(default_factory=list)
    available: bool = True

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        return self.results.pop(0) if self.results else None


@dataclass(frozen=True)
class PatientMatch:
    """An opaque reference to the patient record; never the name or number itself."""

    patient_ref: str


class PatientDirectory(Protocol):
    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None: ...


class NoPatientDirectory:
    """No registry connected: every caller is unknown."""

    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None:
        return None
