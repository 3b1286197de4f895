"""Dispatcher: order of service, reservations, ring-no-answer, escalation, and properties over random streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.model import Agent, CallPriority, CallRequest, Credential
from routing.router import AgentState, Assignment, Dispatcher, RoutingError, eligible
from routing.rules import DEFAULT_RULES, CategoryRule, RoutingRules, SkillExpr, Step
from telephony.consult import CONSULT_CATEGORIES, ConsultCategory

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def lic(kind: str) -> Credential:
    return Credential(kind, "N-1", T0 - YEAR, T0 + YEAR, T0 - YEAR, "active")


def make_agent(agent_id: str, *kinds: str, skills: dict[str, int] | None = None) -> Agent:
    return Agent(agent_id, f"PJSIP/{agent_id}", frozenset(), tuple(lic(k) for k in kinds), skills or {})


def make_call(
    call_id: str, category: ConsultCategory, when: float, priority: CallPriority = "normal", *, callback: bool = False
) -> CallRequest:
    return CallRequest(call_id, category, priority, at(when), callback)


def dispatcher(*agents: Agent, available_at: float = 0.0) -> Dispatcher:
    d = Dispatcher(DEFAULT_RULES)
    for a in agents:
        d.add_agent(a, at(available_at), "available")
    return d


def assign(d: Dispatcher, when: float) -> Assignment:
    assignment = d.next_assignment(at(when))
    assert assignment is not None
    return assignment


# -- scenarios ---------------------------------------------------------------------------------------------
def test_longest_idle_eligible_agent_gets_the_call() -> None:
    d = Dispatcher(DEFAULT_RULES)
    d.add_agent(make_agent("recent", "physician_license"), at(0))
    d.add_agent(make_agent("idle", "physician_license"), at(0))
    d.add_agent(make_agent("nurse", "nurse_license"), at(0))
    d.agent_available("nurse", at(1))
    d.agent_available("idle", at(2))
    d.agent_available("recent", at(5))
    d.agent_available("idle", at(6))  # repeated: idle time is kept
    d.enqueue(make_call("c1", "diagnosis", 7))
    a = assign(d, 8)
    assert (a.call.call_id, a.agent_id, a.endpoint) == ("c1", "idle", "PJSIP/idle")
    assert d.status("idle").state == "ringing"
    assert d.next_assignment(at(8)) is None  # nothing else waiting


def test_agent_is_never_reserved_twice() -> None:
    d = dispatcher(make_agent("a", "physician_license"))
    d.enqueue(make_call("c1", "diagnosis", 0))
    d.enqueue(make_call("c2", "diagnosis", 1))
    assert assign(d, 2).call.call_id == "c1"
    assert d.next_assignment(at(3)) is None
    d.answered("c1", "a", at(4))
    assert d.status("a").state == "busy"
    assert d.next_assignment(at(5)) is None
    d.agent_state("a", "wrap_up", at(60))
    assert d.next_assignment(at(61)) is None
    d.agent_available("a", at(90))
    assert assign(d, 91).call.call_id == "c2"


def test_reclassified_emergency_jumps_ahead() -> None:
    d = dispatcher()
    for i in range(3):
        d.enqueue(make_call(f"c{i}", "general", i))
    d.reclassify("c2", "emergency", "emergency")
    assert [c.call_id for c in d.waiting(at(10))] == ["c2", "c0", "c1"]
    d.add_agent(make_agent("doc", "physician_license", skills={"emergency_triage": 4}), at(10), "available")
    a = assign(d, 11)
    assert (a.call.call_id, a.call.category, a.call.priority) == ("c2", "emergency", "emergency")
    assert a.call.enqueued_at == at(2)  # kept its place


def test_reclassify_unknown_call() -> None:
    with pytest.raises(RoutingError, match="not waiting"):
        dispatcher().reclassify("nope", "general", "normal")


def test_emergency_beats_normal_however_long_it_waited() -> None:
    d = dispatcher(make_agent("doc", "physician_license", skills={"emergency_triage": 5}), available_at=1e6)
    d.enqueue(make_call("old", "diagnosis", 0))
    d.enqueue(make_call("new", "emergency", 1e6 - 1, "emergency"))
    assert assign(d, 1e6).call.call_id == "new"


def test_ring_no_answer_pauses_and_returns_the_call_to_its_place() -> None:
    d = dispatcher(make_agent("a", "physician_license"))
    d.add_agent(make_agent("b", "physician_license"), at(3), "available")
    d.enqueue(make_call("first", "diagnosis", 0))
    d.enqueue(make_call("second", "diagnosis", 5))
    assert assign(d, 6).agent_id == "a"
    d.ring_no_answer("first", "a", at(26))
    status = d.status("a")
    assert (status.state, status.reason, status.since) == ("paused", "no answer", at(26))
    a = assign(d, 26)
    assert (a.call.call_id, a.agent_id) == ("first", "b")
    assert d.next_assignment(at(27)) is None  # a is paused
    with pytest.raises(RoutingError, match="not ringing agent a"):
        d.ring_no_answer("first", "a", at(28))


def test_refused_reservation_returns_the_call_and_marks_the_agent_busy() -> None:
    d = dispatcher(make_agent("a", "physician_license"), make_agent("b", "physician_license"))
    d.agent_available("b", at(1))  # a is the longer idle
    d.enqueue(make_call("c", "diagnosis", 2))
    assert assign(d, 3).agent_id == "a"
    d.reservation_refused("c", "a", at(3))
    assert (d.status("a").state, d.status("a").reason) == ("busy", "reserved elsewhere")
    assert d.is_waiting("c")
    assert assign(d, 3).agent_id == "b"
    with pytest.raises(RoutingError, match="not ringing agent a"):
        d.reservation_refused("c", "a", at(4))


def test_position_follows_the_order_of_service() -> None:
    d = dispatcher()
    d.enqueue(make_call("g1", "general", 0))
    d.enqueue(make_call("g2", "general", 1))
    d.enqueue(make_call("e", "emergency", 2, "emergency"))
    assert [d.position(c, at(3)) for c in ("e", "g1", "g2")] == [1, 2, 3]
    assert d.position("unknown", at(3)) is None


def test_agent_leaving_ringing_returns_the_call() -> None:
    d = dispatcher(make_agent("a", "physician_license"))
    d.enqueue(make_call("c", "diagnosis", 0))
    assign(d, 1)
    d.agent_state("a", "offline", at(2))
    assert [c.call_id for c in d.waiting(at(2))] == ["c"]
    assert d.ringing() == {}


def test_frozen_agent_is_released_and_never_assigned() -> None:
    d = dispatcher(make_agent("a", "physician_license"))
    d.enqueue(make_call("c", "diagnosis", 0))
    assign(d, 1)
    assert d.freeze("a") == "c"
    assert d.ringing() == {}
    assert (d.status("a").state, d.status("a").reason) == ("paused", "frozen")
    assert d.freeze("a") is None
    d.agent_available("a", at(2))
    assert d.next_assignment(at(3)) is None
    assert d.why_waiting("c", at(3)) == "no_qualified_agent"


def test_skill_step_widens_with_waiting_time() -> None:
    d = dispatcher(make_agent("generalist", "pharmacist_license"))
    d.enqueue(make_call("m", "medication", 0))
    assert d.next_assignment(at(30)) is None
    assert d.why_waiting("m", at(30)) == "no_agent_with_skill"
    assert d.next_change(at(30)) == at(60)
    a = assign(d, 60)
    assert (a.agent_id, a.step) == ("generalist", 1)


def test_specialist_preferred_while_step_holds() -> None:
    d = dispatcher(make_agent("generalist", "pharmacist_license"))
    d.add_agent(make_agent("expert", "pharmacist_license", skills={"pharmacology": 4}), at(5), "available")
    d.enqueue(make_call("m", "medication", 6))
    a = assign(d, 7)
    assert (a.agent_id, a.step) == ("expert", 0)  # though the generalist idled longer


def test_escalations_list_overdue_waiting_calls() -> None:
    d = dispatcher()
    d.enqueue(make_call("e", "emergency", 0, "emergency"))
    d.enqueue(make_call("g", "general", 0))
    assert d.escalations(at(59)) == []
    assert d.next_change(at(59)) == at(60)
    [due] = d.escalations(at(60))
    assert (due.call.call_id, due.rule.group, due.due_at) == ("e", "on_call_physicians", at(60))
    assert [e.call.call_id for e in d.escalations(at(900))] == ["e", "g"]
    assert d.remove("e", at(900)) is not None
    assert [e.call.call_id for e in d.escalations(at(900))] == ["g"]


def test_removing_a_ringing_call_frees_the_agent() -> None:
    d = dispatcher(make_agent("a"))
    d.enqueue(make_call("c", "general", 0))
    assign(d, 1)
    assert d.remove("c", at(2)) is not None
    assert d.status("a").state == "available"
    assert d.remove("c", at(3)) is None


def test_why_waiting_reasons() -> None:
    d = dispatcher()
    d.enqueue(make_call("c", "diagnosis", 0))
    assert d.why_waiting("c", at(1)) == "no_qualified_agent"
    d.add_agent(make_agent("a", "physician_license"), at(1), "busy")
    assert d.why_waiting("c", at(1)) == "no_eligible_agent_available"
    d.agent_available("a", at(2))
    assert d.why_waiting("c", at(2)) == "assignable"
    assign(d, 2)
    assert d.why_waiting("c", at(2)) is None


def test_invalid_events_are_refused() -> None:
    d = dispatcher(make_agent("a"))
    with pytest.raises(RoutingError, match="already known"):
        d.add_agent(make_agent("a"), at(0))
    with pytest.raises(RoutingError, match="unknown agent"):
        d.agent_available("zz", at(0))
    with pytest.raises(RoutingError, match="only rings through an assignment"):
        d.agent_state("a", "ringing", at(0))
    d.enqueue(make_call("c", "general", 0))
    with pytest.raises(RoutingError, match="already queued"):
        d.enqueue(make_call("c", "general", 0))


def test_aging_prevents_starvation_among_normal_calls() -> None:
    """A general call is not starved by a steady stream of adverse-reaction calls with a 60 s head start."""
    d = dispatcher(make_agent("nurse", "nurse_license", skills={"pharmacovigilance": 3}))
    d.enqueue(make_call("general", "general", 0))
    served: list[str] = []
    for tick in range(1, 30):
        now = tick * 10.0
        d.enqueue(make_call(f"adverse{tick}", "adverse_reaction", now))
        a = assign(d, now)
        served.append(a.call.call_id)
        d.answered(a.call.call_id, "nurse", at(now))
        d.agent_available("nurse", at(now + 1))
        if a.call.call_id == "general":
            break
    assert served[-1] == "general"
    assert len(served) <= 8  # served once its wait (≥ 60 s) beats a fresh call's head start


def test_callback_requests_yield_to_live_callers() -> None:
    d = dispatcher(make_agent("a"), available_at=100)
    d.enqueue(make_call("cb", "general", 0, callback=True))
    d.enqueue(make_call("live", "general", 50))
    assert assign(d, 100).call.call_id == "live"


# -- properties --------------------------------------------------------------------------------------------
KINDS = ("physician_license", "nurse_license", "pharmacist_license", "social_worker_license")
SKILLS = ("emergency_triage", "pharmacology", "pharmacovigilance", "vaccination")


def offset(lo: int, hi: int) -> st.SearchStrategy[datetime]:
    return st.integers(lo, hi).map(lambda s: T0 + timedelta(seconds=s))


credentials = st.builds(
    Credential,
    kind=st.sampled_from(KINDS),
    number=st.just("N"),
    valid_from=offset(-4000, 2000),
    valid_until=offset(-1000, 6000),
    verified_at=st.none() | offset(-4000, 3000),
    status=st.sampled_from(["active", "active", "active", "revoked"]),
)


@st.composite
def agent_lists(draw: st.DrawFn) -> list[Agent]:
    count = draw(st.integers(1, 5))
    return [
        Agent(
            f"a{i}",
            f"PJSIP/a{i}",
            frozenset(),
            tuple(draw(st.lists(credentials, max_size=3))),
            draw(st.dictionaries(st.sampled_from(SKILLS), st.integers(1, 5), max_size=3)),
            draw(st.booleans().map(lambda b: b and draw(st.integers(0, 4)) == 0)),
        )
        for i in range(count)
    ]


Op = (
    tuple[Literal["enqueue"], ConsultCategory, bool, bool]
    | tuple[Literal["advance"], int]
    | tuple[Literal["available"], int]
    | tuple[Literal["state"], int, AgentState]
    | tuple[Literal["answer", "no_answer", "reclassify"], int]
    | tuple[Literal["freeze"], int]
    | tuple[Literal["dispatch", "escalate"]]
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.sampled_from(CONSULT_CATEGORIES), st.booleans(), st.booleans()),
        st.tuples(st.just("advance"), st.integers(0, 400)),
        st.tuples(st.just("available"), st.integers(0, 4)),
        st.tuples(st.just("state"), st.integers(0, 4), st.sampled_from(["busy", "wrap_up", "paused", "offline"])),
        st.tuples(st.sampled_from(["answer", "no_answer", "reclassify"]), st.integers(0, 9)),
        st.tuples(st.just("freeze"), st.integers(0, 4)),
        st.tuples(st.sampled_from(["dispatch", "dispatch", "escalate"])),
    ),
    max_size=60,
)


def qualified_oracle(agent: Agent, call: CallRequest, rules: RoutingRules, when: datetime) -> bool:
    """The hard requirement restated independently of the code under test."""
    if agent.frozen:
        return False
    for group in rules.rule(call.category).required:
        if not any(
            c.kind in group
            and c.status == "active"
            and c.verified_at is not None
            and c.verified_at <= when
            and c.valid_from <= when < c.valid_until
            for c in agent.credentials
        ):
            return False
    return True


def skill_oracle(agent: Agent, call: CallRequest, rules: RoutingRules, when: datetime) -> bool:
    """The skill expression of the step in force after the call's wait, restated independently."""
    waited = (when - call.enqueued_at).total_seconds()
    elapsed = 0.0
    for step in rules.rule(call.category).steps:
        if step.expire_after is None or waited < elapsed + step.expire_after:
            return step.match.skill is None or agent.skills.get(step.match.skill, 0) >= step.match.min
        elapsed += step.expire_after
    raise AssertionError("the last step never expires")


