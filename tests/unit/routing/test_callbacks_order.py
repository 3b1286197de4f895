"""Callbacks in the routing order, sans I/O: a callback keeps its caller's place, never overtakes an emergency,
is never dialled without a reserved agent, and there is never more than one open callback per number."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.callbacks import (
    CallbackPolicy,
    PendingCallback,
    at_most_one_per_number,
    due_callbacks,
    estimated_wait,
    next_attempt,
)
from routing.model import Agent, CallRequest, Credential
from routing.router import Dispatcher
from routing.rules import DEFAULT_RULES

T0 = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)


def nurse(n: int) -> Agent:
    licence = Credential(
        "nurse_license", f"N{n}", T0 - timedelta(days=9), T0 + timedelta(days=9), T0 - timedelta(days=1)
    )
    return Agent(f"nurse{n}", f"nurse{n}", credentials=(licence,))


def test_estimated_wait() -> None:
    assert estimated_wait(1, 2, 100) == 100
    assert estimated_wait(3, 2, 100) == 200
    assert estimated_wait(5, 0, 100) is None
    with pytest.raises(ValueError, match="positions start at 1"):
        estimated_wait(0, 1, 100)
    policy = CallbackPolicy(threshold=150)
    assert not policy.offer(100)
    assert policy.offer(200)
    assert policy.offer(None)


def test_retries_then_a_task() -> None:
    policy = CallbackPolicy(max_attempts=3, retry_after=60)
    assert next_attempt(1, policy, T0) == T0 + timedelta(seconds=60)
    assert next_attempt(2, policy, T0) == T0 + timedelta(seconds=60)
    assert next_attempt(3, policy, T0) is None
    with pytest.raises(ValueError, match="at least one attempt"):
        next_attempt(0, policy, T0)
    with pytest.raises(ValueError, match="max_attempts"):
        CallbackPolicy(max_attempts=0)


def test_due_callbacks_in_order_of_place_and_not_twice() -> None:
    a = PendingCallback("a", "general", "normal", T0 + timedelta(seconds=5), T0)
    b = PendingCallback("b", "general", "normal", T0, T0)
    later = PendingCallback("c", "general", "normal", T0 - timedelta(seconds=5), T0 + timedelta(minutes=2))
    urgent = PendingCallback("u", "emergency", "emergency", T0 + timedelta(seconds=9), T0)
    assert [c.id for c in due_callbacks([a, b, later, urgent], [], T0)] == ["u", "b", "a"]
    assert [c.id for c in due_callbacks([a, b], ["b"], T0)] == ["a"]


def test_a_callback_keeps_the_place_its_caller_had() -> None:
    d = Dispatcher(DEFAULT_RULES, callback_delay=0)
    d.enqueue(CallRequest("early", "general", "normal", T0))
    d.enqueue(CallRequest("cb", "general", "normal", T0 + timedelta(seconds=10), callback=True))
    d.enqueue(CallRequest("late", "general", "normal", T0 + timedelta(seconds=20)))
    assert [c.call_id for c in d.waiting(T0 + timedelta(minutes=5))] == ["early", "cb", "late"]


# Arrivals: (seconds after the previous, kind) where kind is a live caller, a callback or an emergency.
ARRIVALS = st.lists(
    st.tuples(st.integers(0, 30), st.sampled_from(["live", "callback", "emergency"])), min_size=1, max_size=25
)


@settings(max_examples=150, deadline=None)
@given(arrivals=ARRIVALS, agents=st.integers(0, 6), freed=st.lists(st.integers(0, 5), max_size=10))
def test_callbacks_never_overtake_and_never_outnumber_free_agents(
    arrivals: list[tuple[int, str]], agents: int, freed: list[int]
) -> None:
    d = Dispatcher(DEFAULT_RULES, callback_delay=0)
    at = T0
    calls: dict[str, CallRequest] = {}
    for n, (gap, kind) in enumerate(arrivals):
        at += timedelta(seconds=gap)
        call = CallRequest(
            f"{kind}{n}",
            "emergency" if kind == "emergency" else "vaccination",
            "emergency" if kind == "emergency" else "normal",
            at,
            callback=kind == "callback",
        )
        calls[call.call_id] = call
        d.enqueue(call)
    for n in range(agents):
        d.add_agent(nurse(n), T0, "available")
    now = at + timedelta(minutes=1)
    served: list[CallRequest] = []
    dialling = 0
    rounds = [agents, *freed]
    for round_free in rounds:
        free_before = sum(1 for n in range(agents) if d.status(f"nurse{n}").state == "available")
        round_dials = 0
        while (assignment := d.next_assignment(now)) is not None:
            call = assignment.call
            waiting = d.waiting(now)
            # Never a callback (or any normal call) while an emergency this agent could take is waiting.
            if call.priority == "normal":
                assert not any(w.priority == "emergency" for w in waiting)
            # A callback never overtakes a call that arrived earlier in the same category and priority.
            assert not any(
                w.priority == call.priority and w.category == call.category and w.enqueued_at < call.enqueued_at
                for w in waiting
            )
            if call.callback:
                round_dials += 1
            served.append(call)
        # Every callback dialled in this round holds an agent who was free: never more dials than free agents.
        assert round_dials <= free_before
        dialling += round_dials
        # Some agents finish their calls and are free again.
        for n in range(min(round_free, agents)):
            agent_id = f"nurse{n}"
            if d.status(agent_id).state == "ringing":
                ringing = {a: c for c, a in d.ringing().items()}
                d.answered(ringing[agent_id], agent_id, now)
            d.agent_state(agent_id, "available", now)
        now += timedelta(seconds=30)
    assert dialling <= len(served)
    # Order of service within one priority is the order of arrival, callbacks included.
    for priority in ("emergency", "normal"):
        times = [c.enqueued_at for c in served if c.priority == priority]
        assert times == sorted(times)


@given(st.lists(st.sampled_from(["a" * 64, "b" * 64, "c" * 64]), max_size=8))
def test_one_open_callback_per_number_rule(indexes: list[str]) -> None:
    # The rule as the store applies it: keep the first request per number, refuse the rest while it is open.
    kept: list[str] = []
    for index in indexes:
        if index not in kept:
            kept.append(index)
    assert at_most_one_per_number(kept)
    assert at_most_one_per_number(indexes) == (len(set(indexes)) == len(indexes))


def test_the_offer_names_the_configured_key_and_prompts_build_renders_it() -> None:
    from routing.announcements import announcement_texts
    from routing.callbacks import CALLBACK_ACCEPTED, callback_texts, offer_text

    assert "请按1" in offer_text("1")
    assert "请按井号键" in offer_text("#")
    assert offer_text("1") in announcement_texts("1")
    assert CALLBACK_ACCEPTED in announcement_texts("1")
    assert callback_texts("") == []
    assert CALLBACK_ACCEPTED not in announcement_texts("")


def test_callback_and_emergency_keys_must_differ() -> None:
    from pydantic import ValidationError

    from ground.config import RoutingConfig

    assert RoutingConfig().callback_key == "1"
    assert RoutingConfig(callback_key="").callback_key == ""
    with pytest.raises(ValidationError, match="callback_key and emergency_key are both '0'"):
        RoutingConfig(callback_key="0")
    with pytest.raises(ValidationError, match="callback_key"):
        RoutingConfig(callback_key="12")
