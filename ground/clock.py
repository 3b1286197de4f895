"""The two clocks the project writes down: UTC as text, and the hospital's local zone.

At the bottom because the audit trail, signed recording records, log lines, the scheduler and the command line
must all agree on them: one definition each, not one per package.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final
from zoneinfo import ZoneInfo

# The hospital's local time: calendar days, quiet hours and the dates operators type. A zone, not a fixed +08:00,
# so the rules live in the tz database (China has no DST today; a fixed offset would silently disagree if that
# changed). The configuration has no time zone setting; this is the one place to change it.
HOSPITAL_TZ_NAME: Final = "Asia/Shanghai"
HOSPITAL_TZ: Final = ZoneInfo(HOSPITAL_TZ_NAME)


def utc_text(at: datetime) -> str:
    """``2026-03-01T08:00:00.000000Z``: UTC, always microseconds, ``Z``. Fixed width, so the text sorts as the time
    does; the audit trail and signed records hash this text, so the format must never change.

    A naive datetime is refused (ValueError): its zone would be a guess.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a time written as UTC text must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
