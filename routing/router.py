"""The routing core, sans I/O: who may take a call, and which call goes to which agent next.

Nothing here reads a clock or touches a socket or database: every method that depends on time takes ``at``.
The telephony side feeds events in (enqueue, agent states, ring results) and acts on what comes out
(:class:`Assignment` to ring, :class:`EscalationDue` to transfer). :meth:`Dispatcher.next_change` says when
the answer of :meth:`Dispatcher.next_assignment` or :meth:`Dispatcher.escalations` may change by time alone.

Order of service: every emergency before every normal call; among emergencies, the longest waiting first;
among normal calls, the highest *effective wait* (seconds waited + the category's ``head_start`` − a delay for
callback requests), which grows with waiting so a normal call cannot starve behind newer ones. A call goes to
the longest-idle eligible available agent. The choice is global: the first call in that order that has an
eligible available agent is served, so an agent never gets a normal call while an emergency they could take
is waiting.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from ground.errors import MedhotlineError
from routing.model import Agent, CallPriority, CallRequest
from routing.rules import EscalationRule, RoutingRules
from telephony.consult import RouteCategory

# The overflow agents' credential kind (``routing.surge``); spelled here so the core needs no surge import.
VOLUNTEER_KIND = "surge_volunteer"

__all__ = [
    "AgentState",
    "AgentStatus",
    "Assignment",
    "Dispatcher",
    "EscalationDue",
    "RoutingError",
    "WaitReason",
    "eligible",
    "waited_seconds",
]

AgentState = Literal["available", "ringing", "busy", "wrap_up", "paused", "offline"]
WaitReason = Literal["no_qualified_agent", "no_agent_with_skill", "no_eligible_agent_available", "assignable"]


class RoutingError(MedhotlineError):
    """An event that does not fit the dispatcher's state (unknown call or agent, wrong agent for a ring)."""


def waited_seconds(call: CallRequest, at: datetime) -> float:
    return max(0.0, (at - call.enqueued_at).total_seconds())


def qualified(
    agent: Agent, call: CallRequest, rules: RoutingRules, at: datetime, volunteers: frozenset[str] = frozenset()
) -> bool:
    """The hard requirement only: not frozen and every required group met by a valid verified credential.

    An overflow agent (a valid ``surge_volunteer`` credential) takes only the categories in ``volunteers``, the
    ones surge mode allows them now (empty outside surge mode: they take nothing).
    """
    if agent.frozen:
        return False
    kinds = agent.valid_credential_kinds(at)
    if VOLUNTEER_KIND in kinds and call.category not in volunteers:
        return False
    return rules.rule(call.category).credentials_satisfied(kinds)


def eligible(
    agent: Agent, call: CallRequest, rules: RoutingRules, at: datetime, volunteers: frozenset[str] = frozenset()
) -> bool:
    """May ``agent`` take ``call`` at ``at``: qualified, and meets the skill step in force for the call's wait."""
    if not qualified(agent, call, rules, at, volunteers):
        return False
    rule = rules.rule(call.category)
    return rule.steps[rule.step_index(waited_seconds(call, at))].match.matches(agent.skills)


@dataclass(frozen=True, slots=True)
class AgentStatus:
    state: AgentState
    since: datetime
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    """Ring ``endpoint`` for ``call``; the agent is reserved (ringing) until answered, no answer, or removal."""

    call: CallRequest
    agent_id: str
    endpoint: str
    step: int
    at: datetime


@dataclass(frozen=True, slots=True)
class EscalationDue:
    call: CallRequest
    rule: EscalationRule
    due_at: datetime


