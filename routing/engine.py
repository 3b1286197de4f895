"""The routing engine of one service node: the dispatcher kept in step with the shared agent table.

Each node has its own :class:`~routing.router.Dispatcher` over its own waiting calls and a view of every agent.
The agents' cluster-wide state (frozen, paused, reserved by which call) lives in the database; this engine
refreshes its view every ``refresh_interval`` and before each decision it reserves the chosen agent in the
database (:meth:`AgentDirectory.reserve`, atomic, with the credential check done again at that moment). A refused
reservation (another node was faster, or a licence was revoked a moment ago) puts the call back in its place.

The engine knows nothing of telephony. A waiting call gets a :class:`Ticket`; the telephony side reads
:class:`Offer` (ring this agent) and :class:`Escalate` (give up waiting) from it and reports back what happened:
:meth:`RoutingEngine.answered`, :meth:`RoutingEngine.no_answer`, :meth:`RoutingEngine.finished`,
:meth:`RoutingEngine.abandon`. A freeze that hits an agent while they ring cancels that ring through the
ticket (:class:`CancelRing`).

State that belongs to this node's calls (ringing, busy, wrap-up) is owned here; the database holds the
reservation for the whole time, wrap-up included, so no other node rings an agent who is still writing notes.

With a :class:`ClusterLink` (several nodes, docs/cluster.md) the dispatcher's waiting calls are those of the whole
cluster: this node publishes its own to the cluster queue and mirrors the others' on every refresh. Whichever node
chooses a call claims it (``routing.cluster.ClusterStore.claim``: agent reserved, ring recorded, row offered, in one
transaction), and the node holding the caller picks the offer up on its next refresh and dials. Everything is done
under this node's lease (``routing.lease``); once the lease is lost the engine dispatches nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from ground.db import DatabaseUnavailable, WouldWait
from ground.db_retry import RETRY_SECONDS, while_unavailable
from ground.leases import LeaseLost
from ground.logs import get_logger
from routing.callbacks import estimated_wait
from routing.cluster import ClaimRefused, QueuedView
from routing.lease import LeaseKeeper
from routing.model import Agent, CallPriority, CallRequest
from routing.router import VOLUNTEER_KIND, Assignment, Dispatcher, RoutingError
from routing.rules import EscalationRule, RoutingRules

log = get_logger(__name__)
_T = TypeVar("_T")

RingOutcome = Literal["answered", "no_answer", "caller_gone", "released", "failed"]
NO_ANSWER = "no answer"
UNREACHABLE = "unreachable"
NOT_REGISTERED = "not registered"


class AgentSnapshot(Protocol):
    """What the engine reads of one agent (``routing.store.AgentView`` has these and more)."""

    @property
    def agent(self) -> Agent: ...
    @property
    def paused_reason(self) -> str | None: ...
    @property
    def reserved_call_id(self) -> str | None: ...


class AgentDirectory(Protocol):
    """The shared agent table (``routing.store.AgentStore``); synchronous, called through a thread (except
    ``reserve_ring(..., wait=False)``, which answers at once or raises WouldWait)."""

    def routing_snapshot(self) -> Sequence[AgentSnapshot]: ...
    def reserve(
        self,
        account_id: str,
        call_id: str,
        node: str,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
    ) -> bool: ...
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
    ) -> int | None: ...
    def release(self, account_id: str, call_id: str) -> bool: ...
    def release_node(self, node: str) -> int: ...
    def pause(self, account_id: str, reason: str, at: datetime) -> None: ...
    def unpause(self, account_id: str, at: datetime) -> None: ...
    def record_ring(self, call_id: str, account_id: str, node: str, at: datetime) -> int: ...
    def finish_ring(self, ring_id: int, outcome: RingOutcome, at: datetime) -> None: ...


class PresenceRecorder(Protocol):
    """Where the phones' presence is recorded for the wallboard (``routing.store.AgentStore.set_presence``)."""

    def set_presence(self, endpoint: str, reason: str | None, at: datetime) -> bool: ...


class ClusterQueue(Protocol):
    """The cluster-wide queue (``routing.cluster.ClusterStore``); synchronous, called through a thread."""

    def publish(self, request: CallRequest, node: str, epoch: int) -> None: ...
    def withdraw(self, call_id: str) -> bool: ...
    def requeue(self, call_id: str) -> bool: ...
    def reclassify(self, call_id: str, category: str, priority: CallPriority) -> bool: ...
    def queue_view(self, node: str) -> Sequence[QueuedView]: ...
    def claim(  # noqa: PLR0917
        self,
        call: QueuedView,
        agent_id: str,
        node: str,
        epoch: int,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
        known_emergencies: Sequence[str] = (),
    ) -> int | ClaimRefused: ...


