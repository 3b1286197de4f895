"""ground.clock: one UTC text format and one local zone, used by every package that writes or reads them."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest

from compliance.audit import _format_time
from ground.clock import HOSPITAL_TZ, utc_text
from ground.logs import _add_timestamp
from medhotline.commands.routing import LOCAL_TZ as ROUTING_TZ
from medhotline.commands.routing import format_day, parse_date
from recordings.signed import format_time as record_format_time
from scheduler.policy import LOCAL_TZ as SCHEDULER_TZ


def test_utc_text_is_fixed_width_utc_with_z() -> None:
    at = datetime(2026, 3, 1, 16, 5, 9, 7, tzinfo=timezone(timedelta(hours=8)))
    assert utc_text(at) == "2026-03-01T08:05:09.000007Z"
    assert utc_text(datetime(2026, 3, 1, tzinfo=UTC)) == "2026-03-01T00:00:00.000000Z"  # no microseconds dropped


def test_utc_text_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        utc_text(datetime(2026, 3, 1))  # a naive time is the point of this test


def test_audit_records_and_logs_write_the_same_text() -> None:
    at = datetime(2026, 3, 1, 8, 5, 9, 123456, tzinfo=UTC)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = at.timestamp()
    logged = _add_timestamp(None, "info", {"_record": record})["timestamp"]
    assert _format_time(at) == record_format_time(at) == logged == utc_text(at)
    json.dumps(logged)


def test_one_local_zone_for_the_scheduler_and_the_command_line() -> None:
    assert SCHEDULER_TZ is HOSPITAL_TZ
    assert ROUTING_TZ is HOSPITAL_TZ


def test_a_typed_date_is_local_midnight_by_the_zone_rules_not_a_fixed_offset() -> None:
    # Shanghai kept summer time in 1986-1991 (UTC+09:00): a fixed +08:00 puts this midnight an hour late.
    assert parse_date("1988-06-01", "--valid-from") == datetime(1988, 5, 31, 15, 0, tzinfo=UTC)
    assert format_day(datetime(1988, 5, 31, 15, 30, tzinfo=UTC)) == "1988-06-01"
