"""The routing engine through a database failover: writes that must happen (a release, a ring's end, a pause) are
retried while no writable primary answers; a reservation cut off by it is undone; an answer is not held up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

from structlog.testing import capture_logs

from ground.db import DatabaseUnavailable
from routing.engine import RingOutcome
from tests.unit.routing.test_routing_engine import FakeAgentTable, agent, call, engine_for, offer_of

GONE = DatabaseUnavailable("database at postgresql+psycopg://…: the primary is gone")


class FailingOver(FakeAgentTable):
    """The fake table, with each named write failing ``DatabaseUnavailable`` its next ``outages[name]`` times."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.outages: dict[str, int] = {}
        self.attempts: dict[str, int] = {}

    def _down(self, name: str) -> None:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if self.outages.get(name, 0) > 0:
            self.outages[name] -= 1
            raise GONE

    def release(self, account_id: str, call_id: str) -> bool:
        self._down("release")
        return super().release(account_id, call_id)

    def finish_ring(self, ring_id: int, outcome: RingOutcome, at: datetime) -> None:
        self._down("finish_ring")
        super().finish_ring(ring_id, outcome, at)

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
        # The failover cut the COMMIT off after the server had stored it: stored, and the engine gets an error.
        ring_id = super().reserve_ring(account_id, call_id, node, at, required, excluded=excluded)
        self._down("reserve_ring")
        return ring_id


async def until(predicate: object, rounds: int = 500) -> None:
    """Let the engine's background writes run until ``predicate()`` holds (AssertionError after ``rounds``)."""
    assert callable(predicate)
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the write did not happen")


async def test_the_release_after_wrap_up_is_retried_until_a_primary_answers() -> None:
    table = FailingOver(agent("doc", "physician_license"))
    engine, _ = engine_for(table, wrap_up=0.01)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer_of(ticket)
    await engine.answered("c1", "doc")
    table.outages["release"] = 2
    with capture_logs() as logs:
        await engine.finished("c1", "doc")
        await until(lambda: table.views["doc"].reserved_call_id is None)
    assert table.attempts["release"] == 3
    retries = [e for e in logs if e["event"] == "routing.database_retry"]
    assert [e["doing"] for e in retries] == ["release after wrap-up"] * 2
    assert not [e for e in logs if e["event"] == "routing.database_failed"]
    # The agent takes the next call: nothing was left reserved by the outage.
    next_ticket = engine.enqueue(call("c2"))
    await engine.step()
    assert offer_of(next_ticket).assignment.agent_id == "doc"


async def test_a_release_is_given_up_after_write_retry_and_logged_without_raising() -> None:
    table = FailingOver(agent("doc", "physician_license"))
    engine, _ = engine_for(table, write_retry=0.5)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer_of(ticket)
    table.outages["release"] = 1000
    table.outages["finish_ring"] = 1000
    with capture_logs() as logs:
        await engine.abandon("c1")
    failed = [e for e in logs if e["event"] == "routing.database_failed"]
    assert [(e["doing"], e["retried"]) for e in failed] == [("ring ended", True), ("release", True)]
    assert "the primary is gone" in failed[0]["reason"]
    assert table.attempts["release"] >= 2  # retried, then given up
    assert table.views["doc"].reserved_call_id == "c1"  # what the database still says; a restart releases it


async def test_a_refusal_is_not_retried() -> None:
    table = FailingOver(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer_of(ticket)

    def refused(account_id: str, call_id: str) -> bool:
        table.attempts["release"] = table.attempts.get("release", 0) + 1
        raise ValueError("refused by a constraint")

    table.release = refused  # type: ignore[method-assign]
    with capture_logs() as logs:
        await engine.abandon("c1")
    assert table.attempts["release"] == 1
    assert not [e for e in logs if e["event"] == "routing.database_retry"]
    assert [e["doing"] for e in logs if e["event"] == "routing.database_failed"] == ["release"]


async def test_a_reservation_cut_off_by_the_failover_is_released_and_the_call_offered_again() -> None:
    table = FailingOver(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    table.outages["reserve_ring"] = 1
    table.outages["release"] = 1  # the release of the unsure reservation meets the outage once too
    with capture_logs() as logs:
        await engine.step()
    assert ticket.items.empty()
    assert engine.position("c1") == 1
    assert table.views["doc"].reserved_call_id is None, "the stored reservation must not hold the agent"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "routing.reservation_unavailable",
        "routing.database_retry",
    ]
    await engine.step()
    offer = offer_of(ticket)
    assert offer.assignment.agent_id == "doc"
    assert table.views["doc"].reserved_call_id == "c1"


async def test_an_answer_is_not_held_up_by_the_outage_and_recorded_once_a_primary_answers() -> None:
    table = FailingOver(agent("doc", "physician_license"))
    engine, _ = engine_for(table)
    ticket = engine.enqueue(call("c1"))
    await engine.step()
    offer = offer_of(ticket)
    table.outages["finish_ring"] = 3  # about 0.2 + 0.4 + 0.8 s of retries
    await engine.answered("c1", "doc")
    # Returned after one failed attempt, not after the retries: the bridge is made right after this.
    assert table.attempts["finish_ring"] == 1
    assert table.rings[offer.ring_id][2] is None
    await until(lambda: table.rings[offer.ring_id][2] == "answered")
    assert table.attempts["finish_ring"] == 4
    engine.close()
