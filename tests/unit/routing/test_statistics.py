"""The statistics core against a hand-computed day (tests/unit/routing/stats_fixture.py) and its edge cases."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import timedelta
from xml.etree import ElementTree

import pytest

from ground.clock import HOSPITAL_TZ
from routing.statistics import (
    CallFacts,
    Grouping,
    QueueStepFacts,
    StatsError,
    StatsRecords,
    StatsReport,
    StatsSettings,
    compute,
    visits,
)
from routing.statistics_chart import waits_svg
from tests.unit.routing import stats_fixture as fx


def _report(
    by: Grouping = "queue", records: StatsRecords | None = None, settings: StatsSettings | None = None
) -> StatsReport:
    return compute(records or fx.records(), fx.START, fx.END, by=by, settings=settings, zone=HOSPITAL_TZ)


def test_the_day_matches_the_hand_computed_figures() -> None:
    report = _report()
    total = asdict(report.total)
    for name, expected in fx.EXPECTED_TOTAL.items():
        assert total[name] == pytest.approx(expected), name
    assert {g.group: g.received for g in report.groups} == fx.EXPECTED_QUEUES


def test_per_agent_including_an_agent_without_calls() -> None:
    agents = {a.agent_id: asdict(a) for a in _report("agent").agents}
    assert set(agents) == set(fx.EXPECTED_AGENTS)
    for agent, expected in fx.EXPECTED_AGENTS.items():
        for name, value in expected.items():
            assert agents[agent][name] == pytest.approx(value), (agent, name)


def test_emergency_queue_holds_emergencies_to_their_own_target() -> None:
    emergency = next(g for g in _report().groups if g.group == "emergency")
    # E after 8 s is within 10 s; F (reclassified while waiting) after 15 s is not, though within 20 s.
    assert (emergency.received, emergency.answered_within_target, emergency.service_level) == (2, 1, 0.5)


def test_an_upgrade_after_the_answer_does_not_make_the_wait_an_emergency() -> None:
    by_id = {v.call_id: v for v in visits(fx.records(), StatsSettings())}
    upgraded = by_id[fx._id(7)]
    assert (upgraded.emergency, upgraded.upgraded, upgraded.target) == (False, True, 20.0)
    # Older records have no priority in the queued step: the upgrade rewrote route_priority, still a normal wait.
    records = fx.records()
    old_steps = [replace(s, input=None) if s.call_id == fx._id(7) else s for s in records.steps]
    old = {v.call_id: v for v in visits(replace(records, steps=old_steps), StatsSettings())}
    assert old[fx._id(7)].emergency is False


def test_a_call_spanning_midnight_belongs_to_the_hour_it_joined_the_queue() -> None:
    hours = {g.group: g for g in _report("hour").groups}
    late = hours["2026-03-02 23:00"]
    assert (late.received, late.answered, late.answered_within_target) == (1, 1, 1)
    # The next day's window does not count it again, but its agent's ring is the day it rang.
    next_day = compute(fx.records(), fx.END, fx.END + timedelta(days=1), zone=HOSPITAL_TZ)
    assert next_day.total.received == 0


def test_short_abandon_threshold_moves_calls_between_short_and_counted() -> None:
    strict = _report(settings=StatsSettings(short_abandon_seconds=0)).total
    assert (strict.abandoned, strict.short_abandoned, strict.abandoned_after_short) == (2, 0, 2)
    assert strict.abandon_rate == pytest.approx(2 / 12)
    lenient = _report(settings=StatsSettings(short_abandon_seconds=61)).total
    assert (lenient.short_abandoned, lenient.abandoned_after_short) == (2, 0)
    assert lenient.service_level == pytest.approx(5 / 10)
    # Exactly at the threshold is not short: "less than N seconds".
    at = _report(settings=StatsSettings(short_abandon_seconds=3)).total
    assert at.short_abandoned == 0


def test_in_progress_calls_count_as_received_but_not_in_rates() -> None:
    report = _report()
    assert (report.total.waiting, report.total.talking) == (1, 1)
    only_waiting = StatsRecords(
        {"w": CallFacts("w", None, "in_progress", "general", "normal")},
        [QueueStepFacts("w", 1, "queued", "general", "normal", fx.t(8, 0))],
    )
    figures = _report(records=only_waiting).total
    assert (figures.received, figures.waiting) == (1, 1)
    assert (figures.service_level, figures.longest_wait_seconds) == (None, None)


def test_an_empty_window_has_no_rates_rather_than_zero() -> None:
    figures = _report(records=StatsRecords({}, agents=("nurse1",)))
    assert figures.total.received == 0
    assert figures.total.service_level is None
    assert figures.total.asa_seconds is None
    assert [a.agent_id for a in figures.agents] == ["nurse1"]


def test_bad_windows_and_groupings_are_refused() -> None:
    with pytest.raises(StatsError, match="before or when it starts"):
        compute(fx.records(), fx.END, fx.START, zone=HOSPITAL_TZ)
    with pytest.raises(StatsError, match="no time zone"):
        compute(fx.records(), fx.START.replace(tzinfo=None), fx.END, zone=HOSPITAL_TZ)
    with pytest.raises(StatsError, match="choose one of"):
        compute(fx.records(), fx.START, fx.END, by="patient", zone=HOSPITAL_TZ)  # type: ignore[arg-type]


def test_a_ring_write_that_failed_falls_back_to_the_answered_step() -> None:
    records = StatsRecords(
        {"x": CallFacts("x", fx.t(8, 5), "routed", "general", "normal")},
        [
            QueueStepFacts("x", 1, "queued", "general", "normal", fx.t(8, 0)),
            QueueStepFacts("x", 2, "answered", "nurse1", None, fx.t(8, 0, 30)),
        ],
    )
    (visit,) = visits(records, StatsSettings())
    assert (visit.end, visit.agent_id, visit.wait, visit.talk) == ("answered", "nurse1", 30.0, 270.0)


def test_the_chart_draws_one_dot_per_ended_wait_and_nothing_identifying() -> None:
    svg = waits_svg(_report(), HOSPITAL_TZ)
    ElementTree.fromstring(svg)  # well-formed XML, or this raises
    assert svg.startswith("<svg")
    assert svg.rstrip().endswith("</svg>")
    assert svg.count("<circle") == 12  # 13 received, one still waiting
    assert all(f"{s.call_id}" not in svg for s in fx.SCRIPTS)
