"""The HIS outbox: every outgoing message is stored encrypted first, then sent in order until the HIS says AA.

Guarantees (docs/his.md, "Failure behaviour"):

- **Nothing lost.** :meth:`Outbox.enqueue` returns only once the message is committed. While the HIS or the link
  is down the head of the queue waits, retried with backoff for as long as it takes; a transport failure never
  counts against the message.
- **Nothing sent twice.** A message is marked sent only when the HIS acknowledges it with AA and is never sent
  again after that. The message, its control id (MSH-10) included, is built once and stored: a re-send (the AA was
  lost, the node died mid-send) is the same bytes with the same control id, which is what lets the HIS discard
  the duplicate. Queueing a control id twice stores it once.
- **In order.** Only the oldest pending message is sent; one node at a time holds the lease on it.
- **Refusals are set aside, not retried forever.** AR (the HIS refuses the message as such) marks it ``failed``
  at once; AE (the HIS could not process it now) is retried ``max_attempts`` times, then ``failed``. A failed
  message stays in the table, audited, for an operator (``his retry``, ``his replay-outbox``).

At rest the body is one AES-256-GCM token under a ``his_outbox`` data key, bound to ``his_outbox|body_enc|<control
id>``, padded to 64-byte blocks so its length says little about a name's. Every answered attempt is audited
(``hl7_send``: type, control id, ACK code, patient by blind id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, Protocol

from compliance.data_keys import DataKeyRing
from ground.errors import MedhotlineError
from ground.logs import get_logger
from his.audit import Hl7Audit
from his.hl7 import Hl7Error, Message, parse
from his.messages import Ack, read_ack
from his.outbox_store import TABLE, OutboxEntry, OutboxStore
from his.transport import DEFAULT_BACKOFF, Backoff, HisError

log = get_logger("medhotline.his.outbox")

PURPOSE: Final = "his_outbox"
COLUMN: Final = "body_enc"
PAD_BLOCK: Final = 64


class OutboxError(MedhotlineError):
    """The outbox could not store or read a message; names the control id, never the content."""


class Requester(Protocol):
    """What the sender needs of a connection to the HIS (``his.transport.MllpClient``)."""

    async def request(self, message: Message) -> Message: ...


# Told of the HIS's final answer to a message: control id, message type, and the ACK (AA when sent; AR, or the AE
# of the last attempt, when set aside). What the hotline shows (an appointment confirmed or refused) follows it.
AnswerHook = Callable[[str, str, Ack], Awaitable[None]]

StepKind = Literal["idle", "wait", "busy", "sent", "retry", "failed"]


@dataclass(frozen=True, slots=True)
class SendStep:
    """What one :meth:`Outbox.send_next` did, and how long to wait before the next step is worth trying."""

    kind: StepKind
    control_id: str | None = None
    delay: float = 0.0


def _pad(body: bytes) -> bytes:
    raw = body + b"\x80"
    return raw + bytes(-len(raw) % PAD_BLOCK)


def _unpad(raw: bytes, control_id: str) -> bytes:
    end = raw.rstrip(b"\x00")
    if not end.endswith(b"\x80"):
        raise OutboxError(f"outbox message {control_id}: decrypted body has invalid padding")
    return end[:-1]


class Outbox:
    """Queue and send HL7 messages to the HIS; see the module docstring for what it guarantees."""

    def __init__(
        self,
        store: OutboxStore,
        ring: DataKeyRing,
        *,
        audit: Hl7Audit,
        node: str,
        backoff: Backoff = DEFAULT_BACKOFF,
        max_attempts: int = 10,
        lease: float = 60.0,
        clock: Callable[[], datetime] | None = None,
        on_answer: AnswerHook | None = None,
    ) -> None:
        self._on_answer = on_answer
        self._store = store
        self._ring = ring
        self._audit = audit
        self._node = node
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._lease = lease
        self._clock = clock or (lambda: datetime.now(UTC))
        self._transport_failures = 0
        self._wake = asyncio.Event()

    @property
    def store(self) -> OutboxStore:
        return self._store

    async def enqueue(self, message: Message, *, patient: str | None = None) -> bool:
        """Store ``message`` (encrypted) for sending; False if its control id is queued already.

        ``patient`` is the patient's blind id, for the audit entries of its delivery.
        """
        control_id = message.control_id
        key = await self._ring.current_key(PURPOSE)
        async with self._ring.cipher([key]) as cipher:
            token = cipher.encrypt_bytes(_pad(message.encode()), table=TABLE, column=COLUMN, row_id=control_id)
        added = await asyncio.to_thread(
            lambda: self._store.add(
                control_id=control_id,
                message_type=message.type,
                patient=patient,
                body_enc=token,
                data_key_id=key.id,
                at=self._clock(),
            )
        )
        if added:
            log.info("his.outbox_queued", type=message.type, control_id=control_id)
            self._wake.set()
        else:
            log.info("his.outbox_duplicate", type=message.type, control_id=control_id)
        return added

    async def _body(self, entry: OutboxEntry) -> Message:
        async with self._ring.cipher([entry.data_key]) as cipher:
            raw = cipher.decrypt_bytes(entry.body_enc, table=TABLE, column=COLUMN, row_id=entry.control_id)
        return parse(_unpad(raw, entry.control_id))

    async def send_next(self, client: Requester) -> SendStep:
        """Try the head of the queue once: send it if it is due and this node gets its lease."""
        entry = await asyncio.to_thread(self._store.head)
        if entry is None:
            return SendStep("idle")
        now = self._clock()
        if entry.next_attempt_at > now:
            return SendStep("wait", entry.control_id, (entry.next_attempt_at - now).total_seconds())
        until = now + timedelta(seconds=self._lease)
        if not await asyncio.to_thread(self._store.claim, entry.id, self._node, now, until):
            return SendStep("busy", entry.control_id, min(self._lease, 1.0))
        message = await self._body(entry)
        try:
            reply = await client.request(message)
            ack = read_ack(reply, entry.control_id)
        except (HisError, Hl7Error) as exc:
            self._transport_failures += 1
            delay = self._backoff.delay(self._transport_failures)
            log.warning("his.outbox_send_failed", control_id=entry.control_id, error=str(exc), retry_in=delay)
            await self._finish(entry, "pending", attempts=entry.attempts, delay=delay, error=str(exc))
            return SendStep("retry", entry.control_id, delay)
        self._transport_failures = 0
        attempts = entry.attempts + 1
        where = f"{ack.location} {ack.error_code}".strip()
        if ack.accepted:
            await self._finish(entry, "sent", attempts=attempts, ack_code="AA")
            await self._audit_send(entry, "success", "AA")
            log.info("his.outbox_sent", type=entry.message_type, control_id=entry.control_id, attempts=attempts)
            await self._answered(entry, ack)
            return SendStep("sent", entry.control_id)
        if ack.code == "AR" or attempts >= self._max_attempts:
            await self._finish(
                entry, "failed", attempts=attempts, ack_code=ack.code, error=f"{ack.code} {where}".strip()
            )
            await self._audit_send(entry, "error", ack.code, ack.location, ack.error_code)
            log.error("his.outbox_refused", control_id=entry.control_id, ack=ack.code, location=ack.location)
            await self._answered(entry, ack)
            return SendStep("failed", entry.control_id)
        delay = self._backoff.delay(attempts)
        await self._finish(
            entry, "pending", attempts=attempts, delay=delay, ack_code=ack.code, error=f"{ack.code} {where}".strip()
        )
        await self._audit_send(entry, "error", ack.code, ack.location, ack.error_code)
        log.warning("his.outbox_application_error", control_id=entry.control_id, attempts=attempts, retry_in=delay)
        return SendStep("retry", entry.control_id, delay)

    async def _finish(
        self,
        entry: OutboxEntry,
        status: Literal["pending", "sent", "failed"],
        *,
        attempts: int,
        delay: float = 0.0,
        ack_code: str | None = None,
        error: str | None = None,
    ) -> None:
        now = self._clock()
        kept = await asyncio.to_thread(
            lambda: self._store.finish(
                entry.id,
                self._node,
                status=status,
                attempts=attempts,
                next_attempt_at=now + timedelta(seconds=delay),
                ack_code=ack_code,
                last_error=error,
                sent_at=now if status == "sent" else None,
            )
        )
        if not kept:
            # The lease ran out during the request and another node took the message: its result stands.
            log.warning("his.outbox_lease_lost", control_id=entry.control_id)

    async def _answered(self, entry: OutboxEntry, ack: Ack) -> None:
        if self._on_answer is None:
            return
        try:
            await self._on_answer(entry.control_id, entry.message_type, ack)
        except Exception as exc:  # noqa: BLE001 (the delivery is recorded; what follows it must not undo that)
            log.error("his.outbox_answer_hook_failed", control_id=entry.control_id, error=type(exc).__name__)

    async def _audit_send(
        self, entry: OutboxEntry, outcome: Literal["success", "error"], ack: str, location: str = "", code: str = ""
    ) -> None:
        await self._audit.record(
            "send",
            entry.message_type,
            entry.control_id,
            outcome=outcome,
            patient=entry.patient,
            ack=ack,
            location=location,
            error_code=code,
        )

    def wake(self) -> None:
        """Something was queued (by another component of this node): look at the queue now."""
        self._wake.set()

    async def run(self, client: Requester, *, poll: float = 5.0) -> None:
        """Send for as long as the task runs; cancel it to stop. ``poll`` catches messages other nodes queued."""
        while True:
            try:
                step = await self.send_next(client)
            except MedhotlineError as exc:
                # Database or key service unavailable: nothing was marked, the message stays at the head.
                log.error("his.outbox_step_failed", error=type(exc).__name__, detail=str(exc))
                step = SendStep("retry", None, self._backoff.maximum)
            if step.kind in ("sent", "failed"):
                continue
            wait = poll if step.kind == "idle" else min(max(step.delay, 0.01), poll)
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
