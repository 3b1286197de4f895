"""Ports the interpreter needs besides the call itself: speech recognition and the patient directory.

Both are pluggable; the defaults here are the honest "not available" versions, so a flow written for speech
or patient lookup still works (through its fallback / not-found edges) on a node that has neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ivr.channel import CallChannel, ChannelError


class RecognitionUnavailable(ChannelError):
    """Speech recognition failed for this call (media could not be set up, engine error): the ``listen`` node
    takes its key-menu fallback; the call goes on."""


@dataclass(frozen=True)
class Recognition:
    """What the caller said and what it means. ``matched`` explains the classification (terms that fired)."""

    transcript: str
    category: str | None
    emergency: bool = False
    matched: tuple[str, ...] = ()


class Recognizer(Protocol):
    def available_for(self, channel: CallChannel) -> bool:
        """Can this call be listened to? (No model loaded, or a transport without audio: no.)"""
        ...

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        """Listen to the caller for up to ``max_seconds``; None when nothing intelligible was said."""
        ...


class NoRecognizer:
    """No speech recognition on this node: ``listen`` nodes take their fallback (the DTMF menu)."""

    def available_for(self, channel: CallChannel) -> bool:
        return False

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        return None


@dataclass
class ScriptedRecognizer:
    """A recognizer that returns prepared results in order (tests, demos). None entries mean silence."""

    results: list[Recognition | None] = field(default_factory=list)
    available: bool = True

    def available_for(self, channel: CallChannel) -> bool:
        return self.available

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
