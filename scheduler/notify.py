"""Notifications that don't need a call (SMS): an outbox table, a gateway port, and the delivery run.

The outbox pattern. Whoever wants a message sent (a medication reminder on the ``sms`` channel, a vaccination
reminder) only adds a row to ``notification_outbox`` in its own short transaction: :meth:`Outbox.enqueue`. The
leader's periodic job, :func:`deliver_pending`, later claims due rows, sends them through the gateway and records
the outcome. Nothing is sent from inside a business transaction, a gateway that is down only delays messages,
and a restart loses none.

Exactly one sender per message. :meth:`Outbox.claim_due` moves a row from ``pending`` to ``sending`` with a
conditional UPDATE (``... WHERE id = :id AND state = 'pending'``): of two nodes claiming the same row, one
updates it and the other sees zero rows changed and leaves it. A node that dies after claiming leaves its rows in
``sending``; :meth:`Outbox.release_stale` hands them back after a lease (a claimed row's ``not_before`` holds the
moment it was claimed). That one case is at-least-once: if the gateway had accepted the message before the node
died, the patient may get it twice, which is better than a medication reminder never sent.

Retries. A failed send goes back to ``pending`` with ``not_before`` pushed out by :data:`BACKOFF` (1, 5, 15, 60
minutes) until :data:`MAX_ATTEMPTS` sends have been tried; then it is ``failed``. A refusal the gateway will
repeat (HTTP 4xx other than 408/425/429: a malformed request, a number it does not serve, a bad token) fails at
once instead of being retried four more times.

Privacy. The text is clinical (a medication and dose) and is stored only encrypted, with the ``outreach`` data
key, bound to ``notification_outbox|body|<row id>``. The phone number is never stored: the caller's ``phone_of``
reads it from the encrypted registry at send time. Neither the number nor the text ever appears in a log line,
an exception or the row's ``error`` column; errors name the gateway host, the HTTP status and the message id.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

import httpx
from sqlalchemy import func, select, update

from compliance.data_keys import DataKeyRing
from compliance.fields import FieldCipherError
from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from ground.logs import get_logger
from scheduler.tables import DATA_KEY_PURPOSE, OutboxMessage

log = get_logger("medhotline.scheduler.notify")

TABLE: Final = "notification_outbox"
BODY_COLUMN: Final = "body"  # the column name bound into the body's associated data
CHANNEL: Final = "sms"
MAX_ATTEMPTS: Final = 5
BACKOFF: Final[tuple[timedelta, ...]] = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(minutes=60),
)
# A send that has not been marked sent or failed this long after its claim belongs to a node that died.
STALE_AFTER: Final = timedelta(minutes=10)
MAX_TEXT_CHARS: Final = 700  # ten concatenated SMS segments of Chinese text; a reminder is a sentence
MAX_REPLY_BYTES: Final = 64 * 1024
MAX_REF_CHARS: Final = 128  # the gateway_ref column
MAX_ERROR_CHARS: Final = 500  # the error column
_KIND: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SUBJECT: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,36}$")
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})
# Refusals worth trying again: timeout, too early, rate limited. Any other 4xx is the request's own fault.
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})

State = Literal["pending", "sending", "sent", "failed"]


class NotificationError(MedhotlineError):
    """A notification could not be queued or sent. Names the gateway host, the status or the message id; never
    the phone number or the text. ``permanent``: retrying the same request cannot succeed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A snapshot of one outbox row; the body stays an encrypted token (never shown by ``repr``)."""

    id: str
    channel: str
    patient_id: str
    kind: str
    subject_id: str | None
    body_token: str = field(repr=False)
    data_key_id: int
    state: str
    attempts: int
    not_before: datetime
    created_at: datetime
    sent_at: datetime | None
    gateway_ref: str | None
    error: str | None


def _record(row: OutboxMessage) -> OutboxRecord:
    return OutboxRecord(
        row.id, row.channel, row.patient_id, row.kind, row.subject_id, row.body_token, row.data_key_id, row.state,
        row.attempts, row.not_before, row.created_at, row.sent_at, row.gateway_ref, row.error,
    )  # fmt: skip


def check_text(text: str) -> str:
    """A message text: 1-MAX_TEXT_CHARS printable characters. The error names the rule, never the text."""
    if not isinstance(text, str) or not text.strip():
        raise NotificationError("a notification text must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise NotificationError(f"a notification text is {len(text)} characters; at most {MAX_TEXT_CHARS} are sent")
    if any(not ch.isprintable() and ch not in "\n" for ch in text):
        raise NotificationError("a notification text contains control characters")
    return text


class Outbox(Repository):
    """The ``notification_outbox`` table. ``enqueue`` is async (it encrypts through the key ring); the rest is
    synchronous, one short transaction per call (the service calls them through ``asyncio.to_thread``)."""

    async def enqueue(
        self,
        ring: DataKeyRing,
        *,
        patient_id: str,
        kind: str,
        text: str,
        subject_id: str | None,
        at: datetime,
    ) -> str:
        """Queue ``text`` for ``patient_id`` (due at once); returns the message id. The text is stored encrypted."""
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise NotificationError(f"notification kind {kind!r} must match {_KIND.pattern}")
        if not isinstance(patient_id, str) or not 1 <= len(patient_id) <= 128:
            raise NotificationError("a notification needs the patient's registry id (1-128 characters)")
        if subject_id is not None and not _SUBJECT.match(subject_id):
            raise NotificationError(f"notification subject id must match {_SUBJECT.pattern}")
        check_text(text)
        message_id = str(uuid.uuid4())
        key = await ring.current_key(DATA_KEY_PURPOSE)
        async with ring.cipher([key]) as cipher:
            token = cipher.encrypt(text, table=TABLE, column=BODY_COLUMN, row_id=message_id)
        row = OutboxMessage(
            id=message_id,
            channel=CHANNEL,
            patient_id=patient_id,
            kind=kind,
            subject_id=subject_id,
            body_token=token,
            data_key_id=key.id,
            state="pending",
            attempts=0,
            not_before=at,
            created_at=at,
        )
        await asyncio.to_thread(self._add, row)
        log.info("notification.queued", message_id=message_id, kind=kind, subject_id=subject_id)
        return message_id

    def _add(self, row: OutboxMessage) -> None:
        with self._transaction(f"queueing notification {row.id}") as session:
            session.add(row)

    def get(self, message_id: str) -> OutboxRecord:
        with self._transaction(f"reading notification {message_id}") as session:
            row = session.get(OutboxMessage, message_id)
            if row is None:
                raise NotificationError(f"no notification {message_id} in the outbox")
            return _record(row)

    def counts(self) -> dict[str, int]:
        """Messages per state (for status output and monitoring)."""
        with self._transaction("counting notifications") as session:
            rows = session.execute(select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)).all()
            return {str(state): int(n) for state, n in rows}

    def claim_due(self, now: datetime, limit: int) -> list[OutboxRecord]:
        """Claim up to ``limit`` due pending messages for this sender: each moves to ``sending`` (attempts + 1,
        ``not_before`` = ``now``, the lease start) only if it is still pending, so no two senders get one row.

        Each claim is its own transaction whose first statement is the conditional UPDATE: on PostgreSQL a second
        claimer waits for the first one's row lock and then finds the row no longer pending; on SQLite a
        transaction that had read first could not take the write lock after another writer committed (a stale
        snapshot), so nothing is read before the write.
        """
        if limit < 1:
            return []
        with self._transaction("finding due notifications") as session:
            candidates = session.scalars(
                select(OutboxMessage.id)
                .where(OutboxMessage.state == "pending", OutboxMessage.not_before <= now)
                .order_by(OutboxMessage.not_before, OutboxMessage.id)
                .limit(limit)
            ).all()
        claimed: list[OutboxRecord] = []
        for message_id in candidates:
            with self._transaction(f"claiming notification {message_id}") as session:
                result = session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id == message_id, OutboxMessage.state == "pending")
                    .values(state="sending", attempts=OutboxMessage.attempts + 1, not_before=now)
                )
                if rowcount(result) == 1:
                    row = session.get(OutboxMessage, message_id)
                    if row is not None:
                        claimed.append(_record(row))
        return claimed

    def mark_sent(self, message_id: str, ref: str, at: datetime) -> bool:
        """Record the gateway's acceptance; False if the message is no longer this sender's (released as stale)."""
        with self._transaction(f"marking notification {message_id} sent") as session:
            result = session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == message_id, OutboxMessage.state == "sending")
                .values(state="sent", sent_at=at, gateway_ref=ref[:MAX_REF_CHARS], error=None)
            )
            return rowcount(result) == 1

    def mark_failed(self, message_id: str, error: str, at: datetime, retry_at: datetime | None) -> State | None:
        """A send failed: back to ``pending`` until ``retry_at`` while fewer than MAX_ATTEMPTS sends were tried
        (and ``retry_at`` is given), else ``failed`` for good. Returns the new state, or None if the message is no
        longer this sender's. ``error`` must name no patient data (it is stored and shown to operators)."""
        with self._transaction(f"marking notification {message_id} failed") as session:
            row = session.get(OutboxMessage, message_id)
            if row is None or row.state != "sending":
                return None
            state: State = "pending" if retry_at is not None and row.attempts < MAX_ATTEMPTS else "failed"
            values: dict[str, object] = {"state": state, "error": error[:MAX_ERROR_CHARS]}
            if state == "pending":
                values["not_before"] = retry_at
            result = session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == message_id, OutboxMessage.state == "sending")
                .values(**values)
            )
            return state if rowcount(result) == 1 else None

    def release_stale(self, now: datetime, *, older_than: timedelta = STALE_AFTER) -> int:
        """Hand messages claimed longer than ``older_than`` ago (their sender died) back to ``pending``."""
        with self._transaction("releasing stale notification claims") as session:
            result = session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.state == "sending", OutboxMessage.not_before < now - older_than)
                .values(state="pending", not_before=now, error="released: its sender stopped before finishing")
            )
            return rowcount(result)


