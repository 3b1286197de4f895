"""Outbound calls end to end: the scheduler's job fires, the dialer originates through the real sandbox to a SIPp
UAS acting as the patient's phone, which answers and types its answers as RFC 4733 digits.

- a follow-up with an abnormal blood pressure: readings stored encrypted, a recall task for the physician;
- a medication reminder confirmed once only (1, then 2): recorded as not confirmed, and, with one attempt
  allowed, escalated to the responsible physician;
- and inbound, a patient books a vaccination slot on the keypad: the seat is taken in the database.

Key presses are timed from the lengths of the prompts the sandbox really plays (rendered WAVs), so the test
does not depend on guesses about speech speed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from ground import db
from ivr.flow_loader import load_flows
from ivr.prompts import Voice, render, sound_name
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, Press
from medhotline.phones.patient import PatientPhone, dtmf_play_ms
from medhotline.sandbox import Sandbox
from scheduler.policy import LOCAL_TZ
from scheduler.tables import MedicationConfirmation, OutreachAttempt, Reading
from scheduler.tasks import TaskStore
from tests.integration.conftest import CALLER, Hotline, running_hotline

pytestmark = pytest.mark.integration

BIRTH_YEAR = "1956"
SLACK_MS = 1200  # after a prompt has played, before the patient types (the collect waits 6 s)
MEDICATION = {"medication": "阿司匹林肠溶片", "dose": "每次一片"}


def quiet_hours_far_from_now() -> str:
    """A one-hour quiet window twelve hours away, so the test may call at any time of day."""
    far = datetime.now(LOCAL_TZ) + timedelta(hours=12)
    return f"{far:%H}:00-{(far + timedelta(hours=1)):%H}:00"


@pytest.fixture(scope="module")
def outreach(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, int, str]]:
    port = free_port(socket.SOCK_DGRAM)
    settings = f"""
