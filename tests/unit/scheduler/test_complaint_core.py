"""12320 complaint deadlines in working days, with fixed clocks: Friday and holiday edges, 调休, order of steps."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Final

import pytest

from ground.clock import HOSPITAL_TZ
from ground.workdays import WorkdayError, WorkingCalendar, parse_dates
from scheduler.complaint_core import (
    Complaint,
    ComplaintError,
    check_summary,
    deadlines,
    late_stages,
    overdue_stages,
    step,
)

PLAIN: Final = WorkingCalendar(HOSPITAL_TZ)
# National Day 2026: 1-7 October off, Saturday 10 October worked (the published 调休 pattern, for the test).
NATIONAL_DAY: Final = WorkingCalendar(
    HOSPITAL_TZ,
    holidays=frozenset(date(2026, 10, d) for d in range(1, 8)),
    extra_workdays=frozenset({date(2026, 10, 10)}),
)


def local(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=HOSPITAL_TZ)


def task(received: datetime) -> Complaint:
    return Complaint("c-1", "attitude", received)


def test_received_monday_morning_refer_by_end_of_tuesday_resolve_by_end_of_next_monday() -> None:
    due = deadlines(task(local(2026, 3, 2, 9)), PLAIN)  # Monday
    assert due.refer_by == local(2026, 3, 4)  # end of Tuesday
    assert due.resolve_by == local(2026, 3, 10)  # Tue..Fri + Mon: end of Monday 9 March
    assert due.answer_by is None


def test_received_friday_afternoon_refer_by_end_of_monday() -> None:
    due = deadlines(task(local(2026, 3, 6, 16, 30)), PLAIN)  # Friday
    assert due.refer_by == local(2026, 3, 10)  # end of Monday 9 March, not Saturday
    assert due.resolve_by == local(2026, 3, 14)  # Mon..Fri: end of Friday 13 March


def test_received_on_saturday_counts_from_monday() -> None:
    assert deadlines(task(local(2026, 3, 7, 10)), PLAIN).refer_by == local(2026, 3, 10)


def test_just_before_local_midnight_is_still_that_day() -> None:
    # 23:59 local on Friday is 15:59 UTC: the calendar day is the hospital's, not UTC's.
    received = local(2026, 3, 6, 23, 59)
    assert deadlines(task(received.astimezone(HOSPITAL_TZ)), PLAIN).refer_by == local(2026, 3, 10)


def test_holiday_week_and_the_worked_saturday() -> None:
    due = deadlines(task(local(2026, 9, 30, 15)), NATIONAL_DAY)  # Wednesday before National Day
    # 1-7 October are holidays, 8 (Thu) is the first working day; then 9 (Fri), 10 (Sat, worked), 12, 13.
    assert due.refer_by == local(2026, 10, 9)
    assert due.resolve_by == local(2026, 10, 14)


def test_answer_deadline_counts_from_resolution_friday_edge() -> None:
    t = step(step(task(local(2026, 3, 2, 9)), "refer", local(2026, 3, 2, 11), department="cardiology"),
             "resolve", local(2026, 3, 6, 17))  # fmt: skip
    assert deadlines(t, PLAIN).answer_by == local(2026, 3, 10)  # resolved Friday: answer by end of Monday


def test_overdue_stages_at_fixed_clocks() -> None:
    t = task(local(2026, 3, 6, 16))  # Friday
    due = deadlines(t, PLAIN)
    assert overdue_stages(t, due, local(2026, 3, 9, 23, 59)) == []
    assert overdue_stages(t, due, local(2026, 3, 10)) == [("refer", local(2026, 3, 10))]
    referred = step(t, "refer", local(2026, 3, 10, 8), department="surgery")
    assert overdue_stages(referred, due, local(2026, 3, 10, 9)) == []
    assert late_stages(referred, due) == ["refer"]
    assert [s for s, _ in overdue_stages(referred, due, local(2026, 3, 14))] == ["resolve"]
    resolved = step(referred, "resolve", local(2026, 3, 13, 10))
    rdue = deadlines(resolved, PLAIN)
    assert overdue_stages(resolved, rdue, local(2026, 3, 16, 23)) == []
    assert overdue_stages(resolved, rdue, local(2026, 3, 17)) == [("answer", local(2026, 3, 17))]
    answered = step(resolved, "answer", local(2026, 3, 17, 9), score=4)
    assert overdue_stages(answered, rdue, local(2026, 4, 1)) == []
    assert late_stages(answered, rdue) == ["refer", "answer"]
    assert answered.survey_score == 4


def test_steps_out_of_order_are_refused() -> None:
    t = task(local(2026, 3, 2, 9))
    with pytest.raises(ComplaintError, match="received: it cannot be resolved"):
        step(t, "resolve", local(2026, 3, 3))
    with pytest.raises(ComplaintError, match="department"):
        step(t, "refer", local(2026, 3, 3))
    with pytest.raises(ComplaintError, match="before the previous step"):
        step(t, "refer", local(2026, 3, 1), department="surgery")
    referred = step(t, "refer", local(2026, 3, 3), department="surgery")
    with pytest.raises(ComplaintError, match="it cannot be referred"):
        step(referred, "refer", local(2026, 3, 3), department="surgery")
    resolved = step(referred, "resolve", local(2026, 3, 4))
    for bad in (0, 6):
        with pytest.raises(ComplaintError, match=r"outside 1\.\.5"):
            step(resolved, "answer", local(2026, 3, 5), score=bad)


def test_summary_refuses_number_like_runs() -> None:
    assert check_summary("  挂号窗口态度差  ") == "挂号窗口态度差"
    for bad in ("患者电话 138 0013 8000 投诉", "身份证110101199003071234", "", "x" * 501):
        with pytest.raises(ComplaintError):
            check_summary(bad)


def test_calendar_refuses_bad_input() -> None:
    with pytest.raises(WorkdayError, match=r"holidays\[1\]"):
        parse_dates(["2026-10-01", "10/02/2026"], "holidays")
    with pytest.raises(WorkdayError, match="both"):
        WorkingCalendar(HOSPITAL_TZ, frozenset({date(2026, 10, 1)}), frozenset({date(2026, 10, 1)}))
    with pytest.raises(WorkdayError, match="timezone-aware"):
        PLAIN.end_of_working_days(datetime(2026, 3, 2), 1)  # naive on purpose
    every_day = frozenset(date(2026, 1, 1) + timedelta(days=n) for n in range(4000))
    with pytest.raises(WorkdayError, match="no 1 working day"):
        WorkingCalendar(HOSPITAL_TZ, every_day).end_of_working_days(local(2026, 1, 1), 1)