# --- the gateway port and its HTTP adapter ---------------------------------------------------------------------


class SmsGateway(Protocol):
    async def send(self, phone: str, text: str) -> str:
        """Hand one SMS to the gateway; returns the gateway's message reference. Raises NotificationError."""
        ...


class _BorrowedTransport(httpx.AsyncBaseTransport):
    """A caller's transport that the per-send client must not close."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """The caller owns the transport and closes it."""


class HttpSmsGateway:
    """A generic JSON-over-HTTPS SMS gateway: ``POST url`` with ``{"to": phone, "text": text}`` and
    ``Authorization: Bearer <token>``; a 2xx reply with a JSON object ``{"id": ...}`` means accepted.

    HTTPS is required (the request carries a phone number and clinical text) except to a loopback host, where a
    local relay or a test gateway may listen. A client per send: deliveries are a few messages every half
    minute, and this keeps no connection pool tied to one event loop.
    """

    def __init__(
        self, url: str, token: str, *, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise NotificationError("the SMS gateway URL is not a valid URL") from None
        if parsed.scheme not in {"http", "https"} or not parsed.host:
            raise NotificationError("the SMS gateway URL needs https:// and a host")
        if parsed.scheme == "http" and parsed.host not in _LOOPBACK:
            raise NotificationError(
                f"SMS gateway {parsed.host}: plain http:// would send phone numbers and texts in clear; use https://"
            )
        if not token or not token.strip():
            raise NotificationError(f"SMS gateway {parsed.host}: the bearer token is empty")
        if timeout <= 0:
            raise NotificationError(f"SMS gateway {parsed.host}: the timeout must be positive, got {timeout:g}")
        self._url = parsed
        self._host = parsed.host
        self._token = token.strip()
        self._timeout = timeout
        self._transport = None if transport is None else _BorrowedTransport(transport)

    @property
    def host(self) -> str:
        return self._host

    def __repr__(self) -> str:
        return f"HttpSmsGateway({self._host})"  # never the token

    async def send(self, phone: str, text: str) -> str:
        if not isinstance(phone, str) or not phone.strip():
            raise NotificationError(f"SMS gateway {self._host}: no phone number to send to", permanent=True)
        try:
            check_text(text)
        except NotificationError as exc:  # the same text would be refused again
            raise NotificationError(f"SMS gateway {self._host}: {exc}", permanent=True) from None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        try:
            async with (
                httpx.AsyncClient(transport=self._transport, timeout=self._timeout) as client,
                client.stream("POST", self._url, json={"to": phone, "text": text}, headers=headers) as response,
            ):
                status = response.status_code
                if not 200 <= status < 300:
                    # The reply body is never read into the message: a gateway may echo the number back.
                    permanent = 400 <= status < 500 and status not in _RETRYABLE_4XX
                    raise NotificationError(
                        f"SMS gateway {self._host}: HTTP {status} {response.reason_phrase}".rstrip(),
                        permanent=permanent,
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise NotificationError(f"SMS gateway {self._host}: HTTP {status} reply exceeds 64 KiB")
        except httpx.TimeoutException:
            raise NotificationError(f"SMS gateway {self._host}: no answer within {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise NotificationError(
                f"SMS gateway {self._host}: the request failed ({type(exc).__name__}{_safe_detail(exc, phone, text)})"
            ) from None
        return self._reference(bytes(body), status)

    def _reference(self, body: bytes, status: int) -> str:
        try:
            reply = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise NotificationError(f"SMS gateway {self._host}: HTTP {status} reply is not JSON") from None
        ref = reply.get("id") if isinstance(reply, dict) else None
        if isinstance(ref, bool) or not isinstance(ref, str | int) or not str(ref).strip():
            raise NotificationError(f"SMS gateway {self._host}: HTTP {status} reply has no message id")
        text = str(ref).strip()
        if len(text) > MAX_REF_CHARS or not text.isprintable():
            raise NotificationError(f"SMS gateway {self._host}: HTTP {status} reply's message id is not usable")
        return text


def _safe_detail(exc: BaseException, *secrets: str) -> str:
    """``: <reason>`` of a transport error (e.g. connection refused), or nothing if it mentions any secret."""
    detail = str(exc).strip()
    if not detail or any(s and s in detail for s in secrets):
        return ""
    return f": {detail[:200]}"


# --- delivery ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one :func:`deliver_pending` run did."""

    claimed: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    released: int = 0