@dataclass
class Run:
    d: Dispatcher
    now: datetime = T0
    enqueued: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    assignments: int = 0

    def available(self) -> list[Agent]:
        return [a for a in self.d.agents() if self.d.status(a.id).state == "available"]

    def check_reservations(self) -> None:
        ringing = self.d.ringing()
        assert len(set(ringing.values())) == len(ringing), "an agent is reserved twice"
        ringing_agents = {a.id for a in self.d.agents() if self.d.status(a.id).state == "ringing"}
        assert ringing_agents == set(ringing.values())
        order = self.d.waiting(self.now)
        assert [self.d.position(c.call_id, self.now) for c in order] == list(range(1, len(order) + 1))
        waiting = {c.call_id for c in order}
        assert not waiting & set(ringing)
        accounted = [waiting, set(ringing), self.answered, self.removed]
        assert sum(len(s) for s in accounted) == len(self.enqueued), "a call was lost or duplicated"
        assert set().union(*accounted) == self.enqueued

    def reference_choice(self) -> tuple[str, str] | None:
        """The definition of the next decision, by brute force: the whole queue in order of service, each call
        against the available agents, longest idle first (the dispatcher uses an index instead)."""
        free = sorted(self.available(), key=lambda a: (self.d.status(a.id).since, a.id))
        for call in self.d.waiting(self.now):
            for agent in free:
                if eligible(agent, call, self.d.rules, self.now):
                    return call.call_id, agent.id
        return None

    def dispatch(self) -> None:
        while True:
            free_before = self.available()
            expected = self.reference_choice()
            a = self.d.next_assignment(self.now)
            assert (None if a is None else (a.call.call_id, a.agent_id)) == expected
            if a is None:
                break
            self.assignments += 1
            agent = self.d.agent(a.agent_id)
            # (a) never an agent without the required valid verified credentials, never a frozen one
            assert qualified_oracle(agent, a.call, self.d.rules, self.now)
            assert eligible(agent, a.call, self.d.rules, self.now)
            assert skill_oracle(agent, a.call, self.d.rules, self.now)
            assert agent.id in {f.id for f in free_before}
            # (c) no emergency left waiting that an available agent could have taken instead of a normal call
            if a.call.priority == "normal":
                for waiting in self.d.waiting(self.now):
                    if waiting.priority == "emergency":
                        assert not any(eligible(f, waiting, self.d.rules, self.now) for f in free_before)
            self.check_reservations()  # (b)
        # work conserving: whatever still waits has no eligible available agent
        for call in self.d.waiting(self.now):
            assert not any(eligible(f, call, self.d.rules, self.now) for f in self.available())
            assert self.d.why_waiting(call.call_id, self.now) in (
                "no_qualified_agent",
                "no_agent_with_skill",
                "no_eligible_agent_available",
            )

    def apply(self, op: Op, agents: list[Agent]) -> None:
        d = self.d
        ringing = sorted(d.ringing().items())
        waiting = sorted(c.call_id for c in d.waiting(self.now))
        match op:
            case ("enqueue", category, urgent, callback):
                call_id = f"c{len(self.enqueued)}"
                priority: CallPriority = "emergency" if urgent and category == "emergency" else "normal"
                d.enqueue(CallRequest(call_id, category, priority, self.now, callback))
                self.enqueued.add(call_id)
            case ("advance", seconds):
                self.now += timedelta(seconds=seconds)
            case ("available", i):
                d.agent_available(agents[i % len(agents)].id, self.now)
            case ("state", i, state):
                d.agent_state(agents[i % len(agents)].id, state, self.now)
            case ("answer", k) if ringing:
                call_id, agent_id = ringing[k % len(ringing)]
                d.answered(call_id, agent_id, self.now)
                self.answered.add(call_id)
            case ("no_answer", k) if ringing:
                call_id, agent_id = ringing[k % len(ringing)]
                d.ring_no_answer(call_id, agent_id, self.now)
                assert d.status(agent_id).reason == "no answer"
                assert call_id in {c.call_id for c in d.waiting(self.now)}
            case ("reclassify", k) if waiting:
                d.reclassify(waiting[k % len(waiting)], "emergency", "emergency")
                emergency_first = d.waiting(self.now)[0]
                assert emergency_first.priority == "emergency"
            case ("freeze", i):
                d.freeze(agents[i % len(agents)].id)
            case ("dispatch",):
                self.dispatch()
            case ("escalate",):
                for due in d.escalations(self.now):
                    assert self.now - due.call.enqueued_at >= timedelta(seconds=due.rule.after)
                    assert d.remove(due.call.call_id, self.now) is not None
                    self.removed.add(due.call.call_id)
            case _:
                pass
        self.check_reservations()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agents=agent_lists(), stream=ops)
