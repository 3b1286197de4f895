"""Working days (Monday to Friday, less public holidays, plus the weekend days worked in their place), sans I/O.

At the bottom because the configuration validates its holiday list when it is loaded and the 12320 complaint
deadlines (docs/complaints.md) count in working days. China moves working days around its holidays (调休): a
Saturday or Sunday can be a working day, so both lists are configured, never derived.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from ground.errors import MedhotlineError

__all__ = ["WorkdayError", "WorkingCalendar", "parse_dates"]

# No deadline in this project is more than a few weeks of working days; a bound keeps a calendar that has no
# working day at all (every day a holiday) from looping for ever.
_MAX_SCAN_DAYS = 3660


class WorkdayError(MedhotlineError):
    pass


def parse_dates(values: Iterable[str], what: str) -> frozenset[date]:
    """``["2026-10-01", …]`` → dates; a malformed entry is named with its position."""
    found: set[date] = set()
    for index, value in enumerate(values):
        try:
            found.add(date.fromisoformat(value))
        except (TypeError, ValueError):
            raise WorkdayError(f"{what}[{index}]: {value!r} is not a date (YYYY-MM-DD)") from None
    return frozenset(found)


@dataclass(frozen=True, slots=True)
class WorkingCalendar:
    """Which local days are working days; ``zone`` is the hospital's, so a day ends at its local midnight."""

    zone: ZoneInfo
    holidays: frozenset[date] = field(default_factory=frozenset)
    # Weekend days worked instead of a holiday (调休); a date in both lists is refused.
    extra_workdays: frozenset[date] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        both = sorted(self.holidays & self.extra_workdays)
        if both:
            raise WorkdayError(f"{both[0].isoformat()} is listed both as a holiday and as a working day")

    def is_working_day(self, day: date) -> bool:
        if day in self.holidays:
            return False
        return day.weekday() < 5 or day in self.extra_workdays

    def end_of_working_days(self, start: datetime, count: int) -> datetime:
        """The end (local midnight, exclusive) of the ``count``-th working day after the local day of ``start``.

        The day of ``start`` itself never counts, worked or not: something received on Friday at 09:00 or on
        Saturday is due "within one working day" by the end of Monday (Tuesday 00:00 local).
        """
        if start.tzinfo is None:
            raise WorkdayError("a working-day deadline needs a timezone-aware start time")
        if count < 1:
            raise WorkdayError(f"a working-day deadline needs at least one working day, got {count}")
        day = start.astimezone(self.zone).date()
        left = count
        for _ in range(_MAX_SCAN_DAYS):
            day += timedelta(days=1)
            if self.is_working_day(day):
                left -= 1
                if left == 0:
                    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=self.zone)
        raise WorkdayError(f"no {count} working day(s) within {_MAX_SCAN_DAYS} days of {day}: check the holidays")
