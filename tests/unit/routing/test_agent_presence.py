"""Agents shown offline on the wallboard: the engine records a phone's presence on change, the snapshot reads it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from compliance.accounts import AccountStore
from medhotline.api.board import Board
from routing.engine import NOT_REGISTERED, UNREACHABLE, EngineSettings, RoutingEngine
from routing.rules import DEFAULT_RULES
from routing.statistics import StatsSettings
from routing.store import AgentStore
from tests.unit.routing.test_routing_engine import FakeAgentTable, agent, call, engine_for, offer_of

T0: Final = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class Presence:
    """Counts the writes; ``fail`` makes the next one fail as a lost database would."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str | None]] = []
        self.fail = False

    def set_presence(self, endpoint: str, reason: str | None, at: datetime) -> bool:
        if self.fail:
            self.fail = False
            raise RuntimeError("database unreachable")
        self.writes.append((endpoint, reason))
        return True


async def _settled(engine: RoutingEngine) -> None:
    """Every presence write started so far has finished."""
    for _ in range(200):
        if not engine._timers:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("presence writes still running")


async def test_only_changes_of_a_phones_presence_are_written() -> None:
    engine, _ = engine_for(FakeAgentTable(agent("doc", "physician_license")))
    engine.presence = presence = Presence()
    for online in (False, False, False, True, True, False):  # AMI repeats states (qualify, re-register)
        engine.contact_state("doc", online)
        await _settled(engine)
    assert presence.writes == [("doc", NOT_REGISTERED), ("doc", None), ("doc", NOT_REGISTERED)]
    # Routing is as before: the engine's own view, not the database's, keeps the agent out.
    await engine.step()
    assert engine.dispatcher.status("doc").state == "offline"


async def test_a_failed_write_is_tried_again_on_the_next_report() -> None:
    engine, _ = engine_for(FakeAgentTable(agent("doc", "physician_license")))
    engine.presence = presence = Presence()
    presence.fail = True
    engine.contact_state("doc", False)
    await _settled(engine)
    assert presence.writes == []
    engine.contact_state("doc", False)
    await _settled(engine)
    assert presence.writes == [("doc", NOT_REGISTERED)]


async def test_an_unreachable_phone_is_recorded_until_its_retry_time() -> None:
    engine, clock = engine_for(FakeAgentTable(agent("doc", "physician_license")), unreachable_retry=30.0)
    engine.presence = presence = Presence()
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer = offer_of(ticket)
    await engine.no_answer("c1", offer.assignment.agent_id, reachable=False)
    await _settled(engine)
    assert presence.writes == [("doc", UNREACHABLE)]
    start = clock.now
    clock.now = start + timedelta(seconds=10)
    await engine.step()
    await _settled(engine)
    assert presence.writes == [("doc", UNREACHABLE)]  # still within the retry time: nothing new
    clock.now = start + timedelta(seconds=31)
    await engine.step()
    await _settled(engine)
    assert presence.writes == [("doc", UNREACHABLE), ("doc", None)]


def _state(board: Board, agent_id: str) -> dict[str, object]:
    return next(a for a in board.agents(T0) if a["agent_id"] == agent_id)


async def test_the_wallboard_shows_an_unregistered_phone_offline_and_ready_again(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    AccountStore(sessions).add("nurse1", "Staff nurse1", ["nurse"], T0 - timedelta(days=1))
    store = AgentStore(sessions)
    store.add_agent("nurse1", "ep-nurse1", T0 - timedelta(days=1))
    routing = RoutingEngine(store, DEFAULT_RULES, EngineSettings(node="n1"), clock=lambda: T0, presence=store)
    board = Board(engine, StatsSettings())
    assert _state(board, "nurse1")["state"] == "ready"

    routing.contact_state("ep-nurse1", False)
    await _settled(routing)
    shown = _state(board, "nurse1")
    assert (shown["state"], shown["offline_reason"]) == ("offline", NOT_REGISTERED)
    assert shown["offline_since"] == "2026-03-02T17:00:00+08:00"
    assert store.set_presence("ep-nurse1", NOT_REGISTERED, T0 + timedelta(minutes=1)) is False  # unchanged
    assert _state(board, "nurse1")["offline_since"] == "2026-03-02T17:00:00+08:00"  # the first report kept

    store.pause("nurse1", "lunch", T0)  # offline says more than paused: the phone could not ring anyway
    assert _state(board, "nurse1")["state"] == "offline"
    ring = store.record_ring("call-1", "nurse1", "n1", T0)  # a phone that rings is there, whatever was recorded
    shown = _state(board, "nurse1")
    assert (shown["state"], shown["offline_reason"]) == ("ringing", None)
    store.finish_ring(ring, "no_answer", T0)
    store.unpause("nurse1", T0)

    routing.contact_state("ep-nurse1", True)
    await _settled(routing)
    shown = _state(board, "nurse1")
    assert (shown["state"], shown["offline_reason"], shown["offline_since"]) == ("ready", None, None)
