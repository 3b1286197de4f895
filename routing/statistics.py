"""Queue and agent statistics, sans I/O: figures computed from the stored call and ring records alone.

Nothing here reads a clock, a database or a counter kept in memory: :func:`compute` is a pure function of the
records (:class:`StatsRecords`: rows of ``calls``, the queue's steps from ``call_steps``, ``agent_rings``, the
times of ``call_notes``), the window and the settings. So the figures are the same after a restart, on every node,
and an auditor can recompute each of them from the tables; docs/statistics.md defines every figure with its
formula and the columns it reads, and this module follows it line by line.

Patient identifiers never enter: the records carry call ids, agent ids, categories and times only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, tzinfo
from typing import Final, Literal, get_args

__all__ = [
    "GROUPINGS",
    "AgentFigures",
    "CallFacts",
    "EndKind",
    "Grouping",
    "NoteFacts",
    "QueueFigures",
    "QueueStepFacts",
    "QueueVisit",
    "RingFacts",
    "StatsError",
    "StatsRecords",
    "StatsReport",
    "StatsSettings",
    "compute",
    "visits",
]

Grouping = Literal["queue", "category", "agent", "hour"]
GROUPINGS: Final[tuple[Grouping, ...]] = get_args(Grouping)
# How a call's wait in the queue ended (docs/statistics.md, "How a wait ends").
EndKind = Literal["answered", "abandoned", "callback", "escalated", "unavailable", "turned_away", "failed", "waiting"]
END_KINDS: Final[tuple[EndKind, ...]] = get_args(EndKind)
EMERGENCY: Final = "emergency"
UNKNOWN_CATEGORY: Final = "unknown"
# The queue's milestones in ``call_steps`` (flow "queue"), as routing.ari_queue and the service write them.
QUEUED: Final = "queued"
OVERFLOW: Final = "overflow"
STEP_NODES: Final = frozenset({QUEUED, OVERFLOW, "reclassified", "answered", "callback", "escalated", "unavailable"})


class StatsError(ValueError):
    """The statistics were asked for something they can't mean (an empty or inverted window, a naive time)."""


# --- the records read -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the statistics read of one row of ``calls``."""

    call_id: str
    ended_at: datetime | None
    outcome: str
    route_category: str | None
    route_priority: str | None
    upgraded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueStepFacts:
    """One step of the queue's path (``call_steps`` with ``flow = 'queue'``)."""

    call_id: str
    seq: int
    node: str
    edge: str | None
    input: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class RingFacts:
    """One row of ``agent_rings``."""

    call_id: str
    account_id: str
    rung_at: datetime
    ended_at: datetime | None
    outcome: str | None


@dataclass(frozen=True, slots=True)
class NoteFacts:
    """When an agent wrote a call's note (``call_notes``: author and time only, never the text)."""

    call_id: str
    author: str
    written_at: datetime


@dataclass(frozen=True)
class StatsRecords:
    """Everything :func:`compute` reads. ``agents``: every agent's account id, so agents without calls show."""

    calls: Mapping[str, CallFacts]
    steps: Sequence[QueueStepFacts] = ()
    rings: Sequence[RingFacts] = ()
    notes: Sequence[NoteFacts] = ()
    agents: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class StatsSettings:
    """``[statistics]`` of the configuration (ground.config.StatisticsConfig), in seconds."""

    service_level_seconds: float = 20.0
    emergency_target_seconds: float = 10.0
    short_abandon_seconds: float = 5.0
    wrap_up_max_seconds: float = 1800.0


# --- one call's visit to the queue ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueVisit:
    """One call's time in the queue, derived from its records (docs/statistics.md, "One call")."""

    call_id: str
    queued_at: datetime
    category: str
    emergency: bool
    end: EndKind
    # Seconds from joining the queue to the end of the wait; None while it is still waiting.
    wait: float | None
    target: float
    agent_id: str | None = None
    answered_at: datetime | None = None
    # Seconds of conversation (answer to the call's end); None unless answered and ended.
    talk: float | None = None
    # Seconds from the call's end to the answering agent's note, where one was written in time; None otherwise.
    wrap_up: float | None = None
    upgraded: bool = False
    # Abandoned after waiting less than ``short_abandon_seconds``.
    short_abandon: bool = False

    @property
    def queue(self) -> str:
        """The queue it waited in: the emergency channel, or its category's queue."""
        return EMERGENCY if self.emergency else self.category


