"""Callbacks instead of waiting, sans I/O: when to offer one, when a failed one is tried again, which are due.

A caller whose estimated wait is longer than ``threshold`` hears the offer ("press a key to be called back").
One who accepts hangs up and keeps their place: the callback enters the routing dispatcher as a
:class:`~routing.model.CallRequest` with ``callback=True`` and the *arrival time of the original call*, and the
engine's ``callback_delay`` is 0 by default, so it is ordered exactly where the caller would have been. Every
emergency still goes first (the dispatcher's order puts every emergency before every normal call).

When the dispatcher pairs a callback with an agent, the agent is reserved in the database *before* anything is
dialled (the same atomic reservation as for a waiting caller); only then is the patient's phone dialled. So the
number of callbacks being dialled at any moment is at most the number of agents that were free to be reserved.

Nothing here reads a clock or touches a database: times are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

__all__ = [
    "CALLBACK_ACCEPTED",
    "CALLBACK_DUPLICATE",
    "CALLBACK_GREETING",
    "CALLBACK_UNAVAILABLE",
    "CallbackPolicy",
    "PendingCallback",
    "callback_texts",
    "due_callbacks",
    "estimated_wait",
    "next_attempt",
    "offer_text",
]

# What the caller hears (rendered by `prompts build` like every other announcement, for the configured key).
CALLBACK_ACCEPTED: Final = "已为您登记回电，您的排队顺序将被保留。请挂机，我们将尽快给您回电。再见。"
CALLBACK_DUPLICATE: Final = "您的号码已登记回电，请挂机等候，我们将按顺序给您回电。再见。"
CALLBACK_UNAVAILABLE: Final = "抱歉，暂时无法登记回电，请继续等待。"
# What a callback's patient hears once they answer, while the reserved agent's phone rings.
CALLBACK_GREETING: Final = "您好，这里是医院热线，为您回电。正在为您接通工作人员，请不要挂机。"
_SPOKEN_KEYS: Final = {"*": "星号键", "#": "井号键"}


def spoken_key(key: str) -> str:
    return _SPOKEN_KEYS.get(key, key)


def offer_text(key: str) -> str:
    """The offer a waiting caller hears when the estimated wait is long."""
    return f"预计等待时间较长，如需挂机后由我们按顺序回电，请按{spoken_key(key)}；继续等待请不要挂机。"


def callback_texts(key: str) -> list[str]:
    """Every text of the callback dialogue for ``key`` ("" : callbacks off, nothing to render)."""
    if not key:
        return []
    return [offer_text(key), CALLBACK_ACCEPTED, CALLBACK_DUPLICATE, CALLBACK_UNAVAILABLE, CALLBACK_GREETING]


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """``threshold``: offer a callback when the estimated wait is longer than this many seconds.
    ``handle_seconds``: the average time an agent spends on one call (talk plus wrap-up), for the estimate.
    ``max_attempts``: dialling attempts before the callback becomes a task for staff.
    ``retry_after``: seconds between a failed attempt and the next."""

    threshold: float = 120.0
    handle_seconds: float = 240.0
    max_attempts: int = 3
    retry_after: float = 120.0
    key: str = "1"

    def __post_init__(self) -> None:
        if self.threshold < 0 or self.handle_seconds <= 0 or self.retry_after < 0:
            raise ValueError("callback threshold and retry_after must be >= 0 and handle_seconds > 0")
        if self.max_attempts < 1:
            raise ValueError("callback max_attempts must be at least 1")

    def offer(self, wait: float | None) -> bool:
        """Offer a callback for this estimated wait (None: nobody could take the call now: offer it too)."""
        return wait is None or wait > self.threshold


def estimated_wait(position: int, serving_agents: int, handle_seconds: float) -> float | None:
    """Seconds until a caller at ``position`` (1 = next) is likely served by ``serving_agents`` agents who may take
    the call and are logged in (available or busy), each finishing a call every ``handle_seconds`` on average.

    The caller at position p waits for ceil(p / agents) calls to end on the busiest agent; None when no agent
    could take the call at all (the wait is unknown and long).
    """
    if position < 1:
        raise ValueError(f"position {position}: positions start at 1")
    if serving_agents <= 0:
        return None
    return math.ceil(position / serving_agents) * handle_seconds


def next_attempt(attempts: int, policy: CallbackPolicy, now: datetime) -> datetime | None:
    """After ``attempts`` failed dialling attempts: when to dial again, or None when it becomes a task."""
    if attempts < 1:
        raise ValueError("next_attempt is asked after at least one attempt")
    if attempts >= policy.max_attempts:
        return None
    return now + timedelta(seconds=policy.retry_after)


@dataclass(frozen=True, slots=True)
class PendingCallback:
    """A stored callback as the node's loop sees it: its place (``requested_at``) and when it may be dialled."""

    id: str
    category: str
    priority: str
    requested_at: datetime
    next_attempt_at: datetime


def due_callbacks(pending: Iterable[PendingCallback], queued: Iterable[str], now: datetime) -> list[PendingCallback]:
    """The pending callbacks to put into the dispatcher now: due, and not there already; in order of place."""
    present = set(queued)
    due = [c for c in pending if c.next_attempt_at <= now and c.id not in present]
    return sorted(due, key=lambda c: (c.priority != "emergency", c.requested_at, c.id))


def at_most_one_per_number(indexes: Sequence[str]) -> bool:
    """True when no blind index appears twice (the rule the database's partial unique index enforces)."""
    return len(set(indexes)) == len(indexes)