@dataclass(frozen=True, slots=True)
class ClusterLink:
    """What makes an engine one of several nodes: the shared queue and this node's lease."""

    queue: ClusterQueue
    lease: LeaseKeeper


@dataclass(frozen=True, slots=True)
class Offer:
    """Ring ``assignment.endpoint`` for this call; the agent is reserved for it in the database."""

    assignment: Assignment
    ring_id: int


@dataclass(frozen=True, slots=True)
class Escalate:
    """Stop waiting: the call waited past its rule's escalation time (``waited``), or no agent in the table may
    take its category at all (``no_qualified_agent``). ``rule`` is None when the category has no escalation."""

    rule: EscalationRule | None
    reason: Literal["waited", "no_qualified_agent"] = "waited"


@dataclass(frozen=True, slots=True)
class CancelRing:
    """Stop ringing ``agent_id`` (frozen meanwhile); the call is back in its place."""

    agent_id: str


TicketItem = Offer | Escalate | CancelRing


@dataclass
class Ticket:
    """A waiting call's mailbox from the engine."""

    request: CallRequest
    items: asyncio.Queue[TicketItem] = field(default_factory=asyncio.Queue)
    escalated: bool = False


@dataclass(frozen=True, slots=True)
class EngineSettings:
    node: str
    refresh_interval: float = 0.5
    wrap_up: float = 10.0
    # An agent who let a call ring out is paused so the next caller doesn't ring them again at once; agents have
    # only a SIP phone (no desktop to press "ready"), so the pause lifts by itself after this long.
    no_answer_pause: float = 60.0
    # An agent whose phone could not be reached at all (not registered, network) is retried after this long.
    unreachable_retry: float = 30.0
    # Seconds of waiting credit a callback gives up against live callers; 0 keeps the caller's place exactly.
    callback_delay: float = 0.0
    # How long a write that must happen (a release, a ring's end, a pause) is retried while no writable database
    # primary answers (a failover, docs/cluster.md); a promotion takes seconds.
    write_retry: float = RETRY_SECONDS


def _now() -> datetime:
    return datetime.now(UTC)