def _seconds(start: datetime, end: datetime) -> float:
    """Seconds from ``start`` to ``end``, never negative (two nodes' clocks may disagree by a little)."""
    return max(0.0, (end - start).total_seconds())


def _aware(at: datetime, what: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise StatsError(f"{what} {at.isoformat()} has no time zone")
    return at


def _answer(call_id: str, rings: Sequence[RingFacts], steps: Sequence[QueueStepFacts]) -> tuple[str, datetime] | None:
    """Who answered and when: the first ring of the call that ended ``answered`` (its end is the answer); the
    queue's ``answered`` step where no ring row says so (a ring write that failed)."""
    for ring in sorted(rings, key=lambda r: r.rung_at):
        if ring.outcome == "answered" and ring.ended_at is not None:
            return ring.account_id, ring.ended_at
    for step in steps:
        if step.node == "answered" and step.edge:
            return step.edge, step.at
    return None


def _step(steps: Sequence[QueueStepFacts], node: str, edges: Iterable[str] | None = None) -> QueueStepFacts | None:
    allowed = None if edges is None else frozenset(edges)
    return next((s for s in steps if s.node == node and (allowed is None or s.edge in allowed)), None)


def _visit(  # one branch per way a wait ends, in the order docs/statistics.md gives them
    call: CallFacts,
    steps: Sequence[QueueStepFacts],
    rings: Sequence[RingFacts],
    notes: Sequence[NoteFacts],
    settings: StatsSettings,
) -> QueueVisit | None:
    entry = _step(steps, QUEUED) or _step(steps, OVERFLOW)
    if entry is None:
        return None  # never offered to the queue: an IVR-only call, an outbound call, a callback's own call
    queued_at = _aware(entry.at, f"call {call.call_id}: queue step")
    category = entry.edge or call.route_category or UNKNOWN_CATEGORY
    if entry.input in ("emergency", "normal"):
        waited_as = entry.input  # recorded with the step since 0014_stats
    else:  # older records: the call's priority, unless an agent's upgrade rewrote it after the wait
        waited_as = "normal" if call.upgraded_at is not None else (call.route_priority or "normal")
    emergency = waited_as == EMERGENCY or _step(steps, "reclassified", (EMERGENCY,)) is not None
    target = settings.emergency_target_seconds if emergency else settings.service_level_seconds
    upgraded = call.upgraded_at is not None and not emergency

    def ended(end: EndKind, at: datetime | None) -> QueueVisit:
        wait = None if at is None else _seconds(queued_at, at)
        short = end == "abandoned" and wait is not None and wait < settings.short_abandon_seconds
        return QueueVisit(call.call_id, queued_at, category, emergency, end, wait, target, upgraded=upgraded,
                          short_abandon=short)  # fmt: skip

    if entry.node == OVERFLOW:
        return ended("turned_away", queued_at)
    answer = _answer(call.call_id, rings, steps)
    if answer is not None:
        agent_id, answered_at = answer
        talk = wrap_up = None
        if call.ended_at is not None:
            talk = _seconds(answered_at, call.ended_at)
            wrap_up = _wrap_up(agent_id, call.ended_at, notes, settings)
        return QueueVisit(
            call.call_id, queued_at, category, emergency, "answered", _seconds(queued_at, answered_at), target,
            agent_id, answered_at, talk, wrap_up, upgraded,
        )  # fmt: skip
    if (step := _step(steps, "callback", ("accepted", "duplicate"))) is not None:
        return ended("callback", step.at)
    if (step := _step(steps, "escalated")) is not None:
        return ended("escalated", step.at)
    if (step := _step(steps, "unavailable")) is not None:
        return ended("unavailable", step.at)
    if call.ended_at is None:
        return ended("waiting", None)
    if call.outcome == "caller_hangup":
        return ended("abandoned", call.ended_at)
    return ended("failed", call.ended_at)


def _wrap_up(agent_id: str, talk_end: datetime, notes: Sequence[NoteFacts], settings: StatsSettings) -> float | None:
    """Seconds from the end of the call to the answering agent's note, if it was written then (not before the call
    ended, not later than ``wrap_up_max_seconds``); None: no wrap-up recorded."""
    for note in notes:
        if note.author != agent_id or note.written_at < talk_end:
            continue
        seconds = (note.written_at - talk_end).total_seconds()
        if seconds <= settings.wrap_up_max_seconds:
            return seconds
    return None


def visits(records: StatsRecords, settings: StatsSettings) -> list[QueueVisit]:
    """Every call of ``records`` that was offered to the queue, as a :class:`QueueVisit`, in queue order."""
    steps: dict[str, list[QueueStepFacts]] = defaultdict(list)
    for step in sorted(records.steps, key=lambda s: (s.call_id, s.seq)):
        steps[step.call_id].append(step)
    rings: dict[str, list[RingFacts]] = defaultdict(list)
    for ring in records.rings:
        rings[ring.call_id].append(ring)
    notes: dict[str, list[NoteFacts]] = defaultdict(list)
    for note in records.notes:
        notes[note.call_id].append(note)
    found = []
    for call_id, call in records.calls.items():
        visit = _visit(call, steps.get(call_id, []), rings.get(call_id, []), notes.get(call_id, []), settings)
        if visit is not None:
            found.append(visit)
    return sorted(found, key=lambda v: (v.queued_at, v.call_id))


# --- figures ----------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """The figures of one group of calls (a queue, a category, an hour, or all of them). docs/statistics.md."""

    group: str
    received: int
    answered: int
    answered_within_target: int
    abandoned: int
    short_abandoned: int
    abandoned_after_short: int
    callback: int
    escalated: int
    unavailable: int
    turned_away: int
    failed: int
    waiting: int
    talking: int
    service_level: float | None
    abandon_rate: float | None
    asa_seconds: float | None
    avg_talk_seconds: float | None
    aht_seconds: float | None
    wrap_ups_recorded: int
    longest_wait_seconds: float | None
    emergencies: int
    emergencies_answered: int
    emergencies_within_target: int
    upgraded_to_emergency: int

    @classmethod
    def of(cls, group: str, calls: Sequence[QueueVisit]) -> QueueFigures:
        count: dict[str, int] = defaultdict(int)
        for visit in calls:
            count[visit.end] += 1
        answered = [v for v in calls if v.end == "answered"]
        within = [v for v in answered if v.wait is not None and v.wait <= v.target]
        short = sum(1 for v in calls if v.short_abandon)
        # The denominator of both rates: every call whose wait has ended, except the short abandons.
        judged = len(calls) - count["waiting"] - short
        talked = [v for v in answered if v.talk is not None]
        wraps = [v.wrap_up for v in talked if v.wrap_up is not None]
        waits = [v.wait for v in calls if v.wait is not None]
        emergencies = [v for v in calls if v.emergency]
        return cls(
            group=group,
            received=len(calls),
            answered=len(answered),
            answered_within_target=len(within),
            abandoned=count["abandoned"],
            short_abandoned=short,
            abandoned_after_short=count["abandoned"] - short,
            callback=count["callback"],
            escalated=count["escalated"],
            unavailable=count["unavailable"],
            turned_away=count["turned_away"],
            failed=count["failed"],
            waiting=count["waiting"],
            talking=len(answered) - len(talked),
            service_level=_ratio(len(within), judged),
            abandon_rate=_ratio(count["abandoned"] - short, judged),
            asa_seconds=_mean([v.wait for v in answered if v.wait is not None]),
            avg_talk_seconds=_mean([v.talk for v in talked if v.talk is not None]),
            aht_seconds=(
                (sum(v.talk for v in talked if v.talk is not None) + sum(wraps)) / len(talked) if talked else None
            ),
            wrap_ups_recorded=len(wraps),
            longest_wait_seconds=max(waits) if waits else None,
            emergencies=len(emergencies),
            emergencies_answered=sum(1 for v in emergencies if v.end == "answered"),
            emergencies_within_target=sum(1 for v in within if v.emergency),
            upgraded_to_emergency=sum(1 for v in calls if v.upgraded),
        )


@dataclass(frozen=True, slots=True)
class AgentFigures:
    """One agent's rings in the window and the calls they answered (docs/statistics.md, "Per agent")."""

    agent_id: str
    rings: int
    handled: int
    missed: int
    unreachable: int
    ringing: int
    talking: int
    talk_seconds: float
    wrap_up_seconds: float
    wrap_ups_recorded: int
    aht_seconds: float | None


def _agent_figures(
    agent_id: str,
    rings: Sequence[RingFacts],
    calls: Mapping[str, CallFacts],
    notes: Mapping[str, Sequence[NoteFacts]],
    settings: StatsSettings,
) -> AgentFigures:
    handled = [r for r in rings if r.outcome == "answered" and r.ended_at is not None]
    talk = wrap = 0.0
    ended = wraps = 0
    for ring in handled:
        assert ring.ended_at is not None
        call = calls.get(ring.call_id)
        if call is None or call.ended_at is None:
            continue  # still talking (or the call's row is missing): no talk time yet
        ended += 1
        talk += _seconds(ring.ended_at, call.ended_at)
        seconds = _wrap_up(agent_id, call.ended_at, notes.get(ring.call_id, ()), settings)
        if seconds is not None:
            wraps += 1
            wrap += seconds
    return AgentFigures(
        agent_id=agent_id,
        rings=len(rings),
        handled=len(handled),
        missed=sum(1 for r in rings if r.outcome == "no_answer"),
        unreachable=sum(1 for r in rings if r.outcome == "failed"),
        ringing=sum(1 for r in rings if r.outcome is None),
        talking=len(handled) - ended,
        talk_seconds=talk,
        wrap_up_seconds=wrap,
        wrap_ups_recorded=wraps,
        aht_seconds=(talk + wrap) / ended if ended else None,
    )


@dataclass(frozen=True)
class StatsReport:
    """The figures for one window: per group (``by``), across all queues (``total``), per agent, and each call's
    wait (for the chart: time, seconds, emergency, how it ended; never who called)."""

    start: datetime
    end: datetime
    by: Grouping
    settings: StatsSettings
    groups: tuple[QueueFigures, ...]
    total: QueueFigures
    agents: tuple[AgentFigures, ...]
    waits: tuple[tuple[datetime, float, bool, EndKind], ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        """Plain JSON values: times as ISO 8601 with their offset, seconds as numbers, rates as fractions."""
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "by": self.by,
            "settings": asdict(self.settings),
            "groups": [asdict(g) for g in self.groups],
            "total": asdict(self.total),
            "agents": [asdict(a) for a in self.agents],
        }


def _group_key(by: Grouping, zone: tzinfo) -> Callable[[QueueVisit], str]:
    if by == "queue":
        return lambda v: v.queue
    if by == "hour":
        return lambda v: v.queued_at.astimezone(zone).strftime("%Y-%m-%d %H:00")
    return lambda v: v.category  # "category", and "agent" (whose own rows are the agents')


def compute(
    records: StatsRecords,
    start: datetime,
    end: datetime,
    *,
    by: Grouping = "queue",
    settings: StatsSettings | None = None,
    zone: tzinfo,
) -> StatsReport:
    """The figures of the calls that joined the queue in ``[start, end)`` and of the rings rung in it.

    ``zone`` is the hospital's (ground.clock.HOSPITAL_TZ): hours are its local hours. Records outside the window
    may be passed (a call queued before ``start`` whose ring falls in it); each figure takes only its own.
    """
    settings = settings or StatsSettings()
    if by not in GROUPINGS:
        raise StatsError(f"statistics by {by!r}: choose one of {', '.join(GROUPINGS)}")
    _aware(start, "window start")
    _aware(end, "window end")
    if end <= start:
        raise StatsError(f"the window ends ({end.isoformat()}) before or when it starts ({start.isoformat()})")
    inside = [v for v in visits(records, settings) if start <= v.queued_at < end]
    key = _group_key(by, zone)
    grouped: dict[str, list[QueueVisit]] = defaultdict(list)
    for visit in inside:
        grouped[key(visit)].append(visit)
    notes: dict[str, list[NoteFacts]] = defaultdict(list)
    for note in records.notes:
        notes[note.call_id].append(note)
    rings: dict[str, list[RingFacts]] = {agent: [] for agent in records.agents}
    for ring in records.rings:
        if start <= _aware(ring.rung_at, f"ring of call {ring.call_id}") < end:
            rings.setdefault(ring.account_id, []).append(ring)
    return StatsReport(
        start=start,
        end=end,
        by=by,
        settings=settings,
        groups=tuple(QueueFigures.of(name, grouped[name]) for name in sorted(grouped)),
        total=QueueFigures.of("all", inside),
        agents=tuple(_agent_figures(a, rings[a], records.calls, notes, settings) for a in sorted(rings)),
        waits=tuple((v.queued_at, v.wait, v.emergency, v.end) for v in inside if v.wait is not None),
    )
