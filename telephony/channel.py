"""The ``CallChannel`` port: everything the IVR needs from a phone call, and nothing about how it gets it.

The flow interpreter only talks to this protocol; ARI, FastAGI and the in-memory fake implement it. A caller
hanging up surfaces as ``CallerHungUp`` from whichever operation was waiting, so every step ends cleanly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from ground.errors import MedhotlineError
from ground.logs import get_logger
from telephony.rtp import AudioLosses

log = get_logger(__name__)

Transport = Literal["ari", "fastagi"]


class ChannelError(MedhotlineError):
    """The telephony side failed an operation (not the caller's doing)."""


class CallerHungUp(ChannelError):
    """The caller hung up; the flow stops where it is and the call record says where."""


class ConnectionLost(ChannelError):
    """The connection to Asterisk dropped while the call was in progress."""


class CallerId:
    """The caller's number, wrapped so that it can't be printed, logged or formatted by accident.

    Only the patient directory calls ``reveal()``; ``str``/``repr`` show a mask.
    """

    __slots__ = ("_number",)

    def __init__(self, number: str = "") -> None:
        self._number = number

    def reveal(self) -> str:
        return self._number

    def __bool__(self) -> bool:
        return bool(self._number)

    def __repr__(self) -> str:
        return "CallerId(***)" if self._number else "CallerId(unknown)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallerId) and other._number == self._number

    def __hash__(self) -> int:
        return hash(self._number)


@dataclass(frozen=True)
class CallInfo:
    """What the service knows about a call when it arrives. The caller number is identifying data: it is
    only a ``CallerId`` here, reaches the patient lookup, and never a log line or the calls table."""

    channel_id: str
    channel_name: str
    transport: Transport
    flow: str
    dialed: str
    caller: CallerId = field(default_factory=CallerId)


DIGITS = "0123456789*#"

# A recording's name becomes a file name in Asterisk's recording spool (``<name>.wav``) and part of ARI paths and
# AGI commands, so it is plain: letters, digits, ``_ . -``; no leading dot (a hidden file) and no ``..``.
RECORDING_NAME = re.compile(r"^(?!\.)(?!.*\.\.)[A-Za-z0-9_.-]{1,120}$")


def check_recording_name(name: str) -> str:
    """``name`` if it is a valid recording name, else ChannelError saying why (shared by every adapter)."""
    if not isinstance(name, str) or not RECORDING_NAME.match(name):
        shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
        raise ChannelError(
            f"recording name {shown} is invalid: use 1-120 of A-Z a-z 0-9 _ . - (no leading dot, no '..')"
        )
    return name


class CallChannel(Protocol):
    """One call, as the flow interpreter sees it. Every waiting operation is bounded by a timeout."""

    @property
    def info(self) -> CallInfo: ...

    async def answer(self) -> None: ...

    async def play(self, sound: str, *, barge_in: bool = False) -> str | None:
        """Play a sound (Asterisk name such as ``medhotline/ab12…``) to the end, or raise CallerHungUp.

        With ``barge_in`` a key press stops the sound and is returned; without it, keys pressed during the sound
        are discarded (a caller pressing early must not select something they have not heard yet).
        """
        ...

    async def read_digits(self, *, max_digits: int, timeout: float, terminator: str | None = None) -> str:
        """Collect up to ``max_digits`` keys, each within ``timeout`` seconds of the previous (or of the call).

        Returns what was pressed before the timeout, the terminator (not included) or the maximum; ``""`` on
        no input.
        """
        ...

    async def set_variable(self, name: str, value: str) -> None:
        """Set a channel variable in Asterisk (read by the dialplan after a transfer)."""
        ...

    async def transfer(self, extension: str, trunk: str | None = None) -> None:
        """Leave the IVR: continue in the dialplan's ``medhotline-transfer`` context at ``extension``."""
        ...

    async def hangup(self) -> None:
        """Hang up; harmless if the caller already has."""
        ...

    async def start_recording(self, name: str) -> None:
        """Record this call from now on, both directions (what the caller says and hears), as an 8 kHz WAV file
        ``<name>.wav`` in Asterisk's recording spool directory (``astspooldir/recording``).

        ``name`` must match ``RECORDING_NAME`` (ChannelError otherwise) and must not exist yet. The recording
        runs until ``stop_recording`` or the end of the call.
        """
        ...

    async def stop_recording(self, name: str) -> None:
        """Stop the recording ``name`` and return once its file is complete. Idempotent: a recording already
        ended (stopped before, or the caller hung up) is not an error."""
        ...


@runtime_checkable
class AudioSource(Protocol):
    """A call whose audio the service can hear (ARI external media). FastAGI calls are not: there, ``listen``
    nodes take their key-menu fallback."""

    def caller_audio(self, max_seconds: float = 30.0) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """While open, yields the caller's audio as 16-bit little-endian PCM at 8 kHz, in small chunks."""
        ...


@runtime_checkable
class AudioLossReport(Protocol):
    """A call that knows how much of the caller's audio its recognizer never got (RTP gaps, frames dropped
    because the recognizer fell behind), added up over every ``caller_audio`` tap of the call so far."""

    def audio_losses(self) -> AudioLosses: ...


# What a caller hears when the service fails them. The name is the call edge's (the queue and the IVR play it);
# ivr.prompts renders the file under it, so it is defined here, below both.
UNAVAILABLE_SOUND = "medhotline/unavailable"

# The unavailable prompt lasts about 8 s; should the end of its playback never be reported, the caller is hung
# up after this bound anyway rather than left on a silent line.
APOLOGY_TIMEOUT = 30.0


async def tell_unavailable_and_hang_up(channel: CallChannel) -> None:
    """After a failure that is not the caller's doing: answer if needed, play the unavailable prompt (call back
    later, 120 in an emergency), hang up. Every step is best effort and bounded; a caller is never left in
    silence because one of them failed."""
    try:
        async with asyncio.timeout(APOLOGY_TIMEOUT):
            await channel.answer()
            await channel.play(UNAVAILABLE_SOUND)
    except CallerHungUp:
        return
    except (ChannelError, TimeoutError) as exc:
        log.error("call.unavailable_prompt_failed", error=str(exc) or type(exc).__name__)
    try:
        await channel.hangup()
    except CallerHungUp:
        pass
    except ChannelError as exc:
        log.error("call.hangup_failed", error=str(exc))
