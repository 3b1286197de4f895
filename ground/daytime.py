"""Times of day and daily windows (``09:00-18:00``, quiet hours ``21:00-08:00``), sans I/O.

At the bottom because the configuration validates its windows when it is loaded, and the scheduler applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time

from ground.errors import MedhotlineError


class PolicyError(MedhotlineError):
    pass


def parse_hhmm(value: str, what: str = "time") -> time:
    try:
        hours, minutes = value.split(":")
        return time(int(hours), int(minutes))
    except (ValueError, TypeError):
        raise PolicyError(f"{what} must be HH:MM (00:00-23:59), got {value!r}") from None


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) local time of day; start > end wraps over midnight (quiet hours 21:00-08:00)."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str, what: str = "window") -> Window:
        start, sep, end = text.partition("-")
        if not sep:
            raise PolicyError(f"{what} must be HH:MM-HH:MM, got {text!r}")
        window = cls(parse_hhmm(start, what), parse_hhmm(end, what))
        if window.start == window.end:
            raise PolicyError(f"{what} {text!r} is empty")
        return window

    def contains(self, at: time) -> bool:
        if self.start < self.end:
            return self.start <= at < self.end
        return at >= self.start or at < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"