class Dispatcher:
    def __init__(self, rules: RoutingRules, *, callback_delay: float = 120.0) -> None:
        self.rules = rules
        self.callback_delay = callback_delay
        self._agents: dict[str, Agent] = {}
        self._status: dict[str, AgentStatus] = {}
        self._waiting: dict[str, CallRequest] = {}
        # The waiting calls again, in one list per (priority, category, callback) sorted by arrival. Within one
        # list the order of service is the order of arrival (effective wait differs only by waiting time), so a
        # decision needs the head of each list's run per skill step, not a sort of every waiting call.
        self._lists: dict[_ListKey, list[tuple[datetime, str]]] = {}
        self._ringing: dict[str, tuple[CallRequest, str]] = {}  # call id → (call, agent id)
        # Surge mode: the categories overflow agents may take now (empty: none, surge mode is off), and whether
        # they go first for those categories so that clinicians stay free for clinical calls.
        self.volunteers: frozenset[str] = frozenset()

    # -- agents -----------------------------------------------------------------------------------------
    def add_agent(self, agent: Agent, at: datetime, state: AgentState = "offline") -> None:
        if agent.id in self._agents:
            raise RoutingError(f"agent {agent.id} is already known")
        if state == "ringing":
            raise RoutingError("an agent only rings through an assignment")
        self._agents[agent.id] = agent
        self._status[agent.id] = AgentStatus(state, at)

    def update_agent(self, agent: Agent) -> None:
        """New credentials, skills or endpoint for a known agent; the state is kept."""
        self._require_agent(agent.id)
        self._agents[agent.id] = agent

    def agent(self, agent_id: str) -> Agent:
        return self._require_agent(agent_id)

    def status(self, agent_id: str) -> AgentStatus:
        self._require_agent(agent_id)
        return self._status[agent_id]

    def agents(self) -> list[Agent]:
        return list(self._agents.values())

    def freeze(self, agent_id: str) -> str | None:
        """Never route to this agent again (until :meth:`update_agent` says otherwise).

        A call ringing this agent goes back to its place and its id is returned, so the caller can stop the ring;
        the agent is then paused with reason "frozen".
        """
        agent = self._require_agent(agent_id)
        self._agents[agent_id] = dataclasses.replace(agent, frozen=True)
        released = self._release_ringing(agent_id)
        if released is not None:
            self._status[agent_id] = AgentStatus("paused", self._status[agent_id].since, "frozen")
        return released

    def agent_available(self, agent_id: str, at: datetime) -> None:
        self.agent_state(agent_id, "available", at)

    def agent_state(self, agent_id: str, state: AgentState, at: datetime, reason: str | None = None) -> None:
        """The agent's state as the phone system reports it. Leaving ``ringing`` returns the call to its place."""
        self._require_agent(agent_id)
        if state == "ringing":
            raise RoutingError("an agent only rings through an assignment")
        self._release_ringing(agent_id)
        current = self._status[agent_id]
        if current.state == state and current.reason == reason:
            return  # keep `since`: a repeated "available" must not reset idle time
        self._status[agent_id] = AgentStatus(state, at, reason)

    # -- calls ------------------------------------------------------------------------------------------
    def enqueue(self, call: CallRequest) -> None:
        if call.call_id in self._waiting or call.call_id in self._ringing:
            raise RoutingError(f"call {call.call_id} is already queued")
        self._wait_add(call)

    def reclassify(self, call_id: str, category: RouteCategory, priority: CallPriority) -> CallRequest:
        """New category and priority for a waiting call; it keeps its place (``enqueued_at``)."""
        call = self._waiting.get(call_id)
        if call is None:
            raise RoutingError(f"call {call_id} is not waiting")
        self._wait_pop(call_id)
        call = dataclasses.replace(call, category=category, priority=priority)
        self._wait_add(call)
        return call

    def remove(self, call_id: str, at: datetime) -> CallRequest | None:
        """The call left the queue (hang-up, escalated, answered elsewhere); a ringing agent becomes available."""
        call = self._wait_pop(call_id)
        if call is not None:
            return call
        ringing = self._ringing.pop(call_id, None)
        if ringing is None:
            return None
        call, agent_id = ringing
        self._status[agent_id] = AgentStatus("available", at)
        return call

    def answered(self, call_id: str, agent_id: str, at: datetime) -> CallRequest:
        call = self._take_ringing(call_id, agent_id)
        self._status[agent_id] = AgentStatus("busy", at)
        return call

    def ring_no_answer(self, call_id: str, agent_id: str, at: datetime) -> None:
        """The agent did not pick up: pause them ("no answer") and put the call back in its place."""
        call = self._take_ringing(call_id, agent_id)
        self._status[agent_id] = AgentStatus("paused", at, "no answer")
        self._wait_add(call)

    def reservation_refused(self, call_id: str, agent_id: str, at: datetime) -> None:
        """The shared reservation of the agent failed (another node holds them, or their credentials changed in
        the database since the last refresh): the call goes back to its place and the agent counts as busy until
        the next refresh of agent states says otherwise."""
        call = self._take_ringing(call_id, agent_id)
        self._status[agent_id] = AgentStatus("busy", at, "reserved elsewhere")
        self._wait_add(call)

    def assign(self, call_id: str, agent_id: str, at: datetime) -> Assignment:
        """Another node reserved ``agent_id`` for this waiting call (the cluster queue): it rings them now."""
        agent = self._require_agent(agent_id)
        call = self._waiting.get(call_id)
        if call is None:
            raise RoutingError(f"call {call_id} is not waiting")
        self._release_ringing(agent_id)
        self._wait_pop(call_id)
        self._ringing[call_id] = (call, agent_id)
        self._status[agent_id] = AgentStatus("ringing", at)
        step = self.rules.rule(call.category).step_index(waited_seconds(call, at))
        return Assignment(call, agent_id, agent.endpoint, step, at)

    def waiting_emergencies(self) -> list[str]:
        """Ids of the waiting emergency calls (what a claim of a normal call declares it has considered)."""
        return [call_id for call_id, call in self._waiting.items() if call.priority == "emergency"]

    def is_waiting(self, call_id: str) -> bool:
        return call_id in self._waiting

    def is_ringing(self, call_id: str) -> bool:
        """An agent is reserved for this call (its phone rings, or is about to)."""
        return call_id in self._ringing

    def position(self, call_id: str, at: datetime) -> int | None:
        """1 for the next call to be served, None if the call is not waiting (ringing, gone).

        Counted per list with a binary search (no sort of the whole queue): callers hear it every half minute.
        """
        call = self._waiting.get(call_id)
        if call is None:
            return None
        mine = self._rank(call, at)
        ahead = 0
        for calls in self._lists.values():
            if not calls:
                continue
            # Within a list rank grows with arrival: find how many of its calls rank before this one.
            lo, hi = 0, len(calls)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._rank(self._waiting[calls[mid][1]], at) < mine:
                    lo = mid + 1
                else:
                    hi = mid
            ahead += lo
        return ahead + 1

    def waiting(self, at: datetime) -> list[CallRequest]:
        """Waiting calls in order of service at ``at``."""
        return sorted(self._waiting.values(), key=lambda c: self._rank(c, at))

    def ringing(self) -> dict[str, str]:
        """Call id → agent id of every outstanding reservation."""
        return {call_id: agent_id for call_id, (_, agent_id) in self._ringing.items()}

    # -- decisions --------------------------------------------------------------------------------------
    def effective_wait(self, call: CallRequest, at: datetime) -> float:
        """Seconds of waiting credit; only compared between calls of the same priority."""
        score = waited_seconds(call, at)
        if call.priority == "normal":
            score += self.rules.rule(call.category).head_start
            if call.callback:
                score -= self.callback_delay
        return score

    def next_assignment(self, at: datetime) -> Assignment | None:
        """The next call to ring and its agent, who is reserved (ringing); None if nothing can be assigned."""
        available = sorted(
            (a for a in self._agents.values() if self._status[a.id].state == "available"),
            key=lambda a: (self._status[a.id].since, a.id),
        )
        if not available:
            return None
        for call in sorted(self._candidates(at), key=lambda c: self._rank(c, at)):
            for agent in self._preferred(available, call, at):
                if eligible(agent, call, self.rules, at, self.volunteers):
                    self._wait_pop(call.call_id)
                    self._ringing[call.call_id] = (call, agent.id)
                    self._status[agent.id] = AgentStatus("ringing", at)
                    rule = self.rules.rule(call.category)
                    step = rule.step_index(waited_seconds(call, at))
                    return Assignment(call, agent.id, agent.endpoint, step, at)
        return None

    def _candidates(self, at: datetime) -> list[CallRequest]:
        """The calls that can be served next: in each list, the oldest call at each skill step.

        Calls of one list at one step need the same credentials and skills, so if the oldest of them can't be
        served, none of them can; and the oldest goes first among them. About (lists x steps) calls, however
        long the queue.
        """
        found: list[CallRequest] = []
        for (_, category, _), calls in self._lists.items():
            if not calls:
                continue
            rule = self.rules.rule(category)
            seen_steps: set[int] = set()
            # Steps only widen with waiting: walk from the oldest call, jumping to where the next step starts.
            index = 0
            while index < len(calls):
                call = self._waiting[calls[index][1]]
                step = rule.step_index(waited_seconds(call, at))
                if step not in seen_steps:
                    seen_steps.add(step)
                    found.append(call)
                if step == 0:
                    break
                # The first call (by arrival) still at a lower step: waited less than this step's start.
                start = rule.step_ends(step - 1) or 0.0
                lowest = index + 1
                index = bisect.bisect_right(calls, (at - timedelta(seconds=start), "\uffff"), lo=lowest)
                # The datetime bisection and step_index's float seconds can disagree by a rounding: correct both ways.
                while index > lowest and rule.step_index(waited_seconds(self._waiting[calls[index - 1][1]], at)) < step:
                    index -= 1
                while (
                    index < len(calls) and rule.step_index(waited_seconds(self._waiting[calls[index][1]], at)) >= step
                ):
                    index += 1
        return found

    def escalations(self, at: datetime) -> list[EscalationDue]:
        """Waiting calls past their rule's escalation time, most overdue first. They stay queued until removed."""
        due: list[EscalationDue] = []
        for call in self._waiting.values():
            escalation = self.rules.rule(call.category).escalation
            if escalation is None:
                continue
            due_at = call.enqueued_at + timedelta(seconds=escalation.after)
            if due_at <= at:
                due.append(EscalationDue(call, escalation, due_at))
        return sorted(due, key=lambda e: (e.due_at, e.call.call_id))

    def unserved_categories(self, at: datetime) -> set[RouteCategory]:
        """Categories of waiting calls that no known agent may take at all (nobody holds a valid verified
        credential they require, or all who do are frozen): waiting for them is pointless."""
        waiting = {c.category for c in self._waiting.values()}
        agents = list(self._agents.values())
        return {category for category in waiting if not any(self._may_serve(a, category, at) for a in agents)}

    def why_waiting(self, call_id: str, at: datetime) -> WaitReason | None:
        """Why a waiting call has no agent (None if it is not waiting)."""
        call = self._waiting.get(call_id)
        if call is None:
            return None
        agents = list(self._agents.values())
        if not any(qualified(a, call, self.rules, at, self.volunteers) for a in agents):
            return "no_qualified_agent"
        able = [a for a in agents if eligible(a, call, self.rules, at, self.volunteers)]
        if not able:
            return "no_agent_with_skill"
        if not any(self._status[a.id].state == "available" for a in able):
            return "no_eligible_agent_available"
        return "assignable"

    def next_change(self, at: datetime) -> datetime | None:
        """The next moment after ``at`` when a skill step widens or an escalation falls due, by time alone.

        Credential validity boundaries are not included; re-run the dispatcher when credentials change.
        """
        moments: list[datetime] = []
        for call in self._waiting.values():
            rule = self.rules.rule(call.category)
            ends = rule.step_ends(rule.step_index(waited_seconds(call, at)))
            if ends is not None:
                moments.append(call.enqueued_at + timedelta(seconds=ends))
            if rule.escalation is not None:
                moments.append(call.enqueued_at + timedelta(seconds=rule.escalation.after))
        later = [m for m in moments if m > at]
        return min(later, default=None)

    # -- internals --------------------------------------------------------------------------------------
    def _may_serve(self, agent: Agent, category: RouteCategory, at: datetime) -> bool:
        if agent.frozen:
            return False
        kinds = agent.valid_credential_kinds(at)
        if VOLUNTEER_KIND in kinds and category not in self.volunteers:
            return False
        return self.rules.rule(category).credentials_satisfied(kinds)

    def serving_agents(self, category: RouteCategory, at: datetime) -> int:
        """Agents who may take ``category`` and are logged in (not offline or paused): for wait estimates."""
        return sum(
            1
            for a in self._agents.values()
            if self._status[a.id].state not in ("offline", "paused") and self._may_serve(a, category, at)
        )

    def waiting_by_category(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for call in self._waiting.values():
            if not call.callback:
                counts[call.category] = counts.get(call.category, 0) + 1
        return counts

    def _preferred(self, available: list[Agent], call: CallRequest, at: datetime) -> list[Agent]:
        """Longest idle first; in surge mode, overflow agents before clinicians for the categories they take."""
        if call.category not in self.volunteers:
            return available
        return sorted(available, key=lambda a: VOLUNTEER_KIND not in a.valid_credential_kinds(at))

    def _rank(self, call: CallRequest, at: datetime) -> tuple[int, float, datetime, str]:
        urgency = 0 if call.priority == "emergency" else 1
        return (urgency, -self.effective_wait(call, at), call.enqueued_at, call.call_id)

    def _require_agent(self, agent_id: str) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise RoutingError(f"unknown agent {agent_id}")
        return agent

    def _take_ringing(self, call_id: str, agent_id: str) -> CallRequest:
        ringing = self._ringing.get(call_id)
        if ringing is None or ringing[1] != agent_id:
            raise RoutingError(f"call {call_id} is not ringing agent {agent_id}")
        del self._ringing[call_id]
        return ringing[0]

    def _release_ringing(self, agent_id: str) -> str | None:
        for call_id, (call, ringing_agent) in list(self._ringing.items()):
            if ringing_agent == agent_id:
                del self._ringing[call_id]
                self._wait_add(call)
                return call_id
        return None

    def _wait_add(self, call: CallRequest) -> None:
        self._waiting[call.call_id] = call
        bisect.insort(self._lists.setdefault(_list_key(call), []), (call.enqueued_at, call.call_id))

    def _wait_pop(self, call_id: str) -> CallRequest | None:
        call = self._waiting.pop(call_id, None)
        if call is not None:
            calls = self._lists[_list_key(call)]
            del calls[bisect.bisect_left(calls, (call.enqueued_at, call.call_id))]
        return call


_ListKey = tuple[CallPriority, RouteCategory, bool]


def _list_key(call: CallRequest) -> _ListKey:
    return (call.priority, call.category, call.callback)