class RoutingEngine:
    def __init__(
        self,
        directory: AgentDirectory,
        rules: RoutingRules,
        settings: EngineSettings,
        *,
        clock: Callable[[], datetime] = _now,
        cluster: ClusterLink | None = None,
        presence: PresenceRecorder | None = None,
    ) -> None:
        self.directory = directory
        self.presence = presence
        self.cluster = cluster
        self.rules = rules
        self.settings = settings
        self.dispatcher = Dispatcher(rules, callback_delay=settings.callback_delay)
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}
        self._held: dict[str, str] = {}  # agent id → call id this node holds them for (ring, talk, wrap-up)
        self._rings: dict[str, tuple[str, int]] = {}  # call id → (agent id, ring id) while ringing
        self._unreachable: dict[str, datetime] = {}  # agent id → when to try again
        self._offline_endpoints: set[str] = set()
        # Endpoint → offline reason this node last recorded (None: online); a repeated report writes nothing.
        self._presence: dict[str, str | None] = {}
        self._presence_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._timers: set[asyncio.Task[None]] = set()
        # The agent table as last read, for whoever else needs it (the sandbox's endpoint file): no second query.
        self.snapshot: Sequence[AgentSnapshot] = ()
        self.refreshed = asyncio.Event()
        # Cluster mode: other nodes' waiting calls in this dispatcher, writes to the cluster queue not yet done (in
        # order), and whether a claim found the queue changed so that it must be read again before deciding.
        self._foreign: dict[str, QueuedView] = {}
        self._writes: list[Callable[[], object]] = []
        self._writing = asyncio.Lock()
        self._reread = False
        self._lease_task: asyncio.Task[None] | None = None
        self._idle_logged = False
        if cluster is not None:
            cluster.lease.on_change(self._wake.set)

    # -- the telephony side -------------------------------------------------------------------------
    def enqueue(self, request: CallRequest) -> Ticket:
        self.dispatcher.enqueue(request)
        ticket = Ticket(request)
        self._tickets[request.call_id] = ticket
        if self.cluster is not None:
            self._writes.append(functools.partial(self._publish, request))
        log.info("routing.queued", category=request.category, priority=request.priority)
        self._wake.set()
        return ticket

    def reclassify_emergency(self, call_id: str) -> bool:
        """The waiting caller says it is an emergency (the emergency key): it jumps ahead at once, keeping its
        arrival time. False when the call is not waiting (an agent is already ringing) or already an emergency."""
        if call_id not in self._tickets or not self.dispatcher.is_waiting(call_id):
            return False
        current = next(c for c in self.dispatcher.waiting(self._clock()) if c.call_id == call_id)
        if current.priority == "emergency":
            return False
        self.dispatcher.reclassify(call_id, "emergency", "emergency")
        if self.cluster is not None:
            self._writes.append(functools.partial(self.cluster.queue.reclassify, call_id, "emergency", "emergency"))
        log.warning("routing.reclassified", old_category=current.category, category="emergency")
        self._wake.set()
        return True

    def reserving(self, call_id: str) -> bool:
        """True while an agent is reserved (or being reserved) to ring for this call."""
        return self.dispatcher.is_ringing(call_id)

    def position(self, call_id: str) -> int | None:
        return self.dispatcher.position(call_id, self._clock())

    def estimate(self, call_id: str, handle_seconds: float) -> tuple[int, float | None] | None:
        """(position, estimated seconds to wait) of a waiting call; None when it is not waiting.

        The estimate counts the agents who may take its category and are logged in (see
        ``routing.callbacks.estimated_wait``); None for the seconds when nobody could take it now.
        """

        at = self._clock()
        position = self.dispatcher.position(call_id, at)
        ticket = self._tickets.get(call_id)
        if position is None or ticket is None:
            return None
        category = next(
            (c.category for c in self.dispatcher.waiting(at) if c.call_id == call_id), ticket.request.category
        )
        return position, estimated_wait(position, self.dispatcher.serving_agents(category, at), handle_seconds)

    def waiting_by_category(self) -> dict[str, int]:
        """Callers on the line waiting per category (callbacks not counted): surge mode's capacity limits."""
        return self.dispatcher.waiting_by_category()

    def set_volunteers(self, categories: frozenset[str]) -> None:
        """Surge mode on (the categories overflow agents take) or off (empty): effective from the next decision."""
        if categories != self.dispatcher.volunteers:
            log.warning("routing.volunteers", categories=sorted(categories))
        self.dispatcher.volunteers = categories
        self._wake.set()

    def enqueue_callback(self, request: CallRequest) -> Ticket:
        """A callback request enters the order at its original caller's place (``request.enqueued_at``)."""
        if not request.callback:
            raise RoutingError(f"call {request.call_id} is not a callback request")
        return self.enqueue(request)

    def ticket(self, call_id: str) -> Ticket | None:
        """The ticket of a call or callback this node's engine holds."""
        return self._tickets.get(call_id)

    def queued(self) -> set[str]:
        """Ids of the calls and callbacks this node's engine holds (waiting or ringing)."""
        return set(self._tickets)

    def move_to_callback(self, call_id: str, callback_call_id: str) -> CallRequest | None:
        """A waiting caller accepted a callback: their place passes to ``callback_call_id`` (same arrival time).
        None (and nothing changed) when the call is no longer waiting, e.g. an agent rings for it already."""
        if call_id not in self._tickets or not self.dispatcher.is_waiting(call_id):
            return None
        at = self._clock()
        call = self.dispatcher.remove(call_id, at)
        self._tickets.pop(call_id, None)
        if self.cluster is not None:
            self._writes.append(functools.partial(self.cluster.queue.withdraw, call_id))
        if call is None:
            return None
        request = CallRequest(callback_call_id, call.category, call.priority, call.enqueued_at, callback=True)
        self.enqueue_callback(request)
        return request

    def waiting_count(self) -> int:
        return len(self.dispatcher.waiting(self._clock()))

    async def answered(self, call_id: str, agent_id: str) -> None:
        at = self._clock()
        self.dispatcher.answered(call_id, agent_id, at)
        _, ring_id = self._rings.pop(call_id, (agent_id, None))
        self._tickets.pop(call_id, None)
        await self._cluster_write(call_id, "withdraw")
        if ring_id is not None:
            try:
                await asyncio.to_thread(self.directory.finish_ring, ring_id, "answered", at)
            except DatabaseUnavailable:
                # A failover: the caller and the agent are bridged right after this returns and must not wait for
                # a primary; the answer is recorded in the background once one answers.
                self._background("ring answered", self.directory.finish_ring, ring_id, "answered", at)
            except Exception:
                log.exception("routing.database_failed", doing="ring answered")
        log.info("routing.answered", agent=agent_id)

    async def no_answer(self, call_id: str, agent_id: str, *, reachable: bool = True) -> None:
        """The agent's phone rang out (or could not be reached): pause them for a while, the call goes back."""
        at = self._clock()
        self.dispatcher.ring_no_answer(call_id, agent_id, at)
        _, ring_id = self._rings.pop(call_id, (agent_id, None))
        self._held.pop(agent_id, None)
        reason = NO_ANSWER if reachable else UNREACHABLE
        if reachable:
            await self._db("pause after no answer", self.directory.pause, agent_id, NO_ANSWER, at, retry=True)
            self._later(self.settings.no_answer_pause, self._lift_pause, agent_id)
        else:
            self._unreachable[agent_id] = at + timedelta(seconds=self.settings.unreachable_retry)
            self.dispatcher.agent_state(agent_id, "offline", at, UNREACHABLE)
            self._record_presence(self.dispatcher.agent(agent_id).endpoint, UNREACHABLE)
        if ring_id is not None:
            outcome: RingOutcome = "no_answer" if reachable else "failed"
            await self._db("ring ended", self.directory.finish_ring, ring_id, outcome, at, retry=True)
        await self._db("release after no answer", self.directory.release, agent_id, call_id, retry=True)
        await self._cluster_write(call_id, "requeue")
        log.info("routing.no_answer", agent=agent_id, reason=reason)
        self._wake.set()

    async def finished(self, call_id: str, agent_id: str) -> None:
        """The conversation ended: wrap-up, then the agent is free (the reservation is held until then)."""
        self.dispatcher.agent_state(agent_id, "wrap_up", self._clock())
        self._later(self.settings.wrap_up, self._end_wrap_up, agent_id, call_id)

    async def abandon(self, call_id: str) -> None:
        """The call left the queue (caller hung up, escalated, transferred): free whatever it held."""
        at = self._clock()
        self._tickets.pop(call_id, None)
        ring = self._rings.pop(call_id, None)
        with contextlib.suppress(RoutingError):
            self.dispatcher.remove(call_id, at)
        await self._cluster_write(call_id, "withdraw")
        if ring is not None:
            agent_id, ring_id = ring
            self._held.pop(agent_id, None)
            await self._db("ring ended", self.directory.finish_ring, ring_id, "caller_gone", at, retry=True)
            await self._db("release", self.directory.release, agent_id, call_id, retry=True)
        self._wake.set()

    def contact_state(self, endpoint: str, online: bool) -> None:
        """AMI: the agent's phone registered / became reachable (online) or went away."""
        if online:
            self._offline_endpoints.discard(endpoint)
        else:
            self._offline_endpoints.add(endpoint)
        self._record_presence(endpoint, None if online else NOT_REGISTERED)
        self._wake.set()

    def _record_presence(self, endpoint: str, reason: str | None) -> None:
        """Record a change of a phone's presence in the database for the wallboard, by the node that saw it.

        Only a change is written: AMI repeats contact states (re-registrations, qualify), and the wallboard needs
        just the transitions. The first report of an endpoint since start is written (a no-op UPDATE if the
        database agrees), so a state left from before a restart is corrected. Writes go one at a time, each with
        the endpoint's newest reason, so a quick offline → online cannot land in the wrong order.
        """
        if self.presence is None or (endpoint in self._presence and self._presence[endpoint] == reason):
            return
        self._presence[endpoint] = reason
        presence = self.presence

        async def write() -> None:
            async with self._presence_lock:
                newest = self._presence.get(endpoint)
                written = await self._db(
                    "record presence", presence.set_presence, endpoint, newest, self._clock(), retry=True
                )
                if written is None and self._presence.get(endpoint) == newest:
                    self._presence.pop(endpoint, None)  # failed: the next report tries again

        task = asyncio.create_task(write())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        if self.cluster is None:
            released = await self._db(
                "release this node's stale reservations", self.directory.release_node, self.settings.node
            )
            if released:
                log.warning("routing.stale_reservations_released", count=released)
        else:
            # The lease's acquisition cleans up what an earlier process under this name left (routing.cluster).
            if self.cluster.lease.epoch is None:
                await self.cluster.lease.acquire()
            self._lease_task = asyncio.create_task(self.cluster.lease.keep())
        try:
            await self._loop()
        finally:
            if self._lease_task is not None:
                self._lease_task.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_due = loop.time()
        while True:
            try:
                if loop.time() >= refresh_due or self._reread:
                    self._reread = False
                    refresh_due = loop.time() + self.settings.refresh_interval
                    await self.step()
                else:
                    # Woken between refreshes (a call arrived, an agent came free): decide at once on the view of
                    # the agents read at most refresh_interval ago. That is safe because the reservation checks
                    # paused, frozen, held and credentials again in the database; a stale view costs at most a
                    # refused reservation, never a wrong ring. The new call skips a read of the whole table.
                    await self.decide()
            except DatabaseUnavailable as exc:
                # A failover: the next refresh tries again; one line, not a traceback every refresh interval.
                log.warning("routing.step_unavailable", reason=str(exc))
            except Exception:
                log.exception("routing.step_failed")
            timeout = max(0.0, refresh_due - loop.time())
            change = self.dispatcher.next_change(self._clock())
            if change is not None:
                timeout = max(0.01, min(timeout, (change - self._clock()).total_seconds()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def step(self) -> None:
        """One refresh of agent states from the database, then every assignment and escalation now due."""
        views = await asyncio.to_thread(self.directory.routing_snapshot)
        self._apply(views, self._clock())
        if self.cluster is not None and self.cluster.lease.live:
            await self._flush()
            queue = await asyncio.to_thread(self.cluster.queue.queue_view, self.settings.node)
            self._mirror(queue, self._clock())
        self.snapshot = views
        self.refreshed.set()
        await self.decide()

    async def decide(self) -> None:
        """Every assignment and escalation now due, on the agent states as last read."""
        await self._assign()
        self._escalate()

    def close(self) -> None:
        for task in self._timers:
            task.cancel()
        if self._lease_task is not None:
            self._lease_task.cancel()

    # -- internals ----------------------------------------------------------------------------------
    def _apply(self, views: Sequence[AgentSnapshot], at: datetime) -> None:
        seen: set[str] = set()
        for view in views:
            agent = view.agent
            seen.add(agent.id)
            try:
                old = self.dispatcher.agent(agent.id)
            except RoutingError:
                self.dispatcher.add_agent(agent, at)
                old = agent
            if agent.frozen and not old.frozen:
                cancelled = self.dispatcher.freeze(agent.id)
                log.warning("routing.agent_frozen", agent=agent.id, ring_cancelled=cancelled is not None)
                if cancelled is not None:
                    self._cancel_ring(cancelled, agent.id)
            if agent != self.dispatcher.agent(agent.id):
                self.dispatcher.update_agent(agent)
            if agent.id in self._held:
                continue  # ringing, talking or in wrap-up for one of this node's calls
            state, reason = self._external_state(view, at)
            self.dispatcher.agent_state(agent.id, state, at, reason)
        for agent in self.dispatcher.agents():
            if agent.id not in seen and agent.id not in self._held:
                self.dispatcher.agent_state(agent.id, "offline", at, "removed")

    def _external_state(
        self, view: AgentSnapshot, at: datetime
    ) -> tuple[Literal["available", "busy", "paused", "offline"], str | None]:
        agent = view.agent
        if agent.frozen:
            return "paused", "frozen"
        if view.paused_reason:
            return "paused", view.paused_reason
        if view.reserved_call_id is not None:
            return "busy", None  # another node's call (ours are in _held)
        retry = self._unreachable.get(agent.id)
        if retry is not None:
            if at < retry:
                return "offline", UNREACHABLE
            del self._unreachable[agent.id]
            self._record_presence(agent.endpoint, NOT_REGISTERED if agent.endpoint in self._offline_endpoints else None)
        if agent.endpoint in self._offline_endpoints:
            return "offline", NOT_REGISTERED
        return "available", None

    async def _assign(self) -> None:
        cluster = self.cluster
        if cluster is not None:
            if not cluster.lease.live:
                if cluster.lease.lost and not self._idle_logged:
                    self._idle_logged = True
                    log.error("routing.not_dispatching", node=self.settings.node, reason="lease lost")
                return
            await self._flush()
        while True:
            at = self._clock()
            assignment = self.dispatcher.next_assignment(at)
            if assignment is None:
                return
            call_id, agent_id = assignment.call.call_id, assignment.agent_id
            required = self.rules.rule(assignment.call.category).required
            # Overflow agents take only the categories surge mode allows them: checked again by the database.
            excluded = () if assignment.call.category in self.dispatcher.volunteers else (VOLUNTEER_KIND,)
            refused: ClaimRefused | None = None
            if cluster is None:
                # The reservation and its ring row in one commit: the only database write before the phone rings.
                ring_id = await self._reserve_ring(agent_id, call_id, at, required, excluded)
            else:
                claimed = await self._claim(assignment, required, excluded)
                if call_id in self._foreign:
                    if not self._claimed_for_other_node(call_id, agent_id, claimed):
                        return
                    continue
                ring_id = claimed if isinstance(claimed, int) else None
                refused = claimed if isinstance(claimed, str) else None
            ticket = self._tickets.get(call_id)
            if self.dispatcher.ringing().get(call_id) != agent_id or ticket is None:
                # The caller hung up (or the agent was frozen) while the database answered: the phone never rang.
                if ring_id is not None:
                    outcome: RingOutcome = "caller_gone" if ticket is None else "released"
                    await self._db(
                        "ring ended", self.directory.finish_ring, ring_id, outcome, self._clock(), retry=True
                    )
                    await self._db("release", self.directory.release, agent_id, call_id, retry=True)
                    if ticket is not None:
                        await self._cluster_write(call_id, "requeue")
                with contextlib.suppress(RoutingError):
                    if ticket is None:
                        self.dispatcher.remove(call_id, at)
                continue
            if ring_id is None:
                self.dispatcher.reservation_refused(call_id, agent_id, at)
                log.info("routing.reservation_refused", agent=agent_id, reason=refused)
                if refused in ("call", "emergency", "lease"):
                    # Another node offered this call already, or an emergency arrived that this node has not read
                    # yet: read the cluster queue again before the next decision.
                    self._reread = True
                    self._wake.set()
                    return
                continue
            self._held[agent_id] = call_id
            self._rings[call_id] = (agent_id, ring_id)
            log.info(
                "routing.offer",
                call_id=call_id,
                agent=agent_id,
                step=assignment.step,
                category=assignment.call.category,
            )
            ticket.items.put_nowait(Offer(assignment, ring_id))
            # The call's task dials the agent before this one looks for the next assignment: the ring is on the
            # caller's critical path, the rest of the decisions are not.
            await asyncio.sleep(0)

    # -- the cluster ----------------------------------------------------------------------------------
    async def _claim(
        self, assignment: Assignment, required: Sequence[Sequence[str]], excluded: Sequence[str]
    ) -> int | ClaimRefused | None:
        """The cluster's reservation of the agent for the call, whichever node holds it (None: database failure)."""
        assert self.cluster is not None
        epoch = self.cluster.lease.epoch
        if epoch is None:
            return "lease"
        call = assignment.call
        view = self._foreign.get(call.call_id) or QueuedView(call, self.settings.node, epoch, "waiting", None, None)
        return await self._db(
            "claim a call for an agent",
            functools.partial(
                self.cluster.queue.claim,
                excluded=excluded,
                known_emergencies=self.dispatcher.waiting_emergencies(),
            ),
            view,
            assignment.agent_id,
            self.settings.node,
            epoch,
            assignment.at,
            required,
        )

    def _claimed_for_other_node(self, call_id: str, agent_id: str, claimed: int | ClaimRefused | None) -> bool:
        """After a claim of another node's call: that node dials (on its next refresh), this one forgets the call.
        False when the queue must be read again before deciding more."""
        at = self._clock()
        owner = self._foreign[call_id].node
        if isinstance(claimed, int) or claimed in ("call", "lease"):
            # Offered (their node dials), or gone from the queue (answered elsewhere, hung up, node lost).
            del self._foreign[call_id]
            with contextlib.suppress(RoutingError):
                self.dispatcher.remove(call_id, at)
            if isinstance(claimed, int):
                self.dispatcher.agent_state(agent_id, "busy", at, "reserved elsewhere")
                log.info("routing.offer_for_node", call_id=call_id, agent=agent_id, node=owner)
            return claimed != "lease"
        self.dispatcher.reservation_refused(call_id, agent_id, at)
        if claimed == "emergency":
            self._reread = True
            self._wake.set()
            return False
        return True

    def _mirror(self, queue: Sequence[QueuedView], at: datetime) -> None:
        """The cluster queue as just read: other nodes' waiting calls into the dispatcher (and out of it when they
        left), and offers other nodes made for this node's calls handed to their tickets."""
        seen: set[str] = set()
        for view in queue:
            call_id = view.request.call_id
            if view.node == self.settings.node:
                if view.state == "offered" and call_id not in self._rings:
                    self._pick_up(view, at)
                continue
            if view.state != "waiting":
                continue
            seen.add(call_id)
            known = self._foreign.get(call_id)
            if known is None:
                if not (self.dispatcher.is_waiting(call_id) or self.dispatcher.is_ringing(call_id)):
                    self.dispatcher.enqueue(view.request)
                    self._foreign[call_id] = view
            elif known.request != view.request and self.dispatcher.is_waiting(call_id):
                self.dispatcher.reclassify(call_id, view.request.category, view.request.priority)
                self._foreign[call_id] = view
        for call_id in [c for c in self._foreign if c not in seen]:
            del self._foreign[call_id]
            if self.dispatcher.is_waiting(call_id):
                self.dispatcher.remove(call_id, at)
        # A waiting call of ours missing from the queue (a write lost with a failed commit) is published again.
        mine = {v.request.call_id for v in queue if v.node == self.settings.node}
        for call_id, ticket in self._tickets.items():
            if call_id not in mine and self.dispatcher.is_waiting(call_id) and not self._writes:
                log.warning("routing.cluster_republished", call_id=call_id)
                self._writes.append(functools.partial(self._publish, ticket.request))

    def _pick_up(self, view: QueuedView, at: datetime) -> None:
        """Another node reserved an agent for one of this node's calls: ring them from here."""
        call_id, agent_id, ring_id = view.request.call_id, view.agent_id, view.ring_id
        if agent_id is None or ring_id is None:
            return
        ticket = self._tickets.get(call_id)
        if ticket is None or not self.dispatcher.is_waiting(call_id):
            # The call left meanwhile (its abandon withdraws the row too): undo the reservation.
            self._later(0, self._release_cancelled, agent_id, call_id, str(ring_id))
            return
        try:
            assignment = self.dispatcher.assign(call_id, agent_id, at)
        except RoutingError:
            self._later(0, self._release_cancelled, agent_id, call_id, str(ring_id))
            return
        self._held[agent_id] = call_id
        self._rings[call_id] = (agent_id, ring_id)
        log.info("routing.offer", call_id=call_id, agent=agent_id, step=assignment.step, by="another node")
        ticket.items.put_nowait(Offer(assignment, ring_id))

    def _publish(self, request: CallRequest) -> None:
        assert self.cluster is not None
        epoch = self.cluster.lease.epoch
        if epoch is None or self.cluster.lease.lost:
            raise LeaseLost(f"node {self.settings.node} holds no lease: call {request.call_id} not queued")
        self.cluster.queue.publish(request, self.settings.node, epoch)

    async def _cluster_write(self, call_id: str, what: Literal["withdraw", "requeue"]) -> None:
        if self.cluster is None:
            return
        queue = self.cluster.queue
        self._writes.append(functools.partial(queue.withdraw if what == "withdraw" else queue.requeue, call_id))
        await self._flush()

    async def _flush(self) -> None:
        """The cluster queue writes not yet done, in order. A failed write stays, with those after it, for the next
        flush (a call must not be withdrawn before it was published); on a lost lease they are dropped."""
        async with self._writing:
            while self._writes:
                write = self._writes[0]
                try:
                    await asyncio.to_thread(write)
                except LeaseLost:
                    self._writes.clear()
                    log.error("routing.cluster_write_refused", node=self.settings.node, reason="lease lost")
                    return
                except DatabaseUnavailable as exc:
                    # A failover: kept for the next flush (every refresh); one line, not a traceback each time.
                    log.warning("routing.cluster_write_unavailable", reason=str(exc), pending=len(self._writes))
                    return
                except Exception:
                    log.exception("routing.cluster_write_failed")
                    return
                self._writes.pop(0)

    def _escalate(self) -> None:
        """Nobody waits for ever: escalate calls past their time, and at once those nobody could ever take."""
        at = self._clock()
        for due in self.dispatcher.escalations(at):
            ticket = self._tickets.get(due.call.call_id)
            # A callback waits without anyone on the line: it has nobody to transfer and keeps its place.
            if ticket is not None and not ticket.escalated and not due.call.callback:
                ticket.escalated = True
                log.warning("routing.escalation_due", category=due.call.category, after=due.rule.after)
                ticket.items.put_nowait(Escalate(due.rule))
        unserved = self.dispatcher.unserved_categories(at)
        if not unserved:
            return
        for call in self.dispatcher.waiting(at):
            ticket = self._tickets.get(call.call_id)
            if call.category in unserved and ticket is not None and not ticket.escalated and not call.callback:
                ticket.escalated = True
                log.error("routing.no_qualified_agent", category=call.category)
                ticket.items.put_nowait(Escalate(self.rules.rule(call.category).escalation, "no_qualified_agent"))

    def _cancel_ring(self, call_id: str, agent_id: str) -> None:
        ring = self._rings.pop(call_id, None)
        self._held.pop(agent_id, None)
        ticket = self._tickets.get(call_id)
        if ticket is not None:
            ticket.items.put_nowait(CancelRing(agent_id))
        if ring is not None:
            self._later(0, self._release_cancelled, agent_id, call_id, str(ring[1]))

    async def _release_cancelled(self, agent_id: str, call_id: str, ring_id: str) -> None:
        at = self._clock()
        await self._db("ring ended", self.directory.finish_ring, int(ring_id), "released", at, retry=True)
        await self._db("release", self.directory.release, agent_id, call_id, retry=True)
        if call_id in self._tickets:
            await self._cluster_write(call_id, "requeue")

    async def _end_wrap_up(self, agent_id: str, call_id: str) -> None:
        if self._held.get(agent_id) == call_id:
            del self._held[agent_id]
        await self._db("release after wrap-up", self.directory.release, agent_id, call_id, retry=True)
        with contextlib.suppress(RoutingError):
            self.dispatcher.agent_state(agent_id, "available", self._clock())
        self._wake.set()

    async def _lift_pause(self, agent_id: str) -> None:
        views = await self._db("read agents", self.directory.routing_snapshot, retry=True)
        view = next((v for v in views or () if v.agent.id == agent_id), None)
        # Only the engine's own pause is lifted; a supervisor's pause stays.
        if view is not None and view.paused_reason == NO_ANSWER:
            await self._db("lift no-answer pause", self.directory.unpause, agent_id, self._clock(), retry=True)
        self._wake.set()

    def _later(self, seconds: float, func: Callable[..., Coroutine[Any, Any, None]], *args: str) -> None:
        """Run ``func(*args)`` after ``seconds`` (the coroutine is made only then, so a cancelled timer leaves
        no never-awaited coroutine behind)."""

        async def run() -> None:
            await asyncio.sleep(seconds)
            await func(*args)

        task = asyncio.create_task(run())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    async def _db(self, doing: str, func: Callable[..., _T], *args: object, retry: bool = False) -> _T | None:
        """A database call for routing; a failure is logged and the caller carries on with None (no hang).

        ``retry``: a write that must happen, idempotent under a repeat (a release, a ring's end, a pause), is
        retried while no writable primary answers, for ``write_retry`` seconds (docs/cluster.md). Without it, a
        lost database is logged in one line (no traceback: it is an outage, not a bug) and not retried here.
        """

        def retrying(exc: DatabaseUnavailable, pause: float) -> None:
            log.warning("routing.database_retry", doing=doing, reason=str(exc), pause=pause)

        try:
            if retry:
                return await while_unavailable(func, *args, retry_for=self.settings.write_retry, on_retry=retrying)
            return await asyncio.to_thread(func, *args)
        except DatabaseUnavailable as exc:
            log.error("routing.database_failed", doing=doing, reason=str(exc), retried=retry)
            return None
        except Exception:
            log.exception("routing.database_failed", doing=doing)
            return None

    async def _reserve_ring(
        self, agent_id: str, call_id: str, at: datetime, required: Sequence[Sequence[str]], excluded: Sequence[str]
    ) -> int | None:
        """The reservation and its ring row in one commit: the ring's id, or None (refused, or no database).

        Not retried: the decision it carries may be stale by the time a primary answers again, and the call simply
        stays waiting for the next decision. But a COMMIT cut off by a failover may have been stored: the
        reservation is released (retried, idempotent) before anything else is decided, so the agent is not held
        for a ring that never happens.
        """
        reserve = functools.partial(self.directory.reserve_ring, excluded=excluded)
        try:
            try:
                # On the loop when that cannot wait (SQLite, nobody else writing): the two hops to a worker
                # thread and back were a millisecond of the ring's latency. Else in a thread, as every other
                # database call (docs/performance.md, "Ring latency").
                return reserve(agent_id, call_id, self.settings.node, at, required, wait=False)
            except WouldWait:
                return await asyncio.to_thread(reserve, agent_id, call_id, self.settings.node, at, required)
        except DatabaseUnavailable as exc:
            log.warning("routing.reservation_unavailable", agent=agent_id, reason=str(exc))
            await self._db("release an unsure reservation", self.directory.release, agent_id, call_id, retry=True)
            return None
        except Exception:
            log.exception("routing.database_failed", doing="reserve agent")
            return None

    def _background(self, doing: str, func: Callable[..., object], *args: object) -> None:
        """A write that must happen, retried (``_db``), without holding up the call that caused it."""

        async def write() -> None:
            await self._db(doing, func, *args, retry=True)

        task = asyncio.create_task(write())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
