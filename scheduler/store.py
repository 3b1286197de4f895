"""Follow-up plans and outbound call attempts in the database.

A *round* is one due call of a plan or reminder (its id is derived from the subject and the due time, so a job
that fires twice, on one node or two, creates the round once: ``(round_id, attempt)`` is unique). Attempts move
``scheduled → dialing → answered → completed`` or ``→ failed``, each step a conditional UPDATE, so two dialers
never place one attempt twice.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError

from ground.db import DatabaseError, Repository, rowcount
from ground.errors import MedhotlineError
from ground.leases import NodeLease
from scheduler.tables import ATTEMPT_KINDS, FollowupPlan, OutreachAttempt

_ROUNDS = uuid.UUID("7d0c5a52-3e8e-4c1b-9a57-6c0e3d1f0b11")  # namespace of round ids


class OutreachError(MedhotlineError):
    pass


def round_id(subject_id: str, due_at: datetime) -> str:
    return str(uuid.uuid5(_ROUNDS, f"{subject_id}|{due_at.isoformat()}"))


@dataclass(frozen=True, slots=True)
class Threshold:
    low: float
    high: float

    def abnormal(self, value: float) -> bool:
        return not self.low <= value <= self.high


@dataclass(frozen=True, slots=True)
class PlanRecord:
    id: str
    patient_id: str
    condition: str
    interval_days: int
    window: str
    flow: str
    thresholds: Mapping[str, Threshold]
    responsible: str | None
    active: bool
    next_due_at: datetime
    created_at: datetime


def _plan(row: FollowupPlan) -> PlanRecord:
    raw = json.loads(row.thresholds)
    return PlanRecord(
        id=row.id,
        patient_id=row.patient_id,
        condition=row.condition,
        interval_days=row.interval_days,
        window=f"{row.window_start}-{row.window_end}",
        flow=row.flow,
        thresholds={k: Threshold(float(v["low"]), float(v["high"])) for k, v in raw.items()},
        responsible=row.responsible,
        active=row.active,
        next_due_at=row.next_due_at,
        created_at=row.created_at,
    )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    id: str
    kind: str
    subject_id: str
    patient_id: str
    round_id: str
    attempt: int
    state: str
    not_before: datetime
    node: str | None
    trunk: str | None
    channel_id: str | None
    call_id: str | None
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str | None


def _attempt(row: OutreachAttempt) -> AttemptRecord:
    return AttemptRecord(
        row.id, row.kind, row.subject_id, row.patient_id, row.round_id, row.attempt, row.state, row.not_before,
        row.node, row.trunk, row.channel_id, row.call_id, row.started_at, row.ended_at, row.outcome,
    )  # fmt: skip


# An attempt whose node was taken over (``ground.leases``) ends with this outcome, as the node's inbound calls do.
NODE_LOST = "node_lost"
_IN_PROGRESS = ("dialing", "answered")


@dataclass(frozen=True, slots=True)
class LostAttempt:
    """An attempt in progress on a node whose lease another node took over: which lease (epoch) and when."""

    attempt: AttemptRecord
    node: str
    epoch: int
    lost_at: datetime


class PlanStore(Repository):
    def add(
        self,
        *,
        patient_id: str,
        condition: str,
        interval_days: int,
        window: tuple[str, str],
        flow: str,
        thresholds: Mapping[str, Threshold],
        responsible: str | None,
        first_due: datetime,
        at: datetime,
        by: str,
    ) -> PlanRecord:
        row = FollowupPlan(
            id=str(uuid.uuid4()),
            patient_id=patient_id,
            condition=condition,
            interval_days=interval_days,
            window_start=window[0],
            window_end=window[1],
            flow=flow,
            thresholds=json.dumps({k: {"low": t.low, "high": t.high} for k, t in sorted(thresholds.items())}),
            responsible=responsible,
            active=True,
            next_due_at=first_due,
            created_at=at,
            created_by=by,
        )
        with self._transaction("adding a follow-up plan") as session:
            session.add(row)
            session.flush()
            return _plan(row)

    def get(self, plan_id: str) -> PlanRecord:
        with self._transaction(f"reading follow-up plan {plan_id}") as session:
            row = session.get(FollowupPlan, plan_id)
            if row is None:
                raise OutreachError(f"no follow-up plan {plan_id}")
            return _plan(row)

    def active(self) -> list[PlanRecord]:
        with self._transaction("listing follow-up plans") as session:
            rows = session.scalars(
                select(FollowupPlan).where(FollowupPlan.active.is_(True)).order_by(FollowupPlan.next_due_at)
            ).all()
            return [_plan(r) for r in rows]

    def all(self) -> list[PlanRecord]:
        with self._transaction("listing follow-up plans") as session:
            return [_plan(r) for r in session.scalars(select(FollowupPlan).order_by(FollowupPlan.created_at)).all()]

    def set_due(self, plan_id: str, due: datetime) -> None:
        with self._transaction(f"setting the next due time of plan {plan_id}") as session:
            session.execute(update(FollowupPlan).where(FollowupPlan.id == plan_id).values(next_due_at=due))

    def deactivate(self, plan_id: str) -> bool:
        with self._transaction(f"ending follow-up plan {plan_id}") as session:
            result = session.execute(
                update(FollowupPlan).where(FollowupPlan.id == plan_id, FollowupPlan.active.is_(True))
                .values(active=False)
            )  # fmt: skip
            return bool(rowcount(result))


class AttemptStore(Repository):
    def open_round(
        self, kind: str, subject_id: str, patient_id: str, due_at: datetime, not_before: datetime
    ) -> AttemptRecord | None:
        """Attempt 1 of the round due at ``due_at``; None when that round exists already (fired before)."""
        if kind not in ATTEMPT_KINDS:
            raise OutreachError(f"unknown outreach kind {kind!r}")
        row = OutreachAttempt(
            id=str(uuid.uuid4()),
            kind=kind,
            subject_id=subject_id,
            patient_id=patient_id,
            round_id=round_id(subject_id, due_at),
            attempt=1,
            state="scheduled",
            not_before=not_before,
        )
        try:
            with self._transaction(f"scheduling a {kind} call") as session:
                session.add(row)
                session.flush()
                return _attempt(row)
        except DatabaseError:
            if self._round_exists(row.round_id):
                return None
            raise

    def _round_exists(self, round_: str) -> bool:
        with self._transaction("checking a round") as session:
            return (
                session.scalars(select(OutreachAttempt.id).where(OutreachAttempt.round_id == round_)).first()
                is not None
            )

    def next_attempt(self, previous: AttemptRecord, not_before: datetime) -> AttemptRecord | None:
        row = OutreachAttempt(
            id=str(uuid.uuid4()),
            kind=previous.kind,
            subject_id=previous.subject_id,
            patient_id=previous.patient_id,
            round_id=previous.round_id,
            attempt=previous.attempt + 1,
            state="scheduled",
            not_before=not_before,
        )
        try:
            with self._transaction("scheduling a retry") as session:
                session.add(row)
                session.flush()
                return _attempt(row)
        except (DatabaseError, IntegrityError):
            return None  # scheduled already by another node

    def due(self, now: datetime, limit: int = 20) -> list[AttemptRecord]:
        with self._transaction("listing due calls") as session:
            rows = session.scalars(
                select(OutreachAttempt)
                .where(OutreachAttempt.state == "scheduled", OutreachAttempt.not_before <= now)
                .order_by(OutreachAttempt.not_before)
                .limit(limit)
            ).all()
            return [_attempt(r) for r in rows]

    def claim(self, attempt_id: str, node: str, trunk: str, channel_id: str, at: datetime) -> bool:
        with self._transaction(f"claiming call attempt {attempt_id}") as session:
            result = session.execute(
                update(OutreachAttempt)
                .where(OutreachAttempt.id == attempt_id, OutreachAttempt.state == "scheduled")
                .values(state="dialing", node=node, trunk=trunk, channel_id=channel_id, started_at=at)
            )
            return bool(rowcount(result))

    def defer(self, attempt_id: str, not_before: datetime) -> None:
        with self._transaction(f"deferring call attempt {attempt_id}") as session:
            session.execute(
                update(OutreachAttempt)
                .where(OutreachAttempt.id == attempt_id, OutreachAttempt.state == "scheduled")
                .values(not_before=not_before)
            )

    def in_flight(self, trunk: str) -> int:
        with self._transaction("counting calls in progress") as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(OutreachAttempt)
                    .where(OutreachAttempt.trunk == trunk, OutreachAttempt.state.in_(("dialing", "answered")))
                )
                or 0
            )

    def answered(self, attempt_id: str, call_id: str) -> bool:
        with self._transaction(f"call attempt {attempt_id} as answered") as session:
            result = session.execute(
                update(OutreachAttempt)
                .where(OutreachAttempt.id == attempt_id, OutreachAttempt.state == "dialing")
                .values(state="answered", call_id=call_id)
            )
            return bool(rowcount(result))

    def finish(self, attempt_id: str, *, state: str, outcome: str, at: datetime) -> bool:
        with self._transaction(f"finishing call attempt {attempt_id}") as session:
            result = session.execute(
                update(OutreachAttempt)
                .where(
                    OutreachAttempt.id == attempt_id, OutreachAttempt.state.in_(("scheduled", "dialing", "answered"))
                )
                .values(state=state, outcome=outcome, ended_at=at)
            )
            return bool(rowcount(result))

    def get(self, attempt_id: str) -> AttemptRecord:
        with self._transaction(f"reading call attempt {attempt_id}") as session:
            row = session.get(OutreachAttempt, attempt_id)
            if row is None:
                raise OutreachError(f"no call attempt {attempt_id}")
            return _attempt(row)

    def for_subject(self, subject_id: str) -> list[AttemptRecord]:
        with self._transaction("listing call attempts") as session:
            rows = session.scalars(
                select(OutreachAttempt)
                .where(OutreachAttempt.subject_id == subject_id)
                .order_by(OutreachAttempt.not_before, OutreachAttempt.attempt)
            ).all()
            return [_attempt(r) for r in rows]

    def stale_dialing(self, node: str) -> list[AttemptRecord]:
        """Attempts this node was dialling or talking on when it stopped: their end was never seen."""
        with self._transaction("listing interrupted calls") as session:
            rows = session.scalars(
                select(OutreachAttempt).where(
                    OutreachAttempt.node == node, OutreachAttempt.state.in_(("dialing", "answered"))
                )
            ).all()
            return [_attempt(r) for r in rows]

    def on_lost_nodes(self, now: datetime, *, settle: timedelta, besides: str) -> list[LostAttempt]:
        """Attempts still ``dialing`` or ``answered`` on another node whose lease was taken over at least ``settle``
        before ``now`` and that started before the takeover. A node whose lease is live again (restarted under its
        name) is not listed: its own start (``Dialer._recover``) closes what it left."""
        query = (
            select(OutreachAttempt, NodeLease.node, NodeLease.epoch, NodeLease.taken_over_at)
            .join(NodeLease, NodeLease.node == OutreachAttempt.node)
            .where(
                OutreachAttempt.state.in_(_IN_PROGRESS),
                OutreachAttempt.node != besides,
                NodeLease.state == "lost",
                NodeLease.taken_over_at <= now - settle,
                OutreachAttempt.started_at < NodeLease.taken_over_at,
            )
            .order_by(OutreachAttempt.started_at)
        )
        with self._transaction("listing calls of nodes taken over") as session:
            return [
                LostAttempt(_attempt(row), node, epoch, lost_at)
                for row, node, epoch, lost_at in session.execute(query)
                if lost_at is not None
            ]

    def close_lost(self, lost: LostAttempt) -> bool:
        """Mark ``lost`` failed with outcome ``node_lost``, ended when its node was taken over; False when it is
        not ours to close any more (closed by another leader or by the node's own restart, or the lease is live
        again). One conditional UPDATE, so of two leaders racing exactly one closes it and settles its round."""
        lease_still_lost = exists().where(
            NodeLease.node == lost.node,
            NodeLease.epoch == lost.epoch,
            NodeLease.state == "lost",
            NodeLease.taken_over_at == lost.lost_at,
        )
        statement = (
            update(OutreachAttempt)
            .where(
                OutreachAttempt.id == lost.attempt.id,
                OutreachAttempt.node == lost.node,
                OutreachAttempt.state.in_(_IN_PROGRESS),
                OutreachAttempt.started_at < lost.lost_at,
                lease_still_lost,
            )
            .values(state="failed", outcome=NODE_LOST, ended_at=lost.lost_at)
        )
        with self._transaction(f"closing call attempt {lost.attempt.id} of lost node {lost.node}") as session:
            return rowcount(session.execute(statement)) == 1
