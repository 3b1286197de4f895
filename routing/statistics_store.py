"""Reads the records :func:`routing.statistics.compute` works on, for one window, in one read-only transaction.

Which rows (docs/statistics.md, "Which records"): the calls with a queue step (``queued`` or ``overflow``) in the
window, and the calls of the agents' rings rung in it; of those calls, their row in ``calls``, their queue steps
and all their rings; every agent's id. The call notes' times belong to recordings (another feature): the caller
passes a :data:`NoteTimes` reader in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from ground.db import Repository
from ground.models import Call, CallStep
from routing.statistics import (
    OVERFLOW,
    QUEUED,
    STEP_NODES,
    CallFacts,
    NoteFacts,
    QueueStepFacts,
    RingFacts,
    StatsRecords,
)
from routing.tables import AgentRing, AgentRow

__all__ = ["NoteTimes", "StatsStore"]

# (call ids) → the notes written for them: call id, author, time (recordings.records.note_times).
NoteTimes = Callable[[Sequence[str]], Sequence[NoteFacts]]
# Ids per IN (…): far below SQLite's and PostgreSQL's limits on bound parameters.
_CHUNK: Final = 500


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class StatsStore(Repository):
    """The statistics' reads of ``calls``, ``call_steps``, ``agent_rings`` and ``agents``; writes nothing."""

    def records(self, start: datetime, end: datetime, notes: NoteTimes | None = None) -> StatsRecords:
        """The records of the calls queued or rung in ``[start, end)`` (see the module's docstring)."""
        with self._transaction("reading the records for statistics") as session:
            queued = session.scalars(
                select(CallStep.call_id).where(
                    CallStep.node.in_((QUEUED, OVERFLOW)), CallStep.flow == "queue", CallStep.at >= start,
                    CallStep.at < end,
                )
            )  # fmt: skip
            rung = session.scalars(select(AgentRing.call_id).where(AgentRing.rung_at >= start, AgentRing.rung_at < end))
            ids = sorted(set(queued) | set(rung))
            calls: dict[str, CallFacts] = {}
            steps: list[QueueStepFacts] = []
            rings: list[RingFacts] = []
            for chunk in _chunks(ids):
                self._read(session, chunk, calls, steps, rings)
            agents = list(session.scalars(select(AgentRow.account_id).order_by(AgentRow.account_id)))
        written = list(notes(ids)) if notes is not None and ids else []
        return StatsRecords(calls, steps, rings, written, agents)

    def records_of(self, call_ids: Sequence[str], notes: NoteTimes | None = None) -> StatsRecords:
        """The same records for the given calls (quality control reads finished calls by id, not by window)."""
        ids = sorted(set(call_ids))
        calls: dict[str, CallFacts] = {}
        steps: list[QueueStepFacts] = []
        rings: list[RingFacts] = []
        with self._transaction("reading the records of calls for quality control") as session:
            for chunk in _chunks(ids):
                self._read(session, chunk, calls, steps, rings)
        written = list(notes(ids)) if notes is not None and ids else []
        return StatsRecords(calls, steps, rings, written)

    @staticmethod
    def _read(
        session: Session,
        ids: Sequence[str],
        calls: dict[str, CallFacts],
        steps: list[QueueStepFacts],
        rings: list[RingFacts],
    ) -> None:
        for call in session.scalars(select(Call).where(Call.id.in_(ids))):
            calls[call.id] = CallFacts(
                call.id, call.ended_at, call.outcome, call.route_category, call.route_priority, call.upgraded_at
            )
        query = select(CallStep).where(
            CallStep.call_id.in_(ids), CallStep.flow == "queue", CallStep.node.in_(STEP_NODES)
        )
        steps.extend(
            QueueStepFacts(s.call_id, s.seq, s.node, s.edge, s.input, s.at) for s in session.scalars(query)
        )  # fmt: skip
        rings.extend(
            RingFacts(r.call_id, r.account_id, r.rung_at, r.ended_at, r.outcome)
            for r in session.scalars(select(AgentRing).where(AgentRing.call_id.in_(ids)))
        )
