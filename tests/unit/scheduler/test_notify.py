"""The notification outbox and its delivery, against a real key service (Unix socket), a real database (SQLite
and PostgreSQL) and an HTTP gateway simulated with ``httpx.MockTransport``.

Covers: the body stored only encrypted (bound to its row), delivery and its retries with backoff up to giving up,
refusals that are not retried, exclusive claims (also by two claimers at once), stale claims released, bad input,
and that no phone number or text reaches a log line, an exception or the database.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground import db
from ground.models import Base
from scheduler.notify import (
    BACKOFF,
    MAX_ATTEMPTS,
    MAX_TEXT_CHARS,
    STALE_AFTER,
    DeliveryReport,
    HttpSmsGateway,
    NotificationError,
    Outbox,
    deliver_pending,
    retry_at,
)
from scheduler.tables import OutboxMessage

NOW = datetime(2025, 3, 14, 1, 30, tzinfo=UTC)
GATEWAY_URL = "https://sms.example.test/v1/messages"
GATEWAY_HOST = "sms.example.test"
GATEWAY_TOKEN = "gateway-token-0123456789"
# A made-up patient's number (one of tests/conftest.py's PATIENT_IDENTIFIERS: the session-wide scan of every
# database and log the tests wrote looks for it too) and a reminder text that is clinical.
PHONE = "13800138000"
TEXT = "用药提醒：请按时服用阿托伐他汀钙片，每晚一次20mg。"
SECRETS = (PHONE, "138-0013-8000", TEXT, "阿托伐他汀", GATEWAY_TOKEN)


# --- helpers ------------------------------------------------------------------------------------------------------


@pytest.fixture
def ring(engine: Engine, keys: KeyServiceClient) -> DataKeyRing:
    return DataKeyRing(DataKeyStore.for_engine(engine), keys)


@pytest.fixture
def outbox(sessions: sessionmaker[Session]) -> Outbox:
    return Outbox(sessions)


@dataclass
class FakeGateway:
    """The gateway's HTTP side: answers each request with the next scripted reply (a response or an exception)
    and keeps what it was sent."""

    replies: list[httpx.Response | Exception] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    default: Callable[[], httpx.Response] = lambda: httpx.Response(200, json={"id": "msg-default"})

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else self.default()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def gateway(self, *, timeout: float = 10.0) -> HttpSmsGateway:
        return HttpSmsGateway(GATEWAY_URL, GATEWAY_TOKEN, timeout=timeout, transport=httpx.MockTransport(self.handle))

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


@pytest.fixture
def http() -> FakeGateway:
    return FakeGateway()


def patient() -> str:
    return str(uuid.uuid4())


async def phone_of(patient_id: str) -> str:
    return PHONE


async def enqueue(outbox: Outbox, ring: DataKeyRing, *, at: datetime = NOW, text: str = TEXT) -> str:
    return await outbox.enqueue(
        ring, patient_id=patient(), kind="medication_reminder", text=text, subject_id=str(uuid.uuid4()), at=at
    )


def assert_no_secret(blob: str | bytes, where: str) -> None:
    data = blob if isinstance(blob, bytes) else blob.encode("utf-8")
    found = [s for s in SECRETS if s.encode("utf-8") in data]
    assert not found, f"{where} holds {found}"


def database_dump(engine: Engine, database_url: str) -> bytes:
    """Every row of every table as text, plus (SQLite) the raw database and WAL files."""
    parts: list[bytes] = []
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if conn.dialect.has_table(conn, table.name):
                parts += [repr(tuple(row)).encode("utf-8") for row in conn.execute(table.select())]
    url = database_url.removeprefix("sqlite:///")
    if url != database_url:
        engine.dispose()
        for suffix in ("", "-wal", "-journal"):
            path = Path(url + suffix)
            if path.exists():
                parts.append(path.read_bytes())
    return b"\n".join(parts)


def set_row(engine: Engine, message_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(**values))


# --- enqueue and storage --------------------------------------------------------------------------------------------


async def test_the_body_is_stored_encrypted_and_never_in_clear(
    outbox: Outbox, ring: DataKeyRing, engine: Engine, database_url: str, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    record = outbox.get(message_id)
    assert (record.state, record.attempts, record.channel, record.not_before) == ("pending", 0, "sms", NOW)
    assert TEXT not in record.body_token
    assert "body_token" not in repr(record)
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    assert report.sent == 1
    assert http.bodies() == [{"to": PHONE, "text": TEXT}]  # what the encrypted row held, decrypted at send time
    assert_no_secret(database_dump(engine, database_url), "the database")


async def test_a_body_moved_to_another_row_does_not_decrypt_and_fails_only_its_message(
    outbox: Outbox, ring: DataKeyRing, engine: Engine, http: FakeGateway
) -> None:
    first = await enqueue(outbox, ring, text="第一条提醒")
    second = await enqueue(outbox, ring, text="第二条提醒")
    set_row(engine, second, body_token=outbox.get(first).body_token)
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    assert report == DeliveryReport(claimed=2, sent=1, retrying=0, failed=1)
    assert http.bodies() == [{"to": PHONE, "text": "第一条提醒"}]
    broken = outbox.get(second)
    assert broken.state == "failed"  # tampering does not heal with time: no retry
    assert broken.error is not None
    assert broken.error.startswith(f"cannot decrypt notification_outbox.body of row {second}: authentication failed")


@pytest.mark.parametrize("damage", ["truncated", "not base64", "empty"])
async def test_a_damaged_body_fails_its_message_for_good(
    outbox: Outbox, ring: DataKeyRing, engine: Engine, http: FakeGateway, damage: str
) -> None:
    message_id = await enqueue(outbox, ring)
    token = outbox.get(message_id).body_token
    damaged = {"truncated": token[:20], "not base64": "%%%" + token[3:], "empty": ""}[damage]
    set_row(engine, message_id, body_token=damaged)
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    assert (report.failed, report.sent, http.requests) == (1, 0, [])
    record = outbox.get(message_id)
    assert record.state == "failed"
    assert record.error is not None
    assert record.error.startswith(f"cannot decrypt notification_outbox.body of row {message_id}")


async def test_a_body_under_another_purposes_key_is_refused(
    outbox: Outbox, ring: DataKeyRing, engine: Engine, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    patients_key = await ring.current_key("patients")
    set_row(engine, message_id, data_key_id=patients_key.id)
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    assert (report.failed, http.requests) == (1, [])
    assert outbox.get(message_id).error == (
        f"notification {message_id}: data key {patients_key.id} is not an outreach key"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": ""}, "must not be empty"),
        ({"text": "   "}, "must not be empty"),
        ({"text": "药" * (MAX_TEXT_CHARS + 1)}, f"at most {MAX_TEXT_CHARS} are sent"),
        ({"text": "提醒\x00"}, "control characters"),
        ({"kind": "Medication Reminder"}, "notification kind"),
        ({"kind": ""}, "notification kind"),
        ({"patient_id": ""}, "registry id"),
        ({"subject_id": "x" * 37}, "subject id"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_stored(
    outbox: Outbox, ring: DataKeyRing, changes: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "patient_id": patient(),
        "kind": "medication_reminder",
        "text": TEXT,
        "subject_id": None,
        "at": NOW,
    }
    with pytest.raises(NotificationError, match=message) as info:
        await outbox.enqueue(ring, **(args | changes))
    assert_no_secret(str(info.value), "the error")
    assert outbox.counts() == {}


# --- delivery --------------------------------------------------------------------------------------------------------


async def test_a_message_is_sent_with_the_bearer_token_and_marked_sent(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    http.replies = [httpx.Response(202, json={"id": 4711, "status": "queued"})]
    asked: list[str] = []

    async def number_of(patient_id: str) -> str:
        asked.append(patient_id)
        return PHONE

    report = await deliver_pending(outbox, ring, http.gateway(), number_of, NOW + timedelta(seconds=5))
    assert report == DeliveryReport(claimed=1, sent=1)
    record = outbox.get(message_id)
    assert (record.state, record.gateway_ref, record.attempts, record.error) == ("sent", "4711", 1, None)
    assert record.sent_at == NOW + timedelta(seconds=5)
    assert asked == [record.patient_id]  # the number is read from the registry at send time, by patient id
    request = http.requests[0]
    assert (request.method, str(request.url)) == ("POST", GATEWAY_URL)
    assert request.headers["authorization"] == f"Bearer {GATEWAY_TOKEN}"
    assert request.headers["content-type"] == "application/json"
    # Sent once: a second run finds nothing to do.
    assert await deliver_pending(outbox, ring, http.gateway(), number_of, NOW + timedelta(hours=2)) == DeliveryReport()
    assert len(http.requests) == 1


async def test_a_server_error_is_retried_after_the_backoff_and_then_sent(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    http.replies = [httpx.Response(500), httpx.Response(200, json={"id": "abc-2"})]
    first = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    assert first == DeliveryReport(claimed=1, retrying=1)
    record = outbox.get(message_id)
    assert (record.state, record.attempts, record.not_before) == ("pending", 1, NOW + BACKOFF[0])
    assert record.error == f"SMS gateway {GATEWAY_HOST}: HTTP 500 Internal Server Error"
    # Not before the backoff has passed ...
    early = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW + BACKOFF[0] - timedelta(seconds=1))
    assert early == DeliveryReport()
    # ... then it goes.
    second = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW + BACKOFF[0])
    assert second == DeliveryReport(claimed=1, sent=1)
    record = outbox.get(message_id)
    assert (record.state, record.attempts, record.gateway_ref, record.error) == ("sent", 2, "abc-2", None)
    assert len(http.requests) == 2


async def test_a_timeout_is_reported_with_the_host_and_retried(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    http.replies = [httpx.ReadTimeout("timed out")]
    report = await deliver_pending(outbox, ring, http.gateway(timeout=2.5), phone_of, NOW)
    assert report.retrying == 1
    record = outbox.get(message_id)
    assert (record.state, record.error) == ("pending", f"SMS gateway {GATEWAY_HOST}: no answer within 2.5 s")


async def test_after_max_attempts_the_message_fails_for_good(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    http.default = lambda: httpx.Response(503)
    at = NOW
    waits = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        report = await deliver_pending(outbox, ring, http.gateway(), phone_of, at)
        record = outbox.get(message_id)
        assert record.attempts == attempt
        if attempt < MAX_ATTEMPTS:
            assert (report.retrying, record.state) == (1, "pending")
            waits.append(record.not_before - at)
            at = record.not_before
        else:
            assert (report.failed, record.state) == (1, "failed")
    assert waits == list(BACKOFF)  # 1, 5, 15, 60 minutes
    assert record.error == f"SMS gateway {GATEWAY_HOST}: HTTP 503 Service Unavailable"
    assert await deliver_pending(outbox, ring, http.gateway(), phone_of, at + timedelta(days=1)) == DeliveryReport()
    assert len(http.requests) == MAX_ATTEMPTS


@pytest.mark.parametrize(("status", "retried"), [(400, False), (401, False), (404, False), (429, True), (408, True)])
async def test_refusals_the_gateway_would_repeat_are_not_retried(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway, status: int, retried: bool
) -> None:
    message_id = await enqueue(outbox, ring)
    http.replies = [httpx.Response(status, json={"error": f"bad number {PHONE}"})]
    await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW)
    record = outbox.get(message_id)
    assert record.state == ("pending" if retried else "failed")
    assert record.error is not None
    assert record.error.startswith(f"SMS gateway {GATEWAY_HOST}: HTTP {status}")
    assert_no_secret(record.error, "the stored error")  # the gateway's body (echoing the number) is never kept


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (httpx.Response(200, text="OK"), "HTTP 200 reply is not JSON"),
        (httpx.Response(200, json={"status": "queued"}), "HTTP 200 reply has no message id"),
        (httpx.Response(200, json=["id", "1"]), "HTTP 200 reply has no message id"),
        (httpx.Response(200, json={"id": ""}), "HTTP 200 reply has no message id"),
        (httpx.Response(200, json={"id": True}), "HTTP 200 reply has no message id"),
        (httpx.Response(200, json={"id": "x" * 129}), "message id is not usable"),
        (httpx.Response(200, content=b"\xff\xfe"), "HTTP 200 reply is not JSON"),
        (httpx.Response(200, content=b"{" * (64 * 1024 + 1)), "reply exceeds 64 KiB"),
    ],
)
async def test_a_malformed_acceptance_is_an_error_naming_the_host(
    http: FakeGateway, reply: httpx.Response, message: str
) -> None:
    http.replies = [reply]
    with pytest.raises(NotificationError, match=message) as info:
        await http.gateway().send(PHONE, TEXT)
    assert str(info.value).startswith(f"SMS gateway {GATEWAY_HOST}: ")
    assert not info.value.permanent


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("http://sms.example.test/send", GATEWAY_TOKEN, "plain http:// would send phone numbers and texts in clear"),
        ("ftp://sms.example.test/send", GATEWAY_TOKEN, "needs https:// and a host"),
        ("https:///send", GATEWAY_TOKEN, "needs https:// and a host"),
        ("https://sms.example.test/send", "", "the bearer token is empty"),
        ("https://sms.example.test/send", "   ", "the bearer token is empty"),
    ],
)
def test_a_misconfigured_gateway_is_refused(url: str, token: str, message: str) -> None:
    with pytest.raises(NotificationError, match=message):
        HttpSmsGateway(url, token)


def test_a_loopback_gateway_may_use_plain_http_and_the_repr_hides_the_token() -> None:
    gateway = HttpSmsGateway("http://127.0.0.1:8025/send", GATEWAY_TOKEN)
    assert gateway.host == "127.0.0.1"
    assert GATEWAY_TOKEN not in repr(gateway)


async def test_one_failing_message_does_not_stop_the_others(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    ids = [await enqueue(outbox, ring, at=NOW + timedelta(seconds=i)) for i in range(3)]
    http.replies = [
        httpx.Response(200, json={"id": "a"}),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"id": "c"}),
    ]
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW + timedelta(minutes=1))
    assert report == DeliveryReport(claimed=3, sent=2, retrying=1)
    assert [outbox.get(i).state for i in ids] == ["sent", "pending", "sent"]
    assert outbox.get(ids[1]).error == f"SMS gateway {GATEWAY_HOST}: the request failed (ConnectError: refused)"


async def test_a_registry_failure_is_retried_like_a_gateway_failure(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)

    async def unreachable(patient_id: str) -> str:
        raise ConnectionError(f"registry down while reading {PHONE}")

    report = await deliver_pending(outbox, ring, http.gateway(), unreachable, NOW)
    assert report.retrying == 1
    assert outbox.get(message_id).error == "unexpected ConnectionError"  # its text could hold anything
    assert http.requests == []


async def test_delivery_respects_the_limit_and_oldest_go_first(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    ids = [await enqueue(outbox, ring, at=NOW - timedelta(minutes=10 - i), text=f"提醒{i}") for i in range(5)]
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW, limit=3)
    assert report.sent == 3
    assert [b["text"] for b in http.bodies()] == ["提醒0", "提醒1", "提醒2"]
    assert [outbox.get(i).state for i in ids] == ["sent", "sent", "sent", "pending", "pending"]
    assert outbox.counts() == {"sent": 3, "pending": 2}


async def test_nothing_is_sent_before_its_time(outbox: Outbox, ring: DataKeyRing, http: FakeGateway) -> None:
    await enqueue(outbox, ring, at=NOW + timedelta(minutes=5))
    assert await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW) == DeliveryReport()
    assert http.requests == []


def test_the_backoff_schedule() -> None:
    assert [retry_at(n, NOW) for n in range(1, MAX_ATTEMPTS + 1)] == [
        NOW + timedelta(minutes=1), NOW + timedelta(minutes=5), NOW + timedelta(minutes=15),
        NOW + timedelta(minutes=60), None,
    ]  # fmt: skip


# --- claims ------------------------------------------------------------------------------------------------------


async def test_a_claimed_message_is_not_claimed_again(outbox: Outbox, ring: DataKeyRing, engine: Engine) -> None:
    message_id = await enqueue(outbox, ring)
    other = Outbox.for_engine(engine)
    claimed = outbox.claim_due(NOW, 10)
    assert [m.id for m in claimed] == [message_id]
    assert (claimed[0].state, claimed[0].attempts) == ("sending", 1)
    assert other.claim_due(NOW, 10) == []
    # Only the claimant's outcome counts, once.
    assert outbox.mark_sent(message_id, "ref-1", NOW)
    assert not other.mark_sent(message_id, "ref-2", NOW)
    assert other.mark_failed(message_id, "late", NOW, NOW) is None
    assert outbox.get(message_id).gateway_ref == "ref-1"


async def test_two_claimers_at_once_never_share_a_message(outbox: Outbox, ring: DataKeyRing, database_url: str) -> None:
    ids = {await enqueue(outbox, ring) for _ in range(40)}
    engines = [db.make_engine(database_url) for _ in range(2)]
    barrier = threading.Barrier(2)

    def claim(engine: Engine) -> list[str]:
        box = Outbox.for_engine(engine)
        barrier.wait()
        got: list[str] = []
        while batch := box.claim_due(NOW, 7):
            got += [m.id for m in batch]
        return got

    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(claim, engines)
    finally:
        for e in engines:
            e.dispose()
    assert not set(first) & set(second)
    assert set(first) | set(second) == ids
    assert len(first) + len(second) == len(ids)


async def test_a_claim_left_by_a_dead_sender_is_released_and_sent(
    outbox: Outbox, ring: DataKeyRing, http: FakeGateway
) -> None:
    message_id = await enqueue(outbox, ring)
    assert [m.id for m in outbox.claim_due(NOW, 10)] == [message_id]  # ... and the node dies
    assert await deliver_pending(outbox, ring, http.gateway(), phone_of, NOW + STALE_AFTER) == DeliveryReport()
    later = NOW + STALE_AFTER + timedelta(seconds=1)
    report = await deliver_pending(outbox, ring, http.gateway(), phone_of, later)
    assert report == DeliveryReport(claimed=1, sent=1, released=1)
    record = outbox.get(message_id)
    assert (record.state, record.attempts) == ("sent", 2)


def test_marking_an_unknown_message_changes_nothing(outbox: Outbox) -> None:
    missing = str(uuid.uuid4())
    assert not outbox.mark_sent(missing, "ref", NOW)
    assert outbox.mark_failed(missing, "error", NOW, None) is None
    with pytest.raises(NotificationError, match=f"no notification {missing} in the outbox"):
        outbox.get(missing)
    assert outbox.claim_due(NOW, 0) == []


# --- privacy -------------------------------------------------------------------------------------------------------


async def test_no_number_or_text_in_any_log_line_error_or_row(
    outbox: Outbox, ring: DataKeyRing, engine: Engine, database_url: str, http: FakeGateway
) -> None:
    """Every failure path at once; the gateway and the registry even put the number into their own errors."""
    ids = [await enqueue(outbox, ring, at=NOW + timedelta(seconds=i)) for i in range(6)]
    http.replies = [
        httpx.Response(500, text=f"cannot deliver to {PHONE}: {TEXT}"),
        httpx.ConnectError(f"connection to gateway for {PHONE} refused"),
        httpx.ReadTimeout(f"timed out sending {TEXT}"),
        httpx.Response(400, json={"error": f"invalid number {PHONE}"}),
        httpx.Response(200, json={"id": "ok-1"}),
    ]
    calls = 0

    async def flaky_registry(patient_id: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise ValueError(f"bad number {PHONE}")
        return PHONE

    with capture_logs() as logs:
        report = await deliver_pending(outbox, ring, http.gateway(), flaky_registry, NOW + timedelta(minutes=1))
        with pytest.raises(NotificationError) as too_long:
            await http.gateway().send(PHONE, TEXT * 40)
        with pytest.raises(NotificationError) as no_number:
            await http.gateway().send("", TEXT)
    errors = [str(too_long.value), str(no_number.value)]
    assert too_long.value.permanent
    assert no_number.value.permanent
    assert report == DeliveryReport(claimed=6, sent=1, retrying=4, failed=1)
    assert_no_secret(repr(logs), "the logs")
    stored_errors = [outbox.get(i).error or "" for i in ids]
    assert_no_secret("\n".join(stored_errors + errors), "the errors")
    assert stored_errors[1] == f"SMS gateway {GATEWAY_HOST}: the request failed (ConnectError)"  # detail withheld
    assert {e["event"] for e in logs} >= {"notification.sent", "notification.send_failed"}
    assert all("message_id" in e for e in logs if e["event"].startswith("notification.send"))
    assert_no_secret(database_dump(engine, database_url), "the database")


async def test_concurrent_enqueue_from_tasks(outbox: Outbox, ring: DataKeyRing) -> None:
    ids = await asyncio.gather(*(enqueue(outbox, ring, text=f"提醒{i}") for i in range(10)))
    assert len(set(ids)) == 10
    assert outbox.counts() == {"pending": 10}