[outreach]
dial_string = "PJSIP/patients/sip:{{number}}@127.0.0.1:{port}"
ring_seconds = 15
quiet_hours = "{quiet_hours_far_from_now()}"
max_attempts = 1
"""
    state = tmp_path_factory.mktemp("outreach")
    # The hotline number runs the vaccination flow here, for the inbound booking test; outbound calls run their own.
    with running_hotline(state, "out", settings, flow="vaccination") as hotline:
        added = subprocess.run(
            [sys.executable, "-m", "medhotline", "--config", str(hotline.config_path), "patients", "add",
             "--from-json", "-"],
            input=json.dumps({"name": "王建国", "phone": CALLER, "birth_year": int(BIRTH_YEAR)}),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        yield hotline, port, added.stdout.strip()


def prompt_ms(hotline: Hotline, text: str) -> int:
    voice = Voice(hotline.config.prompts.voice, hotline.config.prompts.speed)
    path = Sandbox(hotline.config).sounds_dir / f"{sound_name(text, voice)}.wav"
    return wav_ms(path)


def wav_ms(path: Path) -> int:
    with wave.open(str(path), "rb") as w:
        return int(w.getnframes() * 1000 / w.getframerate())


def nodes(hotline: Hotline, flow: str) -> dict[str, object]:
    return dict(load_flows(hotline.config.hotline.flows_dir)[flow].flow.nodes)


def say(hotline: Hotline, flow: str, node: str, field: str = "say") -> int:
    value = getattr(nodes(hotline, flow)[node], field)
    text = value if isinstance(value, str) else value.text
    return prompt_ms(hotline, text)


def run_cli(hotline: Hotline, *argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "medhotline", "--config", str(hotline.config_path), *argv],
        input=stdin, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def wait_attempt(hotline: Hotline, subject: str, timeout: float = 120.0) -> OutreachAttempt:
    engine = db.make_engine(hotline.config.database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with Session(engine) as session:
                rows = session.scalars(select(OutreachAttempt).where(OutreachAttempt.subject_id == subject)).all()
                done = [r for r in rows if r.state in ("completed", "failed", "cancelled")]
                if done:
                    return done[0]
            assert time.monotonic() < deadline, f"the outreach call did not end: {[(r.state, r.outcome) for r in rows]}"
            time.sleep(0.5)
    finally:
        engine.dispose()


def test_a_follow_up_with_an_abnormal_reading_creates_a_recall(outreach: tuple[Hotline, int, str]) -> None:
    hotline, port, patient = outreach
    intro, identity = say(hotline, "followup", "intro"), say(hotline, "followup", "identity")
    systolic, diastolic = say(hotline, "followup", "systolic"), say(hotline, "followup", "diastolic")
    presses = [
        Press(intro + identity + SLACK_MS, BIRTH_YEAR),
        Press(dtmf_play_ms(BIRTH_YEAR) + systolic + SLACK_MS, "182#"),
        Press(dtmf_play_ms("182#") + diastolic + SLACK_MS, "95#"),
    ]
    phone = PatientPhone("patient", port, free_rtp_range(4), answer_after_ms=800, presses=presses).start()
    try:
        plan = run_cli(hotline, "followups", "add", "--patient", patient, "--condition", "hypertension",
                       "--every", "7", "--window", "00:00-23:59", "--responsible", "doc1")  # fmt: skip
        attempt = wait_attempt(hotline, plan)
        answered, errors = phone.count("ANSWERED"), phone.errors()
    finally:
        phone.stop()
    assert (attempt.state, attempt.outcome) == ("completed", "completed"), errors
    assert answered == 1
    assert attempt.call_id is not None
    path = [(s.node, s.edge) for s in hotline.repo.steps(attempt.call_id)]
    assert ("verify", "verified") in path
    assert ("save", "abnormal") in path
    engine = db.make_engine(hotline.config.database_url)
    try:
        with Session(engine) as session:
            readings = session.scalars(select(Reading).where(Reading.patient_id == patient)).all()
        assert sorted(r.kind for r in readings) == ["diastolic", "systolic"]
        assert not any('"value"' in r.value_token for r in readings)  # ciphertext, not the JSON it encrypts
        tasks = TaskStore.for_engine(engine).open_tasks(kind="recall", patient_id=patient)
    finally:
        engine.dispose()
    assert [(t.assignee, t.role) for t in tasks] == [("doc1", "physician")]
    # The plan moved on to its next due time, a week later.
    listed = run_cli(hotline, "followups", "list")
    assert plan in listed


def test_a_medication_reminder_confirmed_once_is_not_confirmed(
    outreach: tuple[Hotline, int, str], tmp_path: Path
) -> None:
    hotline, port, patient = outreach
    voice = Voice(hotline.config.prompts.voice, hotline.config.prompts.speed)
    rendered = tmp_path / "medication.wav"
    render(f"{MEDICATION['medication']}，{MEDICATION['dose']}。", voice, rendered)  # as the service renders it
    medication = wav_ms(rendered)
    intro, identity = say(hotline, "medication", "intro"), say(hotline, "medication", "identity")
    first = say(hotline, "medication", "remind", "intro") + medication + say(hotline, "medication", "remind", "ask")
    second = say(hotline, "medication", "remind", "repeat") + medication
    second += say(hotline, "medication", "remind", "ask_again")
    presses = [
        Press(intro + identity + SLACK_MS, BIRTH_YEAR),
        Press(dtmf_play_ms(BIRTH_YEAR) + first + SLACK_MS, "1"),
        Press(dtmf_play_ms("1") + second + SLACK_MS, "2"),
    ]
    phone = PatientPhone("patient", port, free_rtp_range(4), answer_after_ms=800, presses=presses).start()
    try:
        at = (datetime.now(LOCAL_TZ) + timedelta(hours=3)).strftime("%H:%M")
        reminder = run_cli(hotline, "reminders", "add", "--patient", patient, "--at", at, "--channel", "call",
                           "--responsible", "doc1", "--from-json", stdin=json.dumps(MEDICATION))  # fmt: skip
        run_cli(hotline, "reminders", "run-now", reminder)
        attempt = wait_attempt(hotline, reminder)
        answered, errors = phone.count("ANSWERED"), phone.errors()
    finally:
        phone.stop()
    assert answered == 1, errors
    assert attempt.state == "failed"
    engine = db.make_engine(hotline.config.database_url)
    try:
        with Session(engine) as session:
            confirmations = session.scalars(
                select(MedicationConfirmation).where(MedicationConfirmation.reminder_id == reminder)
            ).all()
        tasks = TaskStore.for_engine(engine).open_tasks(kind="medication_not_confirmed", patient_id=patient)
    finally:
        engine.dispose()
    assert [(c.confirmed, c.keys) for c in confirmations] == [(False, "1,2")]
    assert [(t.assignee, t.role) for t in tasks] == [("doc1", "physician")]
    assert datetime.now(UTC) > attempt.not_before


def test_a_patient_books_a_vaccination_slot_on_the_keypad(outreach: tuple[Hotline, int, str]) -> None:
    hotline, _, patient = outreach
    tomorrow = (datetime.now(LOCAL_TZ) + timedelta(days=1)).date()
    run_cli(hotline, "vaccination", "vaccines", "add", "influenza", "--name", "流感疫苗")
    run_cli(
        hotline, "vaccination", "clinics", "add", "community1", "--name", "社区卫生服务中心", "--department", "hotline"
    )
    run_cli(hotline, "vaccination", "slots", "add", "--clinic", "community1", "--vaccine", "influenza",
            "--start", f"{tomorrow} 09:00", "--minutes", "30", "--capacity", "3")  # fmt: skip
    flow = "vaccination"
    presses: list[Action] = [
        Press(say(hotline, flow, "intro") + say(hotline, flow, "identity") + SLACK_MS, BIRTH_YEAR),
        Press(dtmf_play_ms(BIRTH_YEAR) + say(hotline, flow, "choose_service") + SLACK_MS, "1"),
        Press(dtmf_play_ms("1") + say(hotline, flow, "choose_day") + SLACK_MS, "1"),  # tomorrow
        Press(dtmf_play_ms("1") + say(hotline, flow, "choose_slot") + SLACK_MS, "1"),  # morning
        Press(dtmf_play_ms("1") + say(hotline, flow, "confirm_booking") + SLACK_MS, "1"),
    ]
    before = hotline.call_ids()
    call = hotline.call(hotline.config.hotline.number, presses)
    assert call.succeeded, call.errors
    (record,) = [r for r in hotline.repo.list_recent(20) if r.id not in before]
    path = [(s.node, s.edge) for s in hotline.repo.steps(record.id)]
    assert ("verify", "verified") in path
    assert ("book", "booked") in path
    (booking,) = run_cli(hotline, "vaccination", "bookings", "--patient", patient).splitlines()
    assert " booked " in booking
    assert "influenza at community1" in booking
    assert f"{tomorrow} 09:00" in booking
    slots = run_cli(hotline, "vaccination", "slots", "list", "--date", str(tomorrow))
    assert "2/3 free" in slots


def test_a_service_restart_between_scheduling_and_firing_still_fires_once(
    outreach: tuple[Hotline, int, str],
) -> None:
    """The job is persisted by the running service, the service restarts before it is due, and the restarted
    service (now the leader again) fires it: one round of calls, not zero and not two."""
    hotline, _, patient = outreach
    plan = run_cli(hotline, "followups", "add", "--patient", patient, "--condition", "hypertension",
                   "--every", "7", "--window", "00:00-23:59", "--first-in-minutes", "1")  # fmt: skip
    engine = db.make_engine(hotline.config.database_url)
    try:
        deadline = time.monotonic() + 30
        while not persisted(engine, f"followup:{plan}"):
            assert time.monotonic() < deadline, "the running service never stored the plan's job"
            time.sleep(0.5)
        assert hotline.service.stop() == 0
        assert attempt_rows(engine, plan) == 0  # not due yet when the service went away
        hotline.service.start(timeout=60)
        deadline = time.monotonic() + 120
        while attempt_rows(engine, plan) == 0:
            assert time.monotonic() < deadline, "the restarted service did not fire the job"
            time.sleep(1.0)
        time.sleep(5.0)  # a second firing would open a second round by now
        assert attempt_rows(engine, plan) == 1
    finally:
        engine.dispose()


def persisted(engine: Engine, job_id: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT 1 FROM apscheduler_jobs WHERE id = :id"), {"id": job_id}).first() is not None


def attempt_rows(engine: Engine, subject: str) -> int:
    with Session(engine) as session:
        return len(session.scalars(select(OutreachAttempt).where(OutreachAttempt.subject_id == subject)).all())
