"""A hand-computed day of the hotline for the statistics (docs/statistics.md, "Worked example").

2026-03-02 in the hospital's zone (UTC+8). Each call says what happened; EXPECTED holds the figures computed by
hand from these lines, not by the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ground.clock import HOSPITAL_TZ
from routing.statistics import CallFacts, NoteFacts, QueueStepFacts, RingFacts, StatsRecords

START = datetime(2026, 3, 2, tzinfo=HOSPITAL_TZ)
END = START + timedelta(days=1)
AGENTS = ("nurse1", "nurse2", "physician1")  # physician1 takes no call


def t(hh: int, mm: int, ss: int = 0, *, day: int = 2) -> datetime:
    return datetime(2026, 3, day, hh, mm, ss, tzinfo=HOSPITAL_TZ)


@dataclass
class Script:
    """One call: its row, its queue steps (node, edge, input, at), its rings (agent, rung, ended, outcome)."""

    call_id: str
    category: str
    priority: str
    steps: list[tuple[str, str | None, str | None, datetime]]
    rings: list[tuple[str, datetime, datetime | None, str | None]] = field(default_factory=list)
    ended_at: datetime | None = None
    outcome: str = "in_progress"
    upgraded: tuple[str, datetime] | None = None
    note: tuple[str, datetime] | None = None


def _id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


SCRIPTS = [
    # A: answered after 12 s by nurse1, talk 300 s, note 60 s after the end.
    Script(_id(1), "general", "normal", [("queued", "general", "normal", t(9, 0))],
           [("nurse1", t(9, 0, 1), t(9, 0, 12), "answered")], t(9, 5, 12), "routed", note=("nurse1", t(9, 6, 12))),
    # B: nurse1 lets it ring out, nurse2 answers after 40 s (late), talk 120 s, no note.
    Script(_id(2), "general", "normal", [("queued", "general", "normal", t(9, 10))],
           [("nurse1", t(9, 10, 1), t(9, 10, 16), "no_answer"), ("nurse2", t(9, 10, 17), t(9, 10, 40), "answered")],
           t(9, 12, 40), "routed"),
    # C: hangs up after 3 s: a short abandon.
    Script(_id(3), "general", "normal", [("queued", "general", "normal", t(10, 0))], [], t(10, 0, 3),
           "caller_hangup"),
    # D: hangs up after 60 s.
    Script(_id(4), "medication", "normal", [("queued", "medication", "normal", t(10, 30))], [], t(10, 31),
           "caller_hangup"),
    # E: an emergency answered after 8 s (target 10), talk 600 s, note 30 s after.
    Script(_id(5), "emergency", "emergency", [("queued", "emergency", "emergency", t(11, 0))],
           [("nurse2", t(11, 0, 1), t(11, 0, 8), "answered")], t(11, 10, 8), "routed", note=("nurse2", t(11, 10, 38))),
    # F: pressed the emergency key while waiting; answered after 15 s: within 20 s, not within the 10 s target.
    Script(_id(6), "general", "normal",
           [("queued", "general", "normal", t(11, 20)), ("reclassified", "emergency", "0", t(11, 20, 5))],
           [("nurse1", t(11, 20, 6), t(11, 20, 15), "answered")], t(11, 25, 15), "routed"),
    # G: answered after 5 s, then upgraded to emergency by nurse2: a normal wait, counted as upgraded.
    Script(_id(7), "general", "normal", [("queued", "general", "normal", t(12, 0))],
           [("nurse2", t(12, 0, 1), t(12, 0, 5), "answered")], t(12, 4, 5), "routed", upgraded=("nurse2", t(12, 1))),
    # H: queued at 23:59:50, answered at 00:00:10 next day (exactly 20 s: within), talk 120 s.
    Script(_id(8), "general", "normal", [("queued", "general", "normal", t(23, 59, 50))],
           [("nurse1", t(23, 59, 51), t(0, 0, 10, day=3), "answered")], t(0, 2, 10, day=3), "routed"),
    # I: still waiting.
    Script(_id(9), "general", "normal", [("queued", "general", "normal", t(13, 0))]),
    # J: answered after 4 s, still talking.
    Script(_id(10), "vaccination", "normal", [("queued", "vaccination", "normal", t(14, 0))],
           [("nurse2", t(14, 0, 1), t(14, 0, 4), "answered")]),
    # K: queued the day before (outside the window), rung and answered in it: nurse1's, not the queue's.
    Script(_id(11), "general", "normal", [("queued", "general", "normal", t(23, 59, 40, day=1))],
           [("nurse1", t(0, 0, 5), t(0, 0, 15), "answered")], t(0, 1, 15), "routed"),
    # L: escalated after 600 s, transferred.
    Script(_id(12), "triage", "normal", [("queued", "triage", "normal", t(15, 0)), ("escalated", "transfer", None,
           t(15, 10))], [], t(15, 10, 30), "transferred"),
    # M: chose a callback after 120 s.
    Script(_id(13), "general", "normal", [("queued", "general", "normal", t(16, 0)),
           ("callback_offered", None, None, t(16, 1)), ("callback", "accepted", "1", t(16, 2))], [], t(16, 2, 10),
           "routed"),
    # N: turned away by a full queue in surge mode.
    Script(_id(14), "general", "normal", [("overflow", "general", None, t(17, 0))], [], t(17, 0, 20), "routed"),
    # O: ended in the IVR, never queued: not in any figure.
    Script(_id(15), "general", "normal", [], [], t(18, 0, 30), "completed"),
]  # fmt: skip


def records() -> StatsRecords:
    calls = {}
    steps = []
    rings = []
    notes = []
    for s in SCRIPTS:
        upgraded_at = s.upgraded[1] if s.upgraded else None
        priority = "emergency" if s.upgraded else s.priority
        calls[s.call_id] = CallFacts(s.call_id, s.ended_at, s.outcome, s.category, priority, upgraded_at)
        steps += [QueueStepFacts(s.call_id, i + 1, n, e, v, at) for i, (n, e, v, at) in enumerate(s.steps)]
        rings += [RingFacts(s.call_id, a, r, e, o) for a, r, e, o in s.rings]
        if s.note:
            notes.append(NoteFacts(s.call_id, s.note[0], s.note[1]))
    return StatsRecords(calls, steps, rings, notes, AGENTS)


# The figures of the whole window (all queues), by hand. Waits: A 12, B 40, C 3, D 60, E 8, F 15, G 5, H 20, J 4,
# L 600, M 120, N 0; I still waits. Within target: A, E, G, H, J (B late; F an emergency after 15 s > 10).
# Judged = 13 received - 1 waiting - 1 short abandon = 11.
EXPECTED_TOTAL: dict[str, float] = {
    "received": 13,
    "answered": 7,
    "answered_within_target": 5,
    "abandoned": 2,
    "short_abandoned": 1,
    "abandoned_after_short": 1,
    "callback": 1,
    "escalated": 1,
    "unavailable": 0,
    "turned_away": 1,
    "failed": 0,
    "waiting": 1,
    "talking": 1,
    "service_level": 5 / 11,
    "abandon_rate": 1 / 11,
    "asa_seconds": (12 + 40 + 8 + 15 + 5 + 20 + 4) / 7,
    "avg_talk_seconds": (300 + 120 + 600 + 300 + 240 + 120) / 6,
    "aht_seconds": (300 + 120 + 600 + 300 + 240 + 120 + 60 + 30) / 6,
    "wrap_ups_recorded": 2,
    "longest_wait_seconds": 600.0,
    "emergencies": 2,
    "emergencies_answered": 2,
    "emergencies_within_target": 1,
    "upgraded_to_emergency": 1,
}
# Rings rung in the window: nurse1 A, B (rang out), F, H, K; nurse2 B, E, G, J (still talking).
EXPECTED_AGENTS: dict[str, dict[str, float | None]] = {
    "nurse1": {"rings": 5, "handled": 4, "missed": 1, "talking": 0, "talk_seconds": 300 + 300 + 120 + 60,
               "wrap_up_seconds": 60, "wrap_ups_recorded": 1, "aht_seconds": (780 + 60) / 4},
    "nurse2": {"rings": 4, "handled": 4, "missed": 0, "talking": 1, "talk_seconds": 120 + 600 + 240,
               "wrap_up_seconds": 30, "wrap_ups_recorded": 1, "aht_seconds": (960 + 30) / 3},
    "physician1": {"rings": 0, "handled": 0, "missed": 0, "talking": 0, "talk_seconds": 0, "wrap_up_seconds": 0,
                   "wrap_ups_recorded": 0, "aht_seconds": None},
}  # fmt: skip
# Per queue: the emergency channel holds E and F; every other call is in its category's queue.
EXPECTED_QUEUES = {"emergency": 2, "general": 8, "medication": 1, "triage": 1, "vaccination": 1}
