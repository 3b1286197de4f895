"""The statistics from the database (SQLite and PostgreSQL): the hand-computed day written through the same
repositories the service writes with, read back by the window reader, and the same figures after a restart."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from compliance.accounts import AccountStore
from compliance.data_keys import DataKey
from ground import db
from ground.clock import HOSPITAL_TZ
from recordings.records import CallRecordStore
from routing.statistics import NoteFacts, StatsRecords, compute
from routing.statistics_store import StatsStore
from routing.store import AgentStore
from tests.unit.routing import stats_fixture as fx

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _write_day(engine: Engine) -> None:
    accounts, agents = AccountStore.for_engine(engine), AgentStore.for_engine(engine)
    for agent in fx.AGENTS:
        accounts.add(agent, agent.title(), ["nurse"], T0)
        agents.add_agent(agent, f"ep-{agent}", T0)
    with Session(engine) as session, session.begin():
        key = DataKey(purpose="call_records", version=1, wrapped=b"w" * 40, kek_version=1, created_at=T0)
        session.add(key)
        session.flush()
        key_id = key.id
    calls, notes = db.CallRepository.for_engine(engine), CallRecordStore.for_engine(engine)
    for s in fx.SCRIPTS:
        started = (s.steps[0][3] if s.steps else fx.t(18, 0)).replace(second=0)
        calls.start(call_id=s.call_id, node="node1", transport="ari", channel_id=f"ch-{s.call_id[-4:]}",
                    channel_name="PJSIP/trunk-1", flow="hotline", flow_version=None, started_at=started)  # fmt: skip
        for node, edge, value, at in s.steps:
            calls.add_step(s.call_id, flow="queue", node=node, node_type="queue", edge=edge, input=value, at=at,
                           moves_last_step=False)  # fmt: skip
        for agent, rung, ended, outcome in s.rings:
            ring = agents.record_ring(s.call_id, agent, "node1", rung)
            if ended is not None and outcome is not None:
                agents.finish_ring(ring, outcome, ended)  # type: ignore[arg-type]
        if s.upgraded:
            calls.upgrade_to_emergency(s.call_id, by=s.upgraded[0], at=s.upgraded[1])
        if s.ended_at is not None:
            calls.finish(s.call_id, outcome=s.outcome, ended_at=s.ended_at, route_category=s.category,  # type: ignore[arg-type]
                         route_priority=s.priority)  # fmt: skip
        if s.note:
            notes.stage_note(s.call_id, s.note[0], s.note[1], "not-a-real-token", key_id)


def _read(engine: Engine) -> StatsRecords:
    notes = CallRecordStore.for_engine(engine)
    return StatsStore.for_engine(engine).records(
        fx.START, fx.END, lambda ids: [NoteFacts(*n) for n in notes.note_times(ids)]
    )


def test_figures_from_the_database_match_the_hand_computed_day_and_survive_a_restart(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        _write_day(engine)
        first = compute(_read(engine), fx.START, fx.END, by="agent", zone=HOSPITAL_TZ)
    finally:
        engine.dispose()
    total = asdict(first.total)
    for name, expected in fx.EXPECTED_TOTAL.items():
        assert total[name] == pytest.approx(expected), name
    agents = {a.agent_id: asdict(a) for a in first.agents}
    for agent, figures in fx.EXPECTED_AGENTS.items():
        for name, value in figures.items():
            assert agents[agent][name] == pytest.approx(value), (agent, name)
    # A restart: a new engine (new process state, nothing kept in memory) reads the same figures.
    again = db.make_engine(database_url)
    try:
        second = compute(_read(again), fx.START, fx.END, by="agent", zone=HOSPITAL_TZ)
    finally:
        again.dispose()
    assert second == first


def test_the_window_reader_takes_only_calls_queued_or_rung_in_it(engine: Engine) -> None:
    _write_day(engine)
    records = _read(engine)
    # All but O (never queued): K was queued the day before but rung in the window.
    assert set(records.calls) == {s.call_id for s in fx.SCRIPTS} - {fx._id(15)}
    assert {n.call_id for n in records.notes} == {fx._id(1), fx._id(5)}
    assert list(records.agents) == sorted(fx.AGENTS)
    morning = StatsStore.for_engine(engine).records(fx.t(9, 0), fx.t(9, 10))
    assert set(morning.calls) == {fx._id(1)}  # B joined at 09:10, the exclusive end
