"""The routing engine over a fake agent table: reservations, ring outcomes, freezes, wrap-up, escalation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from ground.db import WouldWait
from routing.engine import (
    NO_ANSWER,
    CancelRing,
    EngineSettings,
    Escalate,
    Offer,
    RingOutcome,
    RoutingEngine,
    Ticket,
)
from routing.model import Agent, CallPriority, CallRequest, Credential
from routing.rules import DEFAULT_RULES

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


@dataclass(frozen=True)
class View:
    agent: Agent
    paused_reason: str | None = None
    reserved_call_id: str | None = None


class FakeAgentTable:
    """The shared agent table as the engine sees it, with the same reservation rule as the real store."""

    def __init__(self, *agents: Agent) -> None:
        self.views = {a.id: View(a) for a in agents}
        self.rings: dict[int, tuple[str, str, RingOutcome | None]] = {}
        self.fail_reserve = False
        self._lock = threading.Lock()

    def routing_snapshot(self) -> Sequence[View]:
        with self._lock:
            return list(self.views.values())

    def reserve(
        self,
        account_id: str,
        call_id: str,
        node: str,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
    ) -> bool:
        if self.fail_reserve:
            raise RuntimeError("database unreachable")
        with self._lock:
            view = self.views[account_id]
            kinds = view.agent.valid_credential_kinds(at)
            if view.reserved_call_id or view.paused_reason or view.agent.frozen:
                return False
            if kinds & set(excluded):
                return False
            if not all(any(k in kinds for k in group) for group in required):
                return False
            self.views[account_id] = replace(view, reserved_call_id=call_id)
            return True

    def reserve_ring(
        self,
        account_id: str,
        call_id: str,
        node: str,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
        wait: bool = True,
    ) -> int | None:
        """Like the store: the reservation and its ring row together, or neither."""
        if not self.reserve(account_id, call_id, node, at, required, excluded=excluded):
            return None
        return self.record_ring(call_id, account_id, node, at)

    def release(self, account_id: str, call_id: str) -> bool:
        with self._lock:
            view = self.views[account_id]
            if view.reserved_call_id != call_id:
                return False
            self.views[account_id] = replace(view, reserved_call_id=None)
            return True

    def release_node(self, node: str) -> int:
        return 0

    def pause(self, account_id: str, reason: str, at: datetime) -> None:
        self.views[account_id] = replace(self.views[account_id], paused_reason=reason)

    def unpause(self, account_id: str, at: datetime) -> None:
        self.views[account_id] = replace(self.views[account_id], paused_reason=None)

    def record_ring(self, call_id: str, account_id: str, node: str, at: datetime) -> int:
        ring_id = len(self.rings) + 1
        self.rings[ring_id] = (call_id, account_id, None)
        return ring_id

    def finish_ring(self, ring_id: int, outcome: RingOutcome, at: datetime) -> None:
        call_id, account_id, _ = self.rings[ring_id]
        self.rings[ring_id] = (call_id, account_id, outcome)

    def freeze(self, account_id: str) -> None:
        view = self.views[account_id]
        self.views[account_id] = replace(view, agent=replace(view.agent, frozen=True))


def lic(kind: str, *, until: datetime = T0 + YEAR) -> Credential:
    return Credential(kind, "N-1", T0 - YEAR, until, T0 - YEAR, "active")


def agent(agent_id: str, *kinds: str) -> Agent:
    return Agent(agent_id, agent_id, frozenset(), tuple(lic(k) for k in kinds))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def engine_for(table: FakeAgentTable, **settings: float) -> tuple[RoutingEngine, Clock]:
    clock = Clock()
    values: dict[str, float] = {"wrap_up": 0.01, "no_answer_pause": 0.01, "unreachable_retry": 30.0} | settings
    return RoutingEngine(table, DEFAULT_RULES, EngineSettings(node="n1", **values), clock=clock), clock


def call(
    call_id: str, category: str = "diagnosis", priority: CallPriority = "normal", at: datetime = T0
) -> CallRequest:
    return CallRequest(call_id, category, priority, at)  # type: ignore[arg-type]


def offer_of(ticket: Ticket) -> Offer:
    item = ticket.items.get_nowait()
    assert isinstance(item, Offer), item
    return item


async def test_a_call_is_offered_to_a_qualified_agent_reserved_in_the_table() -> None:
    table = FakeAgentTable(agent("nurse", "nurse_license"), agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1", "diagnosis"))
    await engine.step()
    offer = offer_of(ticket)
    assert offer.assignment.agent_id == "doc"  # diagnosis: physicians only
    assert table.views["doc"].reserved_call_id == "c1"
    assert table.views["nurse"].reserved_call_id is None
    assert table.rings[offer.ring_id] == ("c1", "doc", None)


@pytest.mark.parametrize("would_wait", [False, True])
async def test_the_reservation_is_made_on_the_loop_unless_it_would_wait_then_in_a_thread(would_wait: bool) -> None:
    """The reservation is asked not to wait first (on the loop: no hop to a worker thread on the way to the phone);
    when that would wait (another writer holds SQLite's lock, or PostgreSQL), it is made in a thread instead."""
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    await engine.step()
    reserve_ring = table.reserve_ring
    made: list[tuple[bool, bool]] = []  # (wait, on the loop's thread)
    loop_thread = threading.get_ident()

    def reserve_or_would_wait(*args: object, wait: bool = True, **kwargs: object) -> int | None:
        made.append((wait, threading.get_ident() == loop_thread))
        if would_wait and not wait:
            raise WouldWait("database at test: reserving would wait: database is locked")
        return reserve_ring(*args, wait=wait, **kwargs)  # type: ignore[arg-type]

    table.reserve_ring = reserve_or_would_wait  # type: ignore[method-assign]
    ticket = engine.enqueue(call("c1"))
    await engine.decide()
    offer = offer_of(ticket)
    assert table.views["doc"].reserved_call_id == "c1"
    assert table.rings[offer.ring_id] == ("c1", "doc", None)
    assert made == ([(False, True), (True, False)] if would_wait else [(False, True)])


async def test_an_agent_reserved_by_another_node_is_skipped() -> None:
    table = FakeAgentTable(agent("doc1", "physician_license"), agent("doc2", "physician_license"))
    engine, clock = engine_for(table)
    await engine.step()  # both known and available here
    table.views["doc1"] = replace(table.views["doc1"], reserved_call_id="other-node-call")
    table.views["doc2"] = replace(table.views["doc2"], reserved_call_id="other-node-call-2")
    ticket = engine.enqueue(call("c1"))
    # The engine's view is stale (both available), the table refuses: the call must still be waiting.
    engine.dispatcher.agent_available("doc1", clock())
    await engine._assign()
    assert ticket.items.empty()
    assert engine.position("c1") == 1
    table.release("doc2", "other-node-call-2")
    await engine.step()
    assert offer_of(ticket).assignment.agent_id == "doc2"


async def test_a_licence_revoked_since_the_last_refresh_is_caught_at_reservation() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    await engine.step()
    expired = replace(table.views["doc"].agent, credentials=(lic("physician_license", until=T0),))
    table.views["doc"] = replace(table.views["doc"], agent=expired)  # the table knows, the engine not yet
    engine.enqueue(call("c1"))
    await engine._assign()
    assert table.views["doc"].reserved_call_id is None
    assert engine.position("c1") == 1


async def test_no_answer_pauses_the_agent_and_offers_the_call_to_the_next() -> None:
    table = FakeAgentTable(agent("doc1", "physician_license"), agent("doc2", "physician_license"))
    engine, _ = engine_for(table, no_answer_pause=0.05)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    first = offer_of(ticket)
    await engine.no_answer("c1", first.assignment.agent_id)
    assert table.views[first.assignment.agent_id].paused_reason == NO_ANSWER
    assert table.views[first.assignment.agent_id].reserved_call_id is None
    assert table.rings[first.ring_id][2] == "no_answer"
    await engine.step()
    second = offer_of(ticket)
    assert second.assignment.agent_id != first.assignment.agent_id
    await asyncio.sleep(0.2)  # the engine's own pause lifts by itself
    assert table.views[first.assignment.agent_id].paused_reason is None
    engine.close()


async def test_a_supervisor_pause_is_not_lifted_by_the_engine() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table, no_answer_pause=0.02)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    await engine.no_answer("c1", offer_of(ticket).assignment.agent_id)
    table.pause("doc", "training", T0)
    await asyncio.sleep(0.1)
    assert table.views["doc"].paused_reason == "training"
    engine.close()


