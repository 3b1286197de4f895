"""The dialer's rules with a fake clock: calling window, quiet hours, attempts and backoff, trunk cap."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.policy import LOCAL_TZ, DialPolicy, PolicyError, Window, failure_outcome

POLICY = DialPolicy(
    quiet=Window(time(21, 0), time(8, 0)),
    max_attempts=3,
    backoff=(timedelta(minutes=30), timedelta(hours=2)),
    trunk_cap=2,
)
DAY = Window(time(9, 0), time(18, 0))


def local(hour: int, minute: int = 0, day: int = 2) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=LOCAL_TZ).astimezone(UTC)


def test_quiet_hours_wrap_over_midnight() -> None:
    assert not POLICY.allowed(local(22, 30))
    assert not POLICY.allowed(local(3, 0))
    assert not POLICY.allowed(local(7, 59))
    assert POLICY.allowed(local(8, 0))
    assert POLICY.allowed(local(20, 59))


def test_a_call_due_in_quiet_hours_waits_for_the_morning_and_the_plans_window() -> None:
    assert POLICY.next_allowed(local(23, 15)) == local(8, 0, day=3)
    assert POLICY.next_allowed(local(23, 15), DAY) == local(9, 0, day=3)
    assert POLICY.next_allowed(local(6, 0), DAY) == local(9, 0)
    # After the plan's window the call waits for the next day's window, not the end of quiet hours.
    assert POLICY.next_allowed(local(18, 30), DAY) == local(9, 0, day=3)
    assert POLICY.next_allowed(local(10, 0), DAY) == local(10, 0)


def test_a_window_inside_quiet_hours_is_refused() -> None:
    with pytest.raises(PolicyError, match="entirely inside the quiet hours"):
        POLICY.next_allowed(local(12, 0), Window(time(22, 0), time(23, 0)))


def test_retries_back_off_into_allowed_hours_and_stop_after_the_last_attempt() -> None:
    assert POLICY.retry_at(1, local(10, 0), DAY) == local(10, 30)
    assert POLICY.retry_at(2, local(10, 0), DAY) == local(12, 0)
    assert POLICY.retry_at(2, local(17, 0), DAY) == local(9, 0, day=3)  # 19:00 is after the window
    assert POLICY.retry_at(3, local(10, 0), DAY) is None


def test_trunk_cap() -> None:
    assert POLICY.has_capacity(0)
    assert POLICY.has_capacity(1)
    assert not POLICY.has_capacity(2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("9-18", "HH:MM"), ("09:00", "HH:MM-HH:MM"), ("25:00-26:00", "HH:MM"), ("09:00-09:00", "empty")],
)
def test_bad_windows_are_named(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        Window.parse(text, "--window")


def test_failure_causes() -> None:
    assert failure_outcome(17) == "busy"
    assert failure_outcome(19) == "no_answer"
    assert failure_outcome(1) == "unreachable"
    assert failure_outcome(99) == "failed"


@given(st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)))
def test_next_allowed_is_never_earlier_and_always_allowed(naive: datetime) -> None:
    at = naive.replace(tzinfo=UTC)
    chosen = POLICY.next_allowed(at, DAY)
    assert chosen >= at
    assert POLICY.allowed(chosen, DAY)
    assert chosen - at < timedelta(days=2)