def test_dispatch_properties(agents: list[Agent], stream: list[Op]) -> None:
    d = Dispatcher(DEFAULT_RULES)
    for a in agents:
        d.add_agent(a, T0, "available")
    run = Run(d)
    for op in stream:
        run.apply(op, agents)
    run.dispatch()

    # (d) eventually: time moves past every skill step (the longest lasts 60 s) and every agent frees up, again and
    # again at that moment. Each call ends up assigned, past its escalation time, or waiting because no agent holds
    # the credentials it needs then.
    run.now += timedelta(seconds=120)
    while True:
        for call_id, agent_id in sorted(d.ringing().items()):
            d.answered(call_id, agent_id, run.now)
            run.answered.add(call_id)
        for a in d.agents():
            d.agent_available(a.id, run.now)
        before = run.assignments
        run.dispatch()
        if run.assignments == before:
            break
    escalated = {e.call.call_id for e in d.escalations(run.now)}
    for call in d.waiting(run.now):
        qualified_now = [a for a in d.agents() if qualified_oracle(a, call, d.rules, run.now)]
        if call.call_id not in escalated:
            assert not qualified_now
            assert d.why_waiting(call.call_id, run.now) == "no_qualified_agent"
    run.check_reservations()


@settings(max_examples=100, deadline=None)
@given(
    waits=st.lists(st.integers(0, 10_000), min_size=1, max_size=8),
    emergency_wait=st.integers(0, 10),
    callback=st.booleans(),
)
def test_aging_never_lifts_a_normal_call_above_an_emergency(
    waits: list[int], emergency_wait: int, callback: bool
) -> None:
    d = dispatcher(make_agent("doc", "physician_license", skills={"emergency_triage": 5}), available_at=20_000)
    for i, w in enumerate(waits):
        d.enqueue(make_call(f"n{i}", CONSULT_CATEGORIES[1 + i % 6], 20_000 - w, callback=callback))
    d.enqueue(make_call("e", "emergency", 20_000 - emergency_wait, "emergency"))
    assert assign(d, 20_000).call.call_id == "e"


