"""The ``CallChannel`` port: everything the IVR needs from a phone call, and nothing about how it gets it.

The flow interpreter only talks to this protocol; ARI, FastAGI and the in-memory fake implement it. A caller
hanging up surfaces as ``CallerHungUp`` from whichever operation was waiting, so every step ends cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from medhotline.errors import MedhotlineError

Transport = Literal["ari", "fastagi"]


class ChannelError(MedhotlineError):
    """The telephony side failed an operation (not the caller's doing)."""


class CallerHungUp(ChannelError):
    """The caller hung up; the flow stops where it is and the call record says where."""


class ConnectionLost(ChannelError):
    """The connection to Asterisk dropped while the call was in progress."""


@dataclass(frozen=True)
class CallInfo:
    """What the service knows about a call when it arrives. Deliberately no caller number: the
    number is identifying data and only reaches the patient lookup, never a log or the calls table."""

    channel_id: str
    channel_name: str
    transport: Transport
    flow: str
    dialed: str


class CallChannel(Protocol):
    """One call, as the flow interpreter sees it."""

    @property
    def info(self) -> CallInfo: ...

    async def answer(self) -> None: ...

    async def play(self, sound: str) -> None:
        """Play a sound (Asterisk name such as ``medhotline/ab12…``) to the end, or raise CallerHungUp."""
        ...

    async def hangup(self) -> None:
        """Hang up; harmless if the caller already has."""
        ...
