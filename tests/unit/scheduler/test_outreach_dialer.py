"""The dialer with a fake clock: a real key service, registry and database, ARI faked at the HTTP edge.

Checked: a due call is placed once, to the patient's number from the encrypted registry, with the hotline's
caller id; quiet hours and the plan's window defer it; a number on the do-not-call list is never dialled; the
trunk cap holds; an unanswered call is retried after the backoff and, after the last attempt, a nurse gets an
"unreachable" task. No phone number reaches the database or a log line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground.config import load_config
from his.directory import PatientServices, RegistryPatientDirectory
from his.registry import PatientInput, PatientRegistry
from his.tables import PatientStore
from scheduler.complaint_core import Complaint
from scheduler.complaints import SURVEY_KIND, ComplaintStore, StoredComplaint
from scheduler.outreach import SYSTEM_ACTOR, SYSTEM_ROLE, CallContext, CallOutreach, Outreach
from scheduler.policy import LOCAL_TZ, DialPolicy, Window
from scheduler.rounds import open_followup_round
from scheduler.store import Threshold
from scheduler.tables import DoNotCall, OutreachAttempt
from telephony.ari_channel import AriDispatcher
from telephony.ari_client import AriClient
from telephony.ports import OutreachUnavailable

PHONE = "13912345678"
POLICY = DialPolicy(quiet=Window.parse("21:00-08:00"), max_attempts=2, backoff=(timedelta(minutes=30),), trunk_cap=1)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.now = at

    def __call__(self) -> datetime:
        return self.now


class FakeAri:
    """Records what the dialer asks of ARI; originates succeed, nothing else is expected."""

    def __init__(self) -> None:
        self.originated: list[dict[str, str]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/ari/channels":
            self.originated.append(dict(request.url.params))
            return httpx.Response(200, json={"id": request.url.params["channelId"]})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(404, json={"message": "not found"})


def local(hour: int, minute: int = 0, day: int = 2) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=LOCAL_TZ).astimezone(UTC)


class Desk:
    def __init__(self, outreach: Outreach, ari: FakeAri, clock: Clock, dispatcher: AriDispatcher, patient: str) -> None:
        self.outreach, self.ari, self.clock, self.dispatcher, self.patient = outreach, ari, clock, dispatcher, patient
        self.calls: list[str] = []

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)


@pytest.fixture
async def desk(engine: Engine, sessions: sessionmaker[Session], keys: KeyServiceClient) -> AsyncIterator[Desk]:
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, keys, audit=audit)
    patient = await registry.upsert(
        PatientInput(name="王建国", phone=PHONE, birth_year=1956), accessor="test", role="admin"
    )
    config = load_config(environ={"MEDHOTLINE__OUTREACH__RING_SECONDS": "5"})
    fake = FakeAri()
    ari = AriClient("127.0.0.1", 1, "u", "p", "medhotline", transport=httpx.MockTransport(fake.handler))
    dispatcher = AriDispatcher()
    clock = Clock(local(10, 0))
    holder: dict[str, Desk] = {}

    async def run_call(leg: Any, flow: str, port: CallOutreach) -> tuple[str, str]:
        holder["desk"].calls.append(flow)
        assert await port.verify_identity({"birth_year": "1956"})
        await port.save_readings({"systolic": "182", "diastolic": "95"})
        return "00000000-0000-4000-8000-000000000001", "completed"

    async def speak(text: str) -> str:
        return "medhotline/test"

    outreach = Outreach(config, sessions, ari, dispatcher, run_call=run_call, speak=speak, policy=POLICY, clock=clock)
    outreach.patients_ready(PatientServices(registry, RegistryPatientDirectory(registry), ring, keys, audit, engine))
    holder["desk"] = Desk(outreach, fake, clock, dispatcher, patient)
    try:
        yield holder["desk"]
    finally:
        await outreach.drain(1.0)
        await ari.aclose()


def plan_for(desk: Desk, window: str = "09:00-18:00") -> str:
    start, end = window.split("-")
    return desk.outreach.plans.add(
        patient_id=desk.patient,
        condition="hypertension",
        interval_days=7,
        window=(start, end),
        flow="followup",
        thresholds={"systolic": Threshold(90, 139), "diastolic": Threshold(60, 89)},
        responsible="doc1",
        first_due=desk.clock.now,
        at=desk.clock.now,
        by="test",
    ).id


def fire(desk: Desk, plan: str) -> None:
    open_followup_round(desk.outreach._sessions, desk.outreach.attempts, POLICY, plan, desk.clock.now)


def answer(desk: Desk, attempt_channel: str) -> None:
    desk.dispatcher.dispatch({"type": "StasisStart", "channel": {"id": attempt_channel}, "args": ["outbound"]})


def hang_up_unanswered(desk: Desk, attempt_channel: str, cause: int = 19) -> None:
    desk.dispatcher.dispatch({"type": "ChannelDestroyed", "channel": {"id": attempt_channel}, "cause": cause})


def attempts(desk: Desk) -> list[OutreachAttempt]:
    with desk.outreach._sessions() as session:
        return list(session.scalars(select(OutreachAttempt).order_by(OutreachAttempt.attempt)).all())


async def test_a_due_follow_up_is_dialled_once_and_an_abnormal_reading_makes_a_recall(desk: Desk) -> None:
    plan = plan_for(desk)
    fire(desk, plan)
    fire(desk, plan)  # a second fire of the same due time opens nothing
    with capture_logs() as logs:
        assert await desk.outreach.dial_due() == 1
        assert await desk.outreach.dial_due() == 0  # claimed: never placed twice
        await desk.settle()
        (params,) = desk.ari.originated
        assert params["endpoint"] == f"PJSIP/{PHONE}@patients"
        assert params["callerId"] == '"12320" <12320>'
        answer(desk, params["channelId"])
        await desk.settle()
    assert desk.calls == ["followup"]
    (row,) = attempts(desk)
    assert (row.state, row.outcome) == ("completed", "completed")
    (task,) = desk.outreach.tasks.open_tasks(kind="recall")
    assert (task.assignee, task.role, task.patient_id) == ("doc1", "physician", desk.patient)
    assert PHONE not in json.dumps(logs, default=str)


async def test_quiet_hours_and_the_window_defer_the_call(desk: Desk) -> None:
    desk.clock.now = local(22, 30)
    plan = plan_for(desk)
    fire(desk, plan)
    assert await desk.outreach.dial_due() == 0
    desk.clock.now = local(8, 30, day=3)  # quiet hours over, but the plan's window opens at 09:00
    assert await desk.outreach.dial_due() == 0
    assert desk.ari.originated == []
    desk.clock.now = local(9, 0, day=3)
    assert await desk.outreach.dial_due() == 1


async def test_a_number_on_the_do_not_call_list_is_never_dialled(desk: Desk) -> None:
    index = await desk.outreach._services().registry.phone_index(PHONE)
    with desk.outreach._sessions.begin() as session:
        session.add(DoNotCall(phone_index=index, added_at=desk.clock.now, added_by="test", reason="patient request"))
    fire(desk, plan_for(desk))
    assert await desk.outreach.dial_due() == 0
    assert desk.ari.originated == []
    (row,) = attempts(desk)
    assert (row.state, row.outcome) == ("cancelled", "do_not_call")


async def test_unanswered_calls_are_retried_then_a_nurse_is_asked(desk: Desk) -> None:
    fire(desk, plan_for(desk))
    assert await desk.outreach.dial_due() == 1
    await desk.settle()
    hang_up_unanswered(desk, desk.ari.originated[0]["channelId"], cause=19)
    await desk.settle()
    first, second = attempts(desk)
    assert (first.state, first.outcome) == ("failed", "no_answer")
    assert second.state == "scheduled"
    assert second.not_before == desk.clock.now + timedelta(minutes=30)
    assert await desk.outreach.dial_due() == 0  # the backoff holds
    desk.clock.now += timedelta(minutes=30)
    assert await desk.outreach.dial_due() == 1
    await desk.settle()
    hang_up_unanswered(desk, desk.ari.originated[1]["channelId"], cause=17)
    await desk.settle()
    assert [a.outcome for a in attempts(desk)] == ["no_answer", "busy"]  # max_attempts = 2: no third
    (task,) = desk.outreach.tasks.open_tasks(kind="unreachable")
    assert (task.role, task.assignee) == ("nurse", None)


async def test_the_trunk_cap_holds_calls_back(desk: Desk) -> None:
    fire(desk, plan_for(desk))
    fire(desk, plan_for(desk))
    assert await desk.outreach.dial_due() == 1  # trunk_cap = 1
    await desk.settle()
    assert await desk.outreach.dial_due() == 0  # still ringing: the second call waits
    assert len(desk.ari.originated) == 1


# -- the complaint answer call's score, through the port of the call -----------------------------------------------


async def test_the_survey_score_reaches_the_complaint_task_through_the_call_port(desk: Desk, engine: Engine) -> None:
    now = desk.clock.now
    task = Complaint("c-1", "attitude", now - timedelta(days=1), "resolved", "cardiology",
                     now - timedelta(hours=20), now - timedelta(hours=1))  # fmt: skip
    store = ComplaintStore.for_engine(engine)
    store.add(StoredComplaint(task, "call-1", "态度差", desk.patient, None, "sup.one"))
    attempt = desk.outreach.attempts.open_round(SURVEY_KIND, "c-1", desk.patient, now, now)
    assert attempt is not None
    port = CallOutreach(desk.outreach, patient_of=lambda: desk.patient, context=CallContext(attempt))
    await port.record_survey(4)
    await port.record_survey(4)  # the node run twice: one answer, one audit entry
    stored = store.get("c-1")
    assert stored is not None
    assert (stored.task.state, stored.task.survey_score, stored.task.answered_at) == ("answered", 4, now)
    entries = SqlAuditStore(engine).entries()
    answers = [e for e in entries if e.details and json.loads(e.details).get("step") == "answer"]
    assert [(e.actor, e.role) for e in answers] == [(SYSTEM_ACTOR, SYSTEM_ROLE)]
    # A call that is no complaint answer call has no task to write a score on.
    plan_call = CallOutreach(desk.outreach, patient_of=lambda: desk.patient,
                             context=CallContext(replace(attempt, kind="followup")))  # fmt: skip
    with pytest.raises(OutreachUnavailable, match="no complaint answer call"):
        await plan_call.record_survey(4)
    with pytest.raises(OutreachUnavailable, match="no complaint answer call"):
        await CallOutreach(desk.outreach, patient_of=lambda: desk.patient).record_survey(4)
