"""When the hotline may call a patient, sans I/O: the calling window, quiet hours, attempts and backoff.

Every rule is a pure function of values and a time given by the caller (tests use a fake clock):

- a patient is called only inside their plan's window (e.g. 09:00-18:00 local) and never in the hospital's
  quiet hours (e.g. 21:00-08:00 local), whichever is stricter; a due call outside them waits for the next
  allowed minute;
- a round of calls has at most ``max_attempts`` attempts; after a failed one (no answer, busy, unreachable)
  the next waits ``backoff[n]`` (and is again moved into the allowed hours);
- a trunk carries at most ``trunk_cap`` outbound calls at once (the rest wait their turn);
- a number on the do-not-call list is never dialled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Final
from zoneinfo import ZoneInfo

from ground.clock import HOSPITAL_TZ
from ground.daytime import PolicyError, Window, parse_hhmm

if TYPE_CHECKING:
    from ground.config import OutreachConfig

__all__ = ["LOCAL_TZ", "DialPolicy", "PolicyError", "Window", "failure_outcome", "parse_hhmm"]

LOCAL_TZ: Final = HOSPITAL_TZ
_SEARCH_DAYS: Final = 8


@dataclass(frozen=True, slots=True)
class DialPolicy:
    quiet: Window = Window(time(21, 0), time(8, 0))
    max_attempts: int = 3
    # Waits before attempt 2, 3, … (the last value repeats).
    backoff: tuple[timedelta, ...] = (timedelta(minutes=30), timedelta(hours=2))
    trunk_cap: int = 4
    tz: ZoneInfo = field(default=LOCAL_TZ)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise PolicyError("max_attempts must be at least 1")
        if not self.backoff:
            raise PolicyError("backoff needs at least one wait")
        if self.trunk_cap < 1:
            raise PolicyError("trunk_cap must be at least 1")

    @classmethod
    def from_config(cls, outreach: OutreachConfig) -> DialPolicy:
        return cls(
            quiet=Window.parse(outreach.quiet_hours, "quiet_hours"),
            max_attempts=outreach.max_attempts,
            backoff=tuple(timedelta(minutes=m) for m in outreach.backoff_minutes),
            trunk_cap=outreach.trunk_cap,
        )

    def allowed(self, at: datetime, window: Window | None = None) -> bool:
        local = at.astimezone(self.tz).time()
        if self.quiet.contains(local):
            return False
        return window is None or window.contains(local)

    def next_allowed(self, at: datetime, window: Window | None = None) -> datetime:
        """``at`` if calling is allowed then, else the first allowed minute after it."""
        if self.allowed(at, window):
            return at
        local = at.astimezone(self.tz).replace(second=0, microsecond=0)
        candidates = [self.quiet.end] + ([window.start] if window is not None else [])
        best: datetime | None = None
        for day in range(_SEARCH_DAYS):
            for start in candidates:
                moment = (local + timedelta(days=day)).replace(hour=start.hour, minute=start.minute)
                if moment > at and self.allowed(moment, window) and (best is None or moment < best):
                    best = moment
            if best is not None:
                return best
        raise PolicyError(f"the calling window {window} lies entirely inside the quiet hours {self.quiet}")

    def retry_at(self, attempt: int, ended_at: datetime, window: Window | None = None) -> datetime | None:
        """When attempt ``attempt + 1`` may be made after attempt ``attempt`` failed; None: no attempts left."""
        if attempt >= self.max_attempts:
            return None
        wait = self.backoff[min(attempt - 1, len(self.backoff) - 1)]
        return self.next_allowed(ended_at + wait, window)

    def has_capacity(self, in_flight: int) -> bool:
        return in_flight < self.trunk_cap


# Q.850 causes of an outbound call that never got answered, as the attempt's outcome.
def failure_outcome(cause: int) -> str:
    if cause == 17:
        return "busy"
    if cause in (18, 19, 16):
        return "no_answer"
    if cause in (1, 3, 20, 27, 28, 34, 38, 41, 42, 47, 127):
        return "unreachable"
    return "failed"