def retry_at(attempts: int, now: datetime) -> datetime | None:
    """When to try again after ``attempts`` failed sends; None once MAX_ATTEMPTS have been tried."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return now + BACKOFF[min(max(attempts, 1), len(BACKOFF)) - 1]


async def _bodies(ring: DataKeyRing, messages: Sequence[OutboxRecord]) -> dict[str, str | NotificationError]:
    """Each message's text, or the (permanent) error that keeps it from being read. One unwrap per key used."""
    result: dict[str, str | NotificationError] = {}
    keys = await ring.keys({m.data_key_id for m in messages})
    usable = [k for k in keys if k.purpose == DATA_KEY_PURPOSE]
    usable_ids = {k.id for k in usable}
    for message in messages:
        if message.data_key_id not in usable_ids:
            result[message.id] = NotificationError(
                f"notification {message.id}: data key {message.data_key_id} is not an {DATA_KEY_PURPOSE} key",
                permanent=True,
            )
    readable = [m for m in messages if m.id not in result]
    if not readable:
        return result
    async with ring.cipher(usable) as cipher:
        for message in readable:
            try:
                result[message.id] = cipher.decrypt(
                    message.body_token, table=TABLE, column=BODY_COLUMN, row_id=message.id
                )
            except FieldCipherError as exc:  # tampered, truncated or moved from another row
                result[message.id] = NotificationError(str(exc), permanent=True)
    return result


