"""Callbacks in the running service: registering a waiting caller's callback, dialling it when its turn comes.

Registering (:meth:`CallbackService.accept`, the queue's :class:`~routing.ari_queue.CallbackDesk`): the caller's
number is normalised, blind-indexed and encrypted through the key service (the ``callbacks`` data key, associated
data ``callbacks|phone_enc|<id>|<version>``, padded so a token's length does not give the number's away), stored
(one open callback per number: the database refuses a second), and audited (``store``, never the number). Then
the call's place in the engine passes to the callback (same arrival time), so it is served where the caller
would have been, and never ahead of an emergency.

Dialling (:meth:`CallbackService.run`): every second the node's due callbacks enter the engine as callback
requests. The engine reserves an agent for one in the database before anything rings (the same atomic
reservation as for a waiting caller): only then is the callback claimed (pending → dialling), its number
decrypted (audited as a ``read``) and the patient's phone dialled over ARI with the outreach trunk's dial string.
So no more callbacks are dialled at once than agents were free, and none twice. The patient answers: they hear
who calls and wait while the reserved agent's phone rings (:meth:`routing.ari_queue.CallerQueue.serve_callback`).
No answer, busy or unreachable: the agent is released, and the callback is tried again after
``routing.callback_retry_after`` seconds at its place; after ``routing.callback_attempts`` attempts it becomes an
``unreachable`` task for the nurses (its subject is the callback, whose number stays encrypted there).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import structlog
from sqlalchemy.orm import Session, sessionmaker

from compliance.fields import FieldCipherError, normalise_phone
from ground.config import Config
from ground.logs import get_logger
from routing.ari_queue import CallbackOutcome
from routing.callback_store import CallbackRecord, CallbackStore
from routing.callbacks import CallbackPolicy, PendingCallback, due_callbacks, next_attempt
from routing.engine import CancelRing, Escalate, Offer, RoutingEngine, Ticket
from routing.model import CallPriority, CallRequest
from scheduler.policy import failure_outcome
from scheduler.tasks import TaskStore
from telephony.ari_channel import AriCallChannel, AriDispatcher, await_answer
from telephony.ari_client import AriClient, AriError
from telephony.channel import CallerId, CallInfo, ChannelError

if TYPE_CHECKING:
    from compliance.audit import AuditLog, JsonValue
    from compliance.data_keys import DataKeyRing
    from his.directory import PatientServices
    from telephony.consult import RouteCategory

log = get_logger(__name__)

PURPOSE: Final = "callbacks"  # the data key purpose of the callbacks table
TABLE: Final = "callbacks"
COLUMN: Final = "phone_enc"
CHANNEL_PREFIX: Final = "callback-"
# Stasis argument of the patient's leg: the same as outreach calls (a dialled leg, dispatched by channel id).
LEG_ARG: Final = "outbound"
ACTOR: Final = "medhotline"
ROLE: Final = "system"
# Tasks need a patient; a caller the IVR did not identify is named so, and the task's subject is the callback.
UNIDENTIFIED: Final = "unidentified"
DUE_EVERY: Final = 1.0
_PAD_BLOCK: Final = 32
_ANSWER_SLACK: Final = 10.0

# The service's part once the patient answered: (patient leg, engine ticket, the offer of the reserved agent,
# the callback) → the outcome of the call (its own record, the conversation).
ServeAnswered = Callable[[AriCallChannel, Ticket, Offer, CallbackRecord], Awaitable[str]]


def _pad(value: str) -> bytes:
    raw = value.encode("ascii") + b"\x80"
    return raw + bytes(-len(raw) % _PAD_BLOCK)


def _unpad(raw: bytes) -> str:
    return raw.rstrip(b"\x00").removesuffix(b"\x80").decode("ascii")


class CallbackService:
    """One per node: the queue's callback desk and the loop that dials this node's due callbacks."""

    def __init__(  # noqa: PLR0917 - the service's parts, as the outreach dialer takes them
        self,
        config: Config,
        sessions: sessionmaker[Session],
        ari: AriClient,
        dispatcher: AriDispatcher,
        engine: RoutingEngine,
        policy: CallbackPolicy,
        *,
        serve_answered: ServeAnswered,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        self._ari = ari
        self._dispatcher = dispatcher
        self._engine = engine
        self.policy = policy
        self._serve_answered = serve_answered
        self._clock = clock or (lambda: datetime.now(UTC))
        self.store = CallbackStore(sessions)
        self.tasks = TaskStore(sessions)
        self._node = config.service.node_name
        self._ring: DataKeyRing | None = None
        self._indexer: Callable[[str], Awaitable[str]] | None = None
        self._audit: AuditLog | None = None
        # Callback id → the engine's request id (the current attempt's call id) of callbacks in the engine.
        self._active: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watched: set[str] = set()  # callback ids whose engine request has a task serving it
        self._busy: set[asyncio.Task[Any]] = set()  # those past the reservation: dialling or talking

    def patients_ready(self, services: PatientServices) -> None:
        """The key service is reachable: numbers can be encrypted, indexed, decrypted (and audited)."""
        self._ring = services.ring
        self._indexer = services.registry.phone_index
        self._audit = services.audit

    # --- registering --------------------------------------------------------------------------------------------

    async def accept(self, call_id: str, caller: CallerId, request: CallRequest) -> CallbackOutcome:
        """Register a callback for the caller of ``call_id`` at the place of ``request`` (see the module docstring).
        The call's place passes to the callback if the call is in this node's engine, else (a full queue that
        turned it away) the callback enters at the call's arrival time."""
        if self._ring is None or self._indexer is None or self._audit is None:
            log.warning("callback.unavailable", reason="the key service is not connected yet")
            return "unavailable"
        try:
            number = normalise_phone(caller.reveal())
        except FieldCipherError:
            log.warning("callback.unavailable", reason="the caller's number is not a phone number")
            return "unavailable"
        callback_id = str(uuid.uuid4())
        attempt_id = str(uuid.uuid4())
        now = self._clock()
        # Held from before the row exists, so the due loop never puts it into the engine a second time.
        self._active[callback_id] = attempt_id
        try:
            return await self._register(callback_id, attempt_id, call_id, number, request=request, now=now)
        finally:
            if callback_id not in self._watched:
                self._active.pop(callback_id, None)

    async def _register(
        self, callback_id: str, attempt_id: str, call_id: str, number: str, *, request: CallRequest, now: datetime
    ) -> CallbackOutcome:
        assert self._ring is not None
        assert self._indexer is not None
        try:
            index = await self._indexer(number)
            key = await self._ring.current_key(PURPOSE)
            async with self._ring.cipher([key]) as cipher:
                token = cipher.encrypt_bytes(_pad(number), table=TABLE, column=COLUMN, row_id=callback_id)
            created = await asyncio.to_thread(
                self.store.create,
                callback_id=callback_id, call_id=call_id, node=self._node, category=request.category,
                priority=request.priority, requested_at=request.enqueued_at, phone_enc=token, phone_bidx=index,
                data_key_id=key.id, patient_id=None, at=now,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the caller keeps waiting; the reason is logged, never the number
            log.error("callback.not_stored", error=type(exc).__name__)
            return "unavailable"
        if not created:
            log.info("callback.duplicate")
            return "duplicate"
        if not await self._audited("store", callback_id, "callback requested by the caller", {"call": call_id}):
            await asyncio.to_thread(self.store.cancel, callback_id, self._clock())
            return "unavailable"
        ticket = self._engine_request(call_id, attempt_id, request)
        if ticket is None:
            # An agent rings for the call already: it is served now; nothing stays registered.
            await asyncio.to_thread(self.store.cancel, callback_id, self._clock())
            return "unavailable"
        log.info("callback.registered", callback_id=callback_id, category=request.category)
        self._watch(callback_id, ticket)
        return "accepted"

    def _engine_request(self, call_id: str, attempt_id: str, request: CallRequest) -> Ticket | None:
        if call_id in self._engine.queued():
            moved = self._engine.move_to_callback(call_id, attempt_id)
            return None if moved is None else self._engine.ticket(attempt_id)
        return self._engine.enqueue_callback(
            CallRequest(attempt_id, request.category, request.priority, request.enqueued_at, callback=True)
        )

    # --- the loop -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover this node's interrupted attempts, then put due callbacks into the engine every second."""
        recovered = await asyncio.to_thread(self.store.recover, self._node, self._clock())
        if recovered:
            log.warning("callback.recovered", count=len(recovered))
        while True:
            try:
                await self.enqueue_due()
            except Exception:
                log.exception("callback.loop_failed")
            await asyncio.sleep(DUE_EVERY)

    async def enqueue_due(self) -> int:
        pending = await asyncio.to_thread(self.store.pending, self._node)
        now = self._clock()
        views = [PendingCallback(c.id, c.category, c.priority, c.requested_at, c.next_attempt_at) for c in pending]
        due = due_callbacks(views, self._active, now)
        by_id = {c.id: c for c in pending}
        for callback in due:
            record = by_id[callback.id]
            attempt_id = str(uuid.uuid4())
            ticket = self._engine.enqueue_callback(
                CallRequest(
                    attempt_id,
                    cast("RouteCategory", record.category),
                    cast("CallPriority", record.priority),
                    record.requested_at,
                    callback=True,
                )
            )
            self._watch(callback.id, ticket)
        return len(due)

    def _watch(self, callback_id: str, ticket: Ticket) -> None:
        self._active[callback_id] = ticket.request.call_id
        self._watched.add(callback_id)
        task = asyncio.create_task(self._serve(callback_id, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, callback_id: str, ticket: Ticket) -> None:
        """Wait for the engine to reserve an agent for the callback, then dial it."""
        attempt_id = ticket.request.call_id
        with structlog.contextvars.bound_contextvars(callback_id=callback_id, call_id=attempt_id):
            try:
                while True:
                    item = await ticket.items.get()
                    if isinstance(item, Offer):
                        current = asyncio.current_task()
                        if current is not None:
                            self._busy.add(current)
                        try:
                            await self._dial(callback_id, ticket, item)
                        finally:
                            self._busy.discard(current)
                        return
                    if isinstance(item, (Escalate, CancelRing)):
                        continue  # a callback keeps its place; a cancelled reservation comes back as a new offer
            except Exception:
                log.exception("callback.failed")
                await self._engine.abandon(attempt_id)
                with contextlib.suppress(Exception):
                    await self._attempt_failed(callback_id, "failed")
            finally:
                if self._active.get(callback_id) == attempt_id:
                    del self._active[callback_id]
                    self._watched.discard(callback_id)

    async def _dial(self, callback_id: str, ticket: Ticket, offer: Offer) -> None:
        attempt_id = ticket.request.call_id
        agent_id = offer.assignment.agent_id
        if not await asyncio.to_thread(self.store.claim, callback_id, attempt_id, agent_id, self._clock()):
            log.info("callback.not_pending")  # cancelled meanwhile: free the agent
            await self._engine.abandon(attempt_id)
            return
        number = await self._number(callback_id)
        oc = self._config.outreach
        channel_id = f"{CHANNEL_PREFIX}{attempt_id}"
        leg = AriCallChannel(self._ari, CallInfo(channel_id, "callback", "ari", "", ""))
        self._dispatcher.register(leg)
        try:
            log.info("callback.dialling", agent=agent_id)
            try:
                await self._ari.request(
                    "POST",
                    "/channels",
                    {
                        "endpoint": oc.dial_string.format(number=number, trunk=oc.trunk),
                        "app": self._ari.app,
                        "appArgs": f"{LEG_ARG},{attempt_id}",
                        "channelId": channel_id,
                        "timeout": str(oc.ring_seconds),
                        "callerId": f'"{self._config.hotline.number}" <{self._config.hotline.number}>',
                    },
                )
            except AriError as exc:
                log.warning("callback.dial_failed", reason=type(exc).__name__)
                await self._engine.abandon(attempt_id)
                await self._attempt_failed(callback_id, "unreachable")
                return
            cause = await await_answer(leg, oc.ring_seconds + _ANSWER_SLACK)
            if cause is not None:
                outcome = failure_outcome(cause)
                log.info("callback.not_answered", outcome=outcome)
                await self._engine.abandon(attempt_id)
                await self._attempt_failed(callback_id, outcome)
                return
            await asyncio.to_thread(self.store.connected, callback_id, self._clock())
            log.info("callback.answered")
            record = await asyncio.to_thread(self.store.get, callback_id)
            outcome = await self._serve_answered(leg, ticket, offer, record)
            log.info("callback.ended", outcome=outcome)
        finally:
            if not leg.gone:
                with contextlib.suppress(ChannelError):
                    await leg.hangup()
            self._dispatcher.unregister(channel_id)

    async def _number(self, callback_id: str) -> str:
        """The callback's number, decrypted for dialling; the read is audited first (no unaudited access)."""
        assert self._ring is not None
        token, key_id = await asyncio.to_thread(self.store.token, callback_id)
        if not await self._audited("read", callback_id, "dialling a requested callback", {}):
            raise RuntimeError("the audit log refused the read of a callback's number")
        keys = await self._ring.keys([key_id])
        async with self._ring.cipher(keys) as cipher:
            return _unpad(cipher.decrypt_bytes(token, table=TABLE, column=COLUMN, row_id=callback_id))

    async def _attempt_failed(self, callback_id: str, outcome: str) -> None:
        record = await asyncio.to_thread(self.store.get, callback_id)
        now = self._clock()
        retry = next_attempt(max(1, record.attempts), self.policy, now)
        await asyncio.to_thread(self.store.attempt_failed, callback_id, outcome, retry, now)
        if retry is not None:
            return
        task = await asyncio.to_thread(
            self.tasks.create,
            "unreachable",
            record.patient_id or UNIDENTIFIED,
            role="nurse",
            at=now,
            subject_id=callback_id,
            call_id=record.call_id,
        )
        await asyncio.to_thread(self.store.set_task, callback_id, task.id)
        log.warning("callback.gave_up", attempts=record.attempts, task_id=task.id)

    async def _audited(
        self, action: Literal["store", "read"], callback_id: str, reason: str, details: dict[str, JsonValue]
    ) -> bool:
        audit = self._audit
        assert audit is not None
        try:
            await asyncio.to_thread(
                lambda: audit.append(
                    actor=ACTOR,
                    role=ROLE,
                    action=action,
                    outcome="success",
                    reason=reason,
                    details={"callback": callback_id, **details},
                )
            )
        except Exception as exc:  # noqa: BLE001 - any failure: nothing unaudited happens
            log.error("callback.audit_failed", action=action, error=type(exc).__name__)
            return False
        return True

    async def drain(self, timeout: float) -> None:
        """Stopping: callbacks being dialled or talking get ``timeout`` to end; those still waiting for an agent
        are just dropped from this node's engine (they stay pending in the database for the next start)."""
        dialling = [t for t in self._tasks if t in self._busy]
        if dialling:
            await asyncio.wait(dialling, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