async def test_unreachable_phone_is_retried_later_not_paused() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, clock = engine_for(table, unreachable_retry=30)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    await engine.no_answer("c1", offer_of(ticket).assignment.agent_id, reachable=False)
    assert table.views["doc"].paused_reason is None
    await engine.step()
    assert ticket.items.empty()
    assert engine.dispatcher.status("doc").state == "offline"
    clock.now += timedelta(seconds=31)
    await engine.step()
    assert offer_of(ticket).assignment.agent_id == "doc"


async def test_freezing_a_ringing_agent_cancels_the_ring_and_frees_the_call() -> None:
    table = FakeAgentTable(agent("doc1", "physician_license"), agent("doc2", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    first = offer_of(ticket)
    table.freeze(first.assignment.agent_id)
    with capture_logs() as logs:
        await engine.step()
    items = [ticket.items.get_nowait() for _ in range(ticket.items.qsize())]
    assert isinstance(items[0], CancelRing)
    assert items[0].agent_id == first.assignment.agent_id
    assert isinstance(items[1], Offer)
    assert items[1].assignment.agent_id != first.assignment.agent_id
    await asyncio.sleep(0.05)  # the release of the frozen agent's reservation runs as a task
    assert table.views[first.assignment.agent_id].reserved_call_id is None
    assert table.rings[first.ring_id][2] == "released"
    assert any(e["event"] == "routing.agent_frozen" for e in logs)
    # Never offered again while frozen.
    await engine.no_answer("c1", items[1].assignment.agent_id)
    await engine.step()
    assert ticket.items.empty()
    engine.close()


async def test_caller_leaving_while_ringing_releases_the_agent() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer = offer_of(ticket)
    await engine.abandon("c1")
    assert table.views["doc"].reserved_call_id is None
    assert table.rings[offer.ring_id][2] == "caller_gone"
    assert engine.dispatcher.status("doc").state == "available"
    assert engine.position("c1") is None


async def test_wrap_up_holds_the_reservation_until_it_ends() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table, wrap_up=0.1)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer = offer_of(ticket)
    await engine.answered("c1", "doc")
    assert table.rings[offer.ring_id][2] == "answered"
    await engine.finished("c1", "doc")
    next_ticket = engine.enqueue(call("c2"))
    await engine.step()
    assert engine.dispatcher.status("doc").state == "wrap_up"
    assert table.views["doc"].reserved_call_id == "c1"
    assert next_ticket.items.empty()
    await asyncio.sleep(0.2)
    assert table.views["doc"].reserved_call_id is None
    await engine.step()
    assert offer_of(next_ticket).assignment.agent_id == "doc"


async def test_the_emergency_is_offered_first() -> None:
    table = FakeAgentTable(agent("nurse", "nurse_license"))
    engine, clock = engine_for(table)
    generals = [engine.enqueue(call(f"g{i}", "general", at=T0 + timedelta(seconds=i))) for i in range(3)]
    clock.now = T0 + timedelta(seconds=10)
    emergency = engine.enqueue(call("e", "emergency", "emergency", at=clock.now))
    assert engine.position("e") == 1
    await engine.step()
    assert offer_of(emergency).assignment.agent_id == "nurse"
    assert all(t.items.empty() for t in generals)


async def test_escalation_is_signalled_once() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    table.pause("doc", "in surgery", T0)  # qualified, but not taking calls now: the call waits its time
    engine, clock = engine_for(table)
    ticket = engine.enqueue(call("e", "emergency", "emergency"))
    await engine.step()
    assert ticket.items.empty()
    clock.now = T0 + timedelta(seconds=61)
    await engine.step()
    await engine.step()
    item = ticket.items.get_nowait()
    assert isinstance(item, Escalate)
    assert item.rule is not None
    assert (item.rule.group, item.reason) == ("on_call_physicians", "waited")
    assert ticket.items.empty()


async def test_a_database_failure_keeps_the_call_waiting_and_is_logged() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    table.fail_reserve = True
    with capture_logs() as logs:
        await engine.step()
    assert ticket.items.empty()
    assert engine.position("c1") == 1
    assert any(e["event"] == "routing.database_failed" and e["doing"] == "reserve agent" for e in logs)
    table.fail_reserve = False
    await engine.step()
    assert offer_of(ticket).assignment.agent_id == "doc"


async def test_an_unregistered_phone_is_not_offered_calls() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    engine.contact_state("doc", online=False)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    assert ticket.items.empty()
    assert engine.dispatcher.status("doc").reason == "not registered"
    engine.contact_state("doc", online=True)
    await engine.step()
    assert offer_of(ticket).assignment.agent_id == "doc"


async def test_an_agent_removed_from_the_table_goes_offline() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    await engine.step()
    del table.views["doc"]
    await engine.step()
    assert engine.dispatcher.status("doc").state == "offline"


@pytest.mark.parametrize("state", ["frozen", "paused"])
async def test_frozen_or_paused_agents_take_no_calls(state: str) -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    if state == "frozen":
        table.freeze("doc")
    else:
        table.pause("doc", "meeting", T0)
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    items = [ticket.items.get_nowait() for _ in range(ticket.items.qsize())]
    assert not any(isinstance(i, Offer) for i in items)
    # A frozen sole physician means nobody could ever take the call: it escalates at once instead of waiting.
    assert [type(i) for i in items] == ([Escalate] if state == "frozen" else [])
    assert engine.dispatcher.status("doc").state == "paused"


async def test_a_waiting_call_reclassified_as_emergency_jumps_ahead_keeping_its_arrival() -> None:
    table = FakeAgentTable(agent("nurse", "nurse_license"))
    engine, clock = engine_for(table)
    table.pause("nurse", "meeting", T0)
    first = engine.enqueue(call("g1", "general", at=T0))
    second = engine.enqueue(call("g2", "general", at=T0 + timedelta(seconds=5)))
    clock.now = T0 + timedelta(seconds=10)
    assert engine.position("g2") == 2
    assert engine.reclassify_emergency("g2")
    assert engine.position("g2") == 1
    assert not engine.reclassify_emergency("g2")  # already an emergency
    table.unpause("nurse", T0)
    await engine.step()
    offer = offer_of(second)
    assert offer.assignment.call.priority == "emergency"
    assert offer.assignment.call.enqueued_at == T0 + timedelta(seconds=5)
    assert first.items.empty()
    assert not engine.reclassify_emergency("g2")  # ringing now, not waiting


async def test_a_call_nobody_could_ever_take_is_escalated_at_once() -> None:
    expired = Agent("doc", "doc", frozenset(), (lic("physician_license", until=T0),))
    table = FakeAgentTable(expired, agent("desk"))
    engine, _ = engine_for(table)
    diagnosis = engine.enqueue(call("d1", "diagnosis"))
    general = engine.enqueue(call("g1", "general"))
    table.pause("desk", "break", T0)
    table.pause("doc", "break", T0)
    await engine.step()
    item = diagnosis.items.get_nowait()
    assert isinstance(item, Escalate)
    assert (item.reason, item.rule is not None) == ("no_qualified_agent", True)
    assert general.items.empty()  # the desk agent may take it once back: it waits
    await engine.step()
    assert diagnosis.items.empty()  # signalled once


async def test_a_call_arriving_between_refreshes_is_offered_without_reading_the_agent_table() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    reads = 0
    snapshot = table.routing_snapshot

    def counted() -> Sequence[View]:
        nonlocal reads
        reads += 1
        return snapshot()

    table.routing_snapshot = counted  # type: ignore[method-assign]
    engine, _ = engine_for(table, refresh_interval=60.0)
    runner = asyncio.create_task(engine.run())
    try:
        await asyncio.wait_for(engine.refreshed.wait(), 5)
        ticket = engine.enqueue(call("c1"))
        offer = await asyncio.wait_for(ticket.items.get(), 5)
        assert isinstance(offer, Offer)
        assert offer.assignment.agent_id == "doc"
        assert table.views["doc"].reserved_call_id == "c1"
        assert reads == 1  # the start-up refresh only: the reservation itself re-checks the agent
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        engine.close()


async def test_a_caller_leaving_while_the_reservation_is_written_ends_the_ring_and_frees_the_agent() -> None:
    table = FakeAgentTable(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    await engine.step()
    reserve_ring = table.reserve_ring

    def slow_reserve_ring(*args: object, **kwargs: object) -> int | None:
        ring_id = reserve_ring(*args, **kwargs)  # type: ignore[arg-type]
        engine.dispatcher.remove("c1", T0)  # what abandon() does while the database answers
        engine._tickets.pop("c1", None)
        return ring_id

    table.reserve_ring = slow_reserve_ring  # type: ignore[method-assign]
    ticket = engine.enqueue(call("c1"))
    await engine.decide()
    assert ticket.items.empty()
    assert table.views["doc"].reserved_call_id is None
    assert [outcome for _, _, outcome in table.rings.values()] == ["caller_gone"]
    assert engine.dispatcher.status("doc").state == "available"
