"""Opening a round of calls when a plan comes due: shared by the service's scheduler and its tests."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ground.db import rowcount
from scheduler.policy import DialPolicy, Window
from scheduler.store import AttemptRecord, AttemptStore
from scheduler.tables import FollowupPlan

# A job may fire a little before its due time (clock skew between nodes); earlier than this is a duplicate.
EARLY_TOLERANCE = timedelta(minutes=1)


def open_followup_round(
    sessions: sessionmaker[Session], attempts: AttemptStore, policy: DialPolicy, plan_id: str, now: datetime
) -> AttemptRecord | None:
    """A plan's job fired: advance its due time (conditionally: a job that fires twice, on one node or two,
    advances it once) and open the round of calls for the due time it had, first call in the allowed hours."""
    with sessions.begin() as session:
        plan = session.get(FollowupPlan, plan_id)
        if plan is None or not plan.active:
            return None
        due = plan.next_due_at
        if due > now + EARLY_TOLERANCE:
            # Not due yet: a job firing again after it advanced the plan (a duplicate, a leader that lost its
            # lock) must not open the next round early.
            return None
        advanced = rowcount(
            session.execute(
                update(FollowupPlan)
                .where(FollowupPlan.id == plan_id, FollowupPlan.next_due_at == due)
                .values(next_due_at=max(due, now) + timedelta(days=plan.interval_days))
            )
        )
        window = Window.parse(f"{plan.window_start}-{plan.window_end}")
        patient = plan.patient_id
    if not advanced:
        return None
    return attempts.open_round("followup", plan_id, patient, due, policy.next_allowed(now, window))