async def deliver_pending(
    outbox: Outbox,
    ring: DataKeyRing,
    gateway: SmsGateway,
    phone_of: Callable[[str], Awaitable[str]],
    now: datetime,
    *,
    limit: int = 50,
) -> DeliveryReport:
    """Send the due messages: release stale claims, claim up to ``limit``, decrypt each body, ask ``phone_of``
    (the registry) for the number at send time, send, and mark each sent, retrying (backoff) or failed.

    One message's failure never stops the others. Log lines carry the message id, kind, attempt and the error
    (which names the gateway host and status), never the number or the text.
    """
    released = await asyncio.to_thread(outbox.release_stale, now)
    if released:
        log.warning("notification.released_stale", count=released)
    claimed = await asyncio.to_thread(outbox.claim_due, now, limit)
    if not claimed:
        return DeliveryReport(released=released)
    bodies = await _bodies(ring, claimed)
    sent = retrying = failed = 0
    for message in claimed:
        body = bodies[message.id]
        try:
            if isinstance(body, NotificationError):
                raise body
            phone = await phone_of(message.patient_id)
            ref = await gateway.send(phone, body)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on its own message
            error = _error_text(exc)
            permanent = isinstance(exc, NotificationError) and exc.permanent
            next_try = None if permanent else retry_at(message.attempts, now)
            state = await asyncio.to_thread(outbox.mark_failed, message.id, error, now, next_try)
            log.warning(
                "notification.send_failed",
                message_id=message.id,
                kind=message.kind,
                attempt=message.attempts,
                error=error,
                state=state,
                retry_at=next_try.isoformat() if state == "pending" and next_try else None,
            )
            if state == "pending":
                retrying += 1
            elif state == "failed":
                failed += 1
            continue
        if await asyncio.to_thread(outbox.mark_sent, message.id, ref, now):
            sent += 1
            log.info("notification.sent", message_id=message.id, kind=message.kind, attempt=message.attempts)
        else:
            log.warning("notification.sent_after_release", message_id=message.id, kind=message.kind)
    return DeliveryReport(claimed=len(claimed), sent=sent, retrying=retrying, failed=failed, released=released)


def _error_text(exc: BaseException) -> str:
    """What is stored and logged about a failure: our own errors' messages (written to hold no patient data);
    for anything else only the exception's type, since its text could repeat what it was given."""
    if isinstance(exc, MedhotlineError):
        return str(exc)
    return f"unexpected {type(exc).__name__}"
