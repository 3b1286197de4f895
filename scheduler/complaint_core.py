"""12320 complaint tasks, sans I/O: the steps, their order, the working-day deadlines and what is overdue.

A complaint received on the hotline is *referred* to the department concerned within one working day of receipt,
*resolved* within five working days of receipt, and *answered* (the patient called back and asked to rate the
handling 1-5 on the keypad) within one working day of its resolution (docs/complaints.md). The numbers of days
and the calendar are configuration; nothing here reads a clock or a database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final, Literal, get_args

from ground.errors import MedhotlineError
from ground.workdays import WorkingCalendar

__all__ = [
    "CATEGORIES",
    "STATES",
    "Complaint",
    "ComplaintError",
    "Deadlines",
    "Stage",
    "check_summary",
    "deadlines",
    "overdue_stages",
    "step",
]

State = Literal["received", "referred", "resolved", "answered"]
STATES: Final[tuple[State, ...]] = get_args(State)
Stage = Literal["refer", "resolve", "answer"]
# What each step needs to have happened before it, and the state it leads to.
_STEP: Final[dict[Stage, tuple[State, State]]] = {
    "refer": ("received", "referred"),
    "resolve": ("referred", "resolved"),
    "answer": ("resolved", "answered"),
}
# The 12320 hotline's usual complaint categories (service attitude, medical quality, fees, waiting and access,
# medical ethics, other); the category is a code, never free text that could carry a name.
Category = Literal["attitude", "quality", "fees", "access", "ethics", "other"]
CATEGORIES: Final[tuple[Category, ...]] = get_args(Category)
SURVEY_MIN: Final = 1
SURVEY_MAX: Final = 5
SUMMARY_MAX: Final = 500
# Seven or more digits, possibly separated, look like a phone, ID or record number: refused in a summary. So is an
# 18-character resident ID (17 digits and a check character), caught by the same pattern.
_NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")


class ComplaintError(MedhotlineError):
    pass


def check_summary(text: str) -> str:
    """The summary, stripped, if it holds no number-like run (a patient is named by pseudonymous id, separately)."""
    text = text.strip()
    if not text:
        raise ComplaintError("--summary is empty: say what the complaint is about (no names, no numbers)")
    if len(text) > SUMMARY_MAX:
        raise ComplaintError(f"--summary is {len(text)} characters; at most {SUMMARY_MAX}")
    if _NUMBER_LIKE.search(text):
        raise ComplaintError(
            "--summary contains a number-like run (7+ digits): no phone, ID or record number in a summary; "
            "name the patient with --patient (the registry's pseudonymous id)"
        )
    return text


@dataclass(frozen=True, slots=True)
class Complaint:
    """A complaint task as the core sees it: times are timezone-aware, the department a code."""

    id: str
    category: Category
    received_at: datetime
    state: State = "received"
    department: str | None = None
    referred_at: datetime | None = None
    resolved_at: datetime | None = None
    answered_at: datetime | None = None
    survey_score: int | None = None


@dataclass(frozen=True, slots=True)
class Deadlines:
    refer_by: datetime
    resolve_by: datetime
    # Known once the task is resolved: one working day after the resolution.
    answer_by: datetime | None


def deadlines(
    task: Complaint, calendar: WorkingCalendar, *, refer_days: int = 1, resolve_days: int = 5, answer_days: int = 1
) -> Deadlines:
    answer_by = None
    if task.resolved_at is not None:
        answer_by = calendar.end_of_working_days(task.resolved_at, answer_days)
    return Deadlines(
        calendar.end_of_working_days(task.received_at, refer_days),
        calendar.end_of_working_days(task.received_at, resolve_days),
        answer_by,
    )


def overdue_stages(task: Complaint, due: Deadlines, now: datetime) -> list[tuple[Stage, datetime]]:
    """The steps not done whose deadline has passed at ``now``, with their deadlines (earliest first).

    A step done late is not overdue any more (the task moved on); ``late_stages`` of the report tells it apart."""
    found: list[tuple[Stage, datetime]] = []
    if task.referred_at is None and now >= due.refer_by:
        found.append(("refer", due.refer_by))
    if task.resolved_at is None and now >= due.resolve_by:
        found.append(("resolve", due.resolve_by))
    answer_due = task.resolved_at is not None and task.answered_at is None and due.answer_by is not None
    if answer_due and due.answer_by is not None and now >= due.answer_by:
        found.append(("answer", due.answer_by))
    return found


def late_stages(task: Complaint, due: Deadlines) -> list[Stage]:
    """The steps that were done, but after their deadline (for the record and the quality team)."""
    late: list[Stage] = []
    if task.referred_at is not None and task.referred_at >= due.refer_by:
        late.append("refer")
    if task.resolved_at is not None and task.resolved_at >= due.resolve_by:
        late.append("resolve")
    if task.answered_at is not None and due.answer_by is not None and task.answered_at >= due.answer_by:
        late.append("answer")
    return late


def step(
    task: Complaint, stage: Stage, at: datetime, *, department: str | None = None, score: int | None = None
) -> Complaint:
    """The task after ``stage`` done at ``at``; ComplaintError if out of order, back in time or incomplete."""
    if at.tzinfo is None:
        raise ComplaintError("a complaint step needs a timezone-aware time")
    before, after = _STEP[stage]
    if task.state != before:
        raise ComplaintError(f"complaint {task.id} is {task.state}: it cannot be {after} now (it must be {before})")
    previous = {"referred": task.received_at, "resolved": task.referred_at, "answered": task.resolved_at}[after]
    if previous is not None and at < previous:
        raise ComplaintError(f"complaint {task.id}: {stage} at {at.isoformat()} is before the previous step")
    if stage == "refer":
        if not department:
            raise ComplaintError("refer needs the department the complaint is referred to (--department)")
        return replace(task, state=after, department=department, referred_at=at)
    if stage == "resolve":
        return replace(task, state=after, resolved_at=at)
    if score is not None and not SURVEY_MIN <= score <= SURVEY_MAX:
        raise ComplaintError(f"satisfaction score {score} is outside {SURVEY_MIN}..{SURVEY_MAX}")
    return replace(task, state=after, answered_at=at, survey_score=score)
