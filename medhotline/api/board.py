"""What the API and the wallboard show, read from the database: waiting calls, agents by state, today's figures.

Every figure comes from the statistics core (:mod:`routing.statistics`, docs/statistics.md) over the stored
records, so the wallboard, ``medhotline stats`` and the API agree and survive restarts. A call is shown by its
internal id, category, queue and wait only: never a number, a name or a channel name (which may carry the
caller's number). The readers are synchronous (SQLAlchemy); the app runs them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import Engine, select

from ground.clock import HOSPITAL_TZ
from ground.config import Config
from ground.models import Call
from ground.workdays import WorkingCalendar
from recordings.records import CallRecordStore
from routing.statistics import EMERGENCY, NoteFacts, QueueVisit, StatsReport, StatsSettings, compute, visits
from routing.statistics_store import StatsStore
from routing.tables import AgentRing, AgentRow
from scheduler.complaints import ComplaintRules, ComplaintStore

__all__ = ["AGENT_STATES", "Board", "settings_of"]

# The states an agent is shown in, as far as the database tells them (docs/api.md, "Agents").
AGENT_STATES: Final = ("ready", "ringing", "talking", "wrap_up", "paused", "offline")
# A call still waiting since before midnight stays on the wallboard: the records are read from this far back.
_LOOKBACK: Final = timedelta(hours=12)
# The columns of ``calls`` the API shows; never channel_name, channel_id or error (they may carry a number).
_CALL_FIELDS: Final = ("flow", "outcome", "route_category", "route_priority", "triage_level")
_CALL_TIMES: Final = ("started_at", "answered_at", "ended_at", "upgraded_at")


def settings_of(config: Config) -> StatsSettings:
    s = config.statistics
    return StatsSettings(s.service_level_seconds, s.emergency_target_seconds, s.short_abandon_seconds,
                         s.wrap_up_max_seconds)  # fmt: skip


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(HOSPITAL_TZ).isoformat()


def _visit_json(visit: QueueVisit, now: datetime) -> dict[str, object]:
    wait = visit.wait if visit.wait is not None else max(0.0, (now - visit.queued_at).total_seconds())
    return {
        "call_id": visit.call_id,
        "queue": visit.queue,
        "category": visit.category,
        "emergency": visit.emergency,
        "queued_at": _iso(visit.queued_at),
        "end": visit.end,
        "wait_seconds": round(wait, 1),
        "agent_id": visit.agent_id,
    }


class Board:
    """Reads for one request or one wallboard tick; holds only the engine and the settings."""

    def __init__(self, engine: Engine, settings: StatsSettings, complaints: ComplaintRules | None = None) -> None:
        self._engine = engine
        self._settings = settings
        # Without configured rules: Monday-Friday, no holidays, the 1/5/1 working days of the 12320 workflow.
        self._complaint_rules = complaints or ComplaintRules(WorkingCalendar(HOSPITAL_TZ))
        self._complaints = ComplaintStore.for_engine(engine)
        self._stats = StatsStore.for_engine(engine)
        self._notes = CallRecordStore.for_engine(engine)

    def _note_times(self, ids: Sequence[str]) -> list[NoteFacts]:
        return [NoteFacts(*row) for row in self._notes.note_times(ids)]

    def _today(self, now: datetime) -> tuple[datetime, datetime]:
        local = now.astimezone(HOSPITAL_TZ)
        start = datetime(local.year, local.month, local.day, tzinfo=HOSPITAL_TZ)
        return start, start + timedelta(days=1)

    def report(self, now: datetime) -> tuple[StatsReport, list[QueueVisit]]:
        """Today's figures by queue, and every visit read (today's and those still waiting from before)."""
        start, end = self._today(now)
        records = self._stats.records(min(start, now - _LOOKBACK), end, self._note_times)
        report = compute(records, start, end, by="queue", settings=self._settings, zone=HOSPITAL_TZ)
        return report, visits(records, self._settings)

    @staticmethod
    def waiting(found: Sequence[QueueVisit], now: datetime) -> list[dict[str, object]]:
        """Per queue, its waiting calls: emergency queue first, then by name; in each, the longest wait first."""
        queues: dict[str, list[QueueVisit]] = {}
        for visit in found:
            if visit.end == "waiting":
                queues.setdefault(visit.queue, []).append(visit)
        order = sorted(queues, key=lambda q: (q != EMERGENCY, q))
        result = []
        for name in order:
            calls = sorted(queues[name], key=lambda v: (not v.emergency, v.queued_at))
            shown = [_visit_json(v, now) for v in calls]
            longest = max((now - v.queued_at).total_seconds() for v in calls)
            result.append({"queue": name, "emergency": name == EMERGENCY, "waiting": len(shown),
                           "longest_wait_seconds": round(max(0.0, longest), 1),
                           "calls": shown})  # fmt: skip
        return result

    def agents(self, now: datetime) -> list[dict[str, object]]:
        """Every agent with a state: talking (answered, call not ended), ringing (a ring not ended), offline (the
        phone is not registered or could not be reached, as the service recorded it; with the reason), wrap-up
        (still reserved after the call ended), paused (with reason), else ready. Talking and ringing come first:
        a phone that rings or talks is there, whatever was recorded a moment before."""
        with self._engine.connect() as connection:
            agents = list(connection.execute(select(AgentRow.account_id, AgentRow.paused_reason,
                                                    AgentRow.reserved_call_id, AgentRow.offline_reason,
                                                    AgentRow.offline_since)))  # fmt: skip
            open_rings = {r.account_id: r.call_id for r in connection.execute(
                select(AgentRing.account_id, AgentRing.call_id).where(AgentRing.ended_at.is_(None)))}  # fmt: skip
            talking = {r.account_id: r.call_id for r in connection.execute(
                select(AgentRing.account_id, AgentRing.call_id)
                .join(Call, Call.id == AgentRing.call_id)
                .where(AgentRing.outcome == "answered", Call.ended_at.is_(None),
                       AgentRing.rung_at >= now - timedelta(days=1)))}  # fmt: skip
        result = []
        for account_id, paused_reason, reserved, offline_reason, offline_since in sorted(agents):
            if account_id in talking:
                state, call = "talking", talking[account_id]
            elif account_id in open_rings:
                state, call = "ringing", open_rings[account_id]
            elif offline_reason is not None:
                state, call = "offline", None
            elif reserved is not None:
                state, call = "wrap_up", reserved
            elif paused_reason is not None:
                state, call = "paused", None
            else:
                state, call = "ready", None
            offline = state == "offline"
            result.append({"agent_id": account_id, "state": state, "call_id": call,
                           "paused_reason": paused_reason if state == "paused" else None,
                           "offline_reason": offline_reason if offline else None,
                           "offline_since": _iso(offline_since) if offline else None})  # fmt: skip
        return result

    def overdue_complaints(self, now: datetime) -> dict[str, object]:
        """How many 12320 complaint steps are past their working-day deadline, and the oldest of them: its id,
        step, deadline, category and department (docs/complaints.md); never its summary or the patient."""
        overdue = self._complaints.overdue(self._complaint_rules, now)
        oldest = None
        if overdue:
            o = overdue[0]
            oldest = {"complaint_id": o.complaint_id, "stage": o.stage, "due": _iso(o.due), "category": o.category,
                      "department": o.department,
                      "overdue_hours": round((now - o.due).total_seconds() / 3600, 1)}  # fmt: skip
        return {"overdue": len(overdue), "tasks": len({o.complaint_id for o in overdue}), "oldest": oldest}

    def snapshot(self, now: datetime) -> dict[str, object]:
        """Everything the wallboard shows, as JSON values."""
        report, found = self.report(now)
        total = report.total
        return {
            "at": _iso(now),
            "queues": self.waiting(found, now),
            "agents": self.agents(now),
            "complaints": self.overdue_complaints(now),
            "today": {
                "received": total.received,
                "answered": total.answered,
                "service_level": total.service_level,
                "abandon_rate": total.abandon_rate,
                "asa_seconds": total.asa_seconds,
                "longest_wait_seconds": total.longest_wait_seconds,
                "emergencies": total.emergencies,
                "emergencies_answered": total.emergencies_answered,
                "emergencies_within_target": total.emergencies_within_target,
                "service_level_seconds": self._settings.service_level_seconds,
                "emergency_target_seconds": self._settings.emergency_target_seconds,
            },
        }

    def statistics(self, now: datetime) -> dict[str, object]:
        return self.report(now)[0].as_json()

    def recent_calls(self, now: datetime, limit: int) -> list[dict[str, object]]:
        """Today's calls that reached the queue, newest first, with how their wait ended."""
        found = sorted(self.report(now)[1], key=lambda v: v.queued_at, reverse=True)
        return [_visit_json(v, now) for v in found[:limit]]

    def call(self, call_id: str, now: datetime) -> dict[str, object] | None:
        """One call: its row's non-identifying columns and its queue visit (if it had one)."""
        with self._engine.connect() as connection:
            columns = [getattr(Call, k) for k in (*_CALL_FIELDS, *_CALL_TIMES)]
            row = connection.execute(select(*columns).where(Call.id == call_id)).mappings().first()
        if row is None:
            return None
        result: dict[str, object] = {"call_id": call_id, **{k: row[k] for k in _CALL_FIELDS}}
        for key in _CALL_TIMES:
            result[key] = _iso(row[key])
        started = row["started_at"]
        records = self._stats.records(started - timedelta(seconds=1), now + timedelta(seconds=1), self._note_times)
        visit = next((v for v in visits(records, self._settings) if v.call_id == call_id), None)
        result["queue"] = None if visit is None else _visit_json(visit, now)
        return result
