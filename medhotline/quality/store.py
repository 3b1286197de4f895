"""Quality control's reads and writes: finished calls not yet checked, their facts, the stored checks, the queue.

Facts are read with the statistics' own reader (``routing.statistics_store``) and interpreted with the
statistics' own rules (``routing.statistics.visits``), so a wait, an abandon or a wrap-up means the same in both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from compliance.accounts import Account
from ground.db import Repository
from ground.models import Call, CallStep
from medhotline.quality.checker import FinishedCall, Flag
from medhotline.quality.tables import QualityCheck, QualityReview
from recordings.tables import CallNote, SignedCallRecord
from routing.statistics import QueueVisit, StatsSettings, visits
from routing.statistics_store import StatsStore

__all__ = ["QualityStore", "QueueEntry", "StoredCheck"]

_SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}


@dataclass(frozen=True, slots=True)
class StoredCheck:
    call_id: str
    ended_at: datetime
    flags: tuple[Flag, ...]
    sampled: bool
    for_review: bool


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One call waiting for review: ids, category, times and flags only, never a caller."""

    call_id: str
    ended_at: datetime
    category: str | None
    flags: tuple[Flag, ...]
    sampled: bool


def _flags(text: str) -> tuple[Flag, ...]:
    return tuple(Flag(f["rule"], f["severity"], f["why"]) for f in json.loads(text))


class QualityStore(Repository):
    def unchecked(self, since: datetime | None, limit: int = 5000) -> list[tuple[str, datetime]]:
        """(call id, ended at) of finished calls without a check, oldest first."""
        with self._transaction("finding finished calls not yet checked") as session:
            query = (
                select(Call.id, Call.ended_at)
                .where(Call.ended_at.is_not(None), ~exists().where(QualityCheck.call_id == Call.id))
                .order_by(Call.ended_at, Call.id)
                .limit(limit)
            )
            if since is not None:
                query = query.where(Call.ended_at >= since)
            return [(call_id, ended) for call_id, ended in session.execute(query) if ended is not None]

    def facts(self, call_ids: Sequence[str], settings: StatsSettings) -> dict[str, FinishedCall]:
        # Wrap-up times are not read: the checker asks whether a note exists at all (call_notes, below).
        records = StatsStore(self._sessions).records_of(call_ids)
        by_call = {v.call_id: v for v in visits(records, settings)}
        found: dict[str, FinishedCall] = {}
        with self._transaction("reading the facts of calls for quality control") as session:
            for call_id in call_ids:
                found[call_id] = self._one(session, call_id, by_call.get(call_id))
        return found

    @staticmethod
    def _one(session: Session, call_id: str, v: QueueVisit | None) -> FinishedCall:
        category = session.scalar(select(Call.route_category).where(Call.id == call_id))
        roles: frozenset[str] = frozenset()
        if v is not None and v.agent_id is not None:
            account = session.get(Account, v.agent_id)
            if account is not None:
                roles = frozenset(r for r in account.roles.split(",") if r)
        consent_edges = list(
            session.scalars(select(CallStep.edge).where(CallStep.call_id == call_id, CallStep.node_type == "consent"))
        )
        consent_records = len(
            session.scalars(
                select(SignedCallRecord.id).where(
                    SignedCallRecord.call_id == call_id, SignedCallRecord.kind == "consent"
                )
            ).all()
        )
        has_note = session.get(CallNote, call_id) is not None
        return FinishedCall(
            call_id,
            category,
            v,
            roles,
            consent_asked=bool(consent_edges),
            consent_refused="refused" in consent_edges,
            consent_records=consent_records,
            has_note=has_note,
        )

    def store(self, check: StoredCheck, at: datetime) -> bool:
        """Keep one check; False (nothing written) if the call was checked already (by another run)."""
        with self._transaction(f"storing the quality check of call {check.call_id}") as session:
            if session.get(QualityCheck, check.call_id) is not None:
                return False
            worst = min((f.severity for f in check.flags), key=_SEVERITY_ORDER.__getitem__, default=None)
            session.add(
                QualityCheck(
                    call_id=check.call_id,
                    checked_at=at,
                    ended_at=check.ended_at,
                    flags=json.dumps([{"rule": f.rule, "severity": f.severity, "why": f.why} for f in check.flags]),
                    worst=worst,
                    sampled=check.sampled,
                    for_review=check.for_review,
                )
            )
            return True

    def check_of(self, call_id: str) -> StoredCheck | None:
        with self._transaction(f"reading the quality check of call {call_id}") as session:
            row = session.get(QualityCheck, call_id)
            if row is None:
                return None
            return StoredCheck(row.call_id, row.ended_at, _flags(row.flags), row.sampled, row.for_review)

    def queue(self) -> list[QueueEntry]:
        """Calls for review without a review yet: the worst flags first, then the oldest."""
        with self._transaction("reading the review queue") as session:
            rows = session.execute(
                select(QualityCheck, Call.route_category)
                .join(Call, Call.id == QualityCheck.call_id)
                .where(QualityCheck.for_review, ~exists().where(QualityReview.call_id == QualityCheck.call_id))
            ).all()
            entries = [QueueEntry(c.call_id, c.ended_at, category, _flags(c.flags), c.sampled) for c, category in rows]
        return sorted(
            entries,
            key=lambda e: (min((_SEVERITY_ORDER[f.severity] for f in e.flags), default=9), e.ended_at, e.call_id),
        )

    def reviewed(self, call_id: str) -> str | None:
        """The id of the amendment that sealed the call's review, if reviewed."""
        with self._transaction(f"reading the review of call {call_id}") as session:
            row = session.get(QualityReview, call_id)
            return None if row is None else row.record_id

    def add_review(self, call_id: str, reviewer: str, at: datetime, record_id: str) -> None:
        with self._transaction(f"storing the review of call {call_id}") as session:
            session.add(QualityReview(call_id=call_id, reviewer=reviewer, reviewed_at=at, record_id=record_id))