# Steps that do not nest (cardiology, then pharmacology, then anyone): a younger call at an earlier step may be
# servable when the oldest call of its category is not, so the dispatcher's index must consider both.
UNNESTED = RoutingRules(
    categories={
        **DEFAULT_RULES.categories,
        "general": CategoryRule(
            steps=[
                Step(match=SkillExpr(skill="cardiology", min=3), expire_after=10),
                Step(match=SkillExpr(skill="pharmacology", min=2), expire_after=10),
                Step(),
            ]
        ),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    skills=st.lists(
        st.fixed_dictionaries({}, optional={"cardiology": st.integers(1, 5), "pharmacology": st.integers(1, 5)}),
        min_size=1,
        max_size=4,
    ),
    arrivals=st.lists(st.tuples(st.floats(0, 8), st.booleans(), st.booleans()), min_size=1, max_size=25),
    checks=st.lists(st.tuples(st.floats(0, 12), st.integers(0, 3)), min_size=1, max_size=8),
)
def test_the_index_decides_like_a_full_sort(
    skills: list[dict[str, int]], arrivals: list[tuple[float, bool, bool]], checks: list[tuple[float, int]]
) -> None:
    """Many calls in one category with non-nested skill steps: the indexed decision and position equal the
    brute-force ones at every moment."""
    agents = [Agent(f"a{i}", f"a{i}", frozenset(), (), s) for i, s in enumerate(skills)]
    d = Dispatcher(UNNESTED)
    for agent in agents:
        d.add_agent(agent, T0)
    run = Run(d)
    for n, (gap, callback, urgent) in enumerate(arrivals):
        run.now += timedelta(seconds=gap)
        category: ConsultCategory = "emergency" if urgent and n % 5 == 0 else "general"
        priority: CallPriority = "emergency" if category == "emergency" else "normal"
        d.enqueue(CallRequest(f"c{n}", category, priority, run.now, callback))
        run.enqueued.add(f"c{n}")
    for gap, agent_index in checks:
        run.now += timedelta(seconds=gap)
        d.agent_available(agents[agent_index % len(agents)].id, run.now)
        run.check_reservations()  # includes position() against the full order
        run.dispatch()  # includes next_assignment() against the brute-force reference
