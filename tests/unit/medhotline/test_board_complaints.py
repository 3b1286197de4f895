"""The wallboard's snapshot counts overdue 12320 complaint steps and names the oldest, without its summary."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Engine

from ground.clock import HOSPITAL_TZ
from medhotline.api.board import Board
from routing.statistics import StatsSettings
from scheduler.complaint_core import Complaint
from scheduler.complaints import ComplaintStore, StoredComplaint

FRIDAY: Final = datetime(2026, 3, 6, 16, 0, tzinfo=HOSPITAL_TZ)
SUMMARY: Final = "药房窗口排队过久且态度冷淡"


def _add(store: ComplaintStore, complaint_id: str, received: datetime, **changes: object) -> None:
    task = replace(Complaint(complaint_id, "attitude", received), **changes)  # type: ignore[arg-type]
    store.add(StoredComplaint(task, "call-1", SUMMARY, None, None, "sup.one"))


def test_snapshot_counts_overdue_complaints_and_the_oldest(engine: Engine) -> None:
    store = ComplaintStore.for_engine(engine)
    board = Board(engine, StatsSettings())
    assert board.snapshot(FRIDAY)["complaints"] == {"overdue": 0, "tasks": 0, "oldest": None}
    _add(store, "c-old", FRIDAY - timedelta(days=9))  # refer and resolve both overdue
    _add(store, "c-fri", FRIDAY)  # received Friday: due by the end of Monday
    _add(store, "c-done", FRIDAY - timedelta(days=9), state="answered", department="surgery",
         referred_at=FRIDAY - timedelta(days=9), resolved_at=FRIDAY - timedelta(days=8),
         answered_at=FRIDAY - timedelta(days=8))  # fmt: skip
    monday_night = datetime(2026, 3, 9, 23, 59, tzinfo=HOSPITAL_TZ)
    snapshot = board.snapshot(monday_night)
    complaints = snapshot["complaints"]
    assert isinstance(complaints, dict)
    assert (complaints["overdue"], complaints["tasks"]) == (2, 1)
    oldest = complaints["oldest"]
    assert isinstance(oldest, dict)
    # Received Wednesday 25 February: refer by the end of Thursday 26th.
    assert (oldest["complaint_id"], oldest["stage"], oldest["due"]) == ("c-old", "refer", "2026-02-27T00:00:00+08:00")
    assert SUMMARY not in json.dumps(snapshot, ensure_ascii=False)
    tuesday = board.snapshot(datetime(2026, 3, 10, 0, 0, tzinfo=HOSPITAL_TZ))["complaints"]
    assert isinstance(tuesday, dict)
    assert (tuesday["overdue"], tuesday["tasks"]) == (3, 2)
