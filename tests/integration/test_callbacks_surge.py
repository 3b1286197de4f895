"""Callbacks and surge mode through the real sandbox: SIPp callers, SIPp agent phones, a SIPp patient phone that
answers the hotline's callbacks.

- Two callers wait with nobody free, hear the callback offer and press its key; they are called back in the
  order they called, one at a time for the one agent who frees up, and each talks to the agent reserved for them.
- Surge mode on: the caller hears the bulletin, presses 2 (information), then 0, and reaches the overflow
  volunteer; a caller with symptoms (1) reaches the nurse. Surge mode off: the normal hotline flow again.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.accounts import AccountStore
from ground import db
from ground.config import Config
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import PhoneCall, Press, place_call
from medhotline.phones.agent import AgentPhone
from medhotline.phones.patient import PatientPhone, dtmf_play_ms
from routing.announcements import position_text
from routing.callback_tables import CallbackRow
from routing.callbacks import CALLBACK_ACCEPTED, offer_text
from routing.store import AgentStore
from routing.surge import SYMPTOMS_CHOICE, load_profile
from tests.integration.conftest import CALLER, Hotline, running_hotline

pytestmark = pytest.mark.integration

DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / "routing_desk.yaml"
# A second made-up caller (also among the identifiers the privacy scan looks for).
OTHER_CALLER = "13800138000"
YEAR = timedelta(days=365)
AGENTS = {"gen1": ("agent", None), "nurse": ("nurse", "nurse_license"), "vol1": ("agent", "surge_volunteer")}
SETTINGS = """
[routing]
ring_timeout = 6
wrap_up = 0.5
no_answer_pause = 600
first_announcement = 1
announce_every = 30
refresh_interval = 0.2
callback_key = "1"
callback_threshold = 60
callback_retry_after = 5

[outreach]
dial_string = "PJSIP/patients/sip:{{number}}@127.0.0.1:{port}"
ring_seconds = 15
"""


class Desk:
    def __init__(self, hotline: Hotline, phones: dict[str, AgentPhone], patient_port: int) -> None:
        self.hotline = hotline
        self.phones = phones
        self.patient_port = patient_port
        self.store = AgentStore(db.make_sessionmaker(hotline.config.database_url))
        self.pool = ThreadPoolExecutor(max_workers=4)

    def ready(self, *agent_ids: str) -> None:
        for agent_id in AGENTS:
            self.store.pause(agent_id, "not in this test", datetime.now(UTC))
        time.sleep(0.8)
        for agent_id in agent_ids:
            self.store.unpause(agent_id, datetime.now(UTC))
            time.sleep(0.8)

    def call(self, caller: str, presses: list[Press]) -> Future[PhoneCall]:
        config = self.hotline.config
        return self.pool.submit(
            place_call,
            target_host="127.0.0.1",
            target_port=config.asterisk.sip_port,
            service=config.hotline.number,
            local_port=free_port(socket.SOCK_DGRAM),
            media_port=free_rtp_range(4),
            caller=caller,
            presses=presses,
        )

    def callbacks(self) -> list[CallbackRow]:
        engine = db.make_engine(self.hotline.config.database_url)
        try:
            with Session(engine) as session:
                rows = list(session.scalars(select(CallbackRow).order_by(CallbackRow.requested_at)))
                session.expunge_all()
                return rows
        finally:
            engine.dispose()

    def cli(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "medhotline", "--config", str(self.hotline.config_path), *argv],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout


def add_agents(phones: dict[str, AgentPhone]) -> Callable[[Config], None]:
    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        store = AgentStore(sessions)
        now = datetime.now(UTC)
        AccountStore(sessions).add("admin1", "Credentials office", ["admin"], now)
        for agent_id, (role, kind) in AGENTS.items():
            store.add_agent_with_account(agent_id, agent_id, [role], agent_id, now, contact=phones[agent_id].contact)
            if kind is not None:
                cred = store.add_credential(agent_id, kind, f"L-{agent_id}", "卫健委", now - YEAR, now + YEAR, now)
                store.verify_credential(cred, "admin1", now)

    return setup


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    phones = {
        agent_id: AgentPhone(agent_id, free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=600,
                             talk_ms=1500).start()
        for agent_id in AGENTS
    }  # fmt: skip
    patient_port = free_port(socket.SOCK_DGRAM)
    try:
        with running_hotline(
            tmp_path_factory.mktemp("callbacks"),
            "cb",
            SETTINGS.format(port=patient_port),
            flow="routing_desk",
            extra_flows=(DESK,),
            before_start=add_agents(phones),
        ) as hotline:
            deadline = time.monotonic() + 30
            while not all(f" {a}/" in hotline.sandbox.cli_output("pjsip show endpoints") for a in AGENTS):
                assert time.monotonic() < deadline, "agent endpoints not configured in Asterisk"
                time.sleep(0.5)
            running = Desk(hotline, phones, patient_port)
            yield running
            running.pool.shutdown(wait=True)
    finally:
        for phone in phones.values():
            phone.stop()


def wait_until(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.3)


def test_callers_who_choose_a_callback_are_called_back_in_order_by_the_reserved_agent(desk: Desk) -> None:
    hotline = desk.hotline
    desk.ready()  # nobody free: the estimated wait is unknown, so the callback is offered
    route_ms = hotline.ms_of("routing_desk", ["general"])
    announce_ms = int(1000 * max(hotline.prompt_seconds([position_text(p)]) for p in (1, 2)))
    offer_ms = int(1000 * hotline.prompt_seconds([offer_text("1")]))
    # "2" (general) at once; "1" while the offer plays, after the first position announcement.
    wait_ms = dtmf_play_ms("2") + route_ms + 1000 + announce_ms + offer_ms // 2
    presses = [Press(300, "2"), Press(wait_ms, "1")]
    before = hotline.call_ids()
    first = desk.call(CALLER, presses).result(timeout=90)
    second = desk.call(OTHER_CALLER, presses).result(timeout=90)
    for call in (first, second):
        assert call.succeeded, call.errors
        assert "HUNGUP_BY_SERVICE" in call.stamps  # told it is registered, then the hotline hung up
        # They heard the whole confirmation after pressing, not a hang-up at once.
        heard = call.stamps["HUNGUP_BY_SERVICE"] - call.stamps["ANSWERED"]
        assert heard * 1000 >= 300 + wait_ms + 1000 * hotline.prompt_seconds([CALLBACK_ACCEPTED]) - 500
    wait_until(
        "both calls are recorded as finished",
        lambda: [r.outcome for r in hotline.repo.list_recent(50) if r.id not in before] == ["routed", "routed"],
        15,
    )
    originals = sorted((r for r in hotline.repo.list_recent(50) if r.id not in before), key=lambda r: r.started_at)
    for record in originals:
        queue_path = [(s.node, s.edge, s.input) for s in hotline.repo.steps(record.id) if s.flow == "queue"]
        general = hotline.sound_of("routing_desk", "general")  # the route prompt: the queue's (docs/routing.md)
        assert queue_path == [
            ("queued", "general", "normal"),
            ("route_prompt", "playing", general), ("route_prompt", "played", general),
            ("callback_offered", None, None), ("callback", "accepted", "1"),
        ]  # fmt: skip
        assert record.outcome == "routed"
    rows = desk.callbacks()
    assert [(r.call_id, r.state) for r in rows] == [(originals[0].id, "pending"), (originals[1].id, "pending")]
    assert all(CALLER not in r.phone_enc and OTHER_CALLER not in r.phone_enc for r in rows)
    assert rows[0].phone_bidx != rows[1].phone_bidx
    # A second request from the same number is refused by the database: one open callback per number.
    assert rows[0].requested_at < rows[1].requested_at

    patient = PatientPhone("patient", desk.patient_port, free_rtp_range(4), answer_after_ms=800).start()
    agent_answers = desk.phones["gen1"].count("ANSWERED")
    try:
        desk.ready("gen1")  # one agent: the callbacks are dialled one after the other, in order of place
        wait_until("both callbacks are connected", lambda: all(r.state == "connected" for r in desk.callbacks()))
        wait_until("the patient's second call ended", lambda: sum(c.ended for c in patient.calls) >= 2, 60)
        calls, errors = patient.calls, patient.errors()
    finally:
        patient.stop()
    rows = desk.callbacks()
    assert [r.attempts for r in rows] == [1, 1], errors
    assert all((r.agent_id, r.last_outcome) == ("gen1", "answered") for r in rows)
    # Each attempt is a call of its own: the agent reserved for it answered and they talked.
    ids = [r.attempt_call_id for r in rows if r.attempt_call_id]
    wait_until(
        "both attempts are recorded as finished",
        lambda: all((c := hotline.repo.get(i)) is not None and c.outcome != "in_progress" for i in ids),
        15,
    )
    attempts = [hotline.repo.get(i) for i in ids]
    assert len(attempts) == 2
    for row, attempt in zip(rows, attempts, strict=True):
        assert attempt is not None
        assert (attempt.outcome, attempt.flow) == ("routed", "callback")
        path = [(s.node, s.edge) for s in hotline.repo.steps(attempt.id)]
        assert path[0] == ("callback", row.call_id)
        assert ("answered", "gen1") in path
        assert [(ring.account_id, ring.outcome) for ring in desk.store.rings(attempt.id)] == [("gen1", "answered")]
    assert desk.phones["gen1"].count("ANSWERED") == agent_answers + 2
    # The patient's phone received both callbacks and was connected each time (greeting, the agent's talk).
    assert len(calls) == 2, errors
    assert all(c.answered for c in calls), errors
    first_call, second_call = sorted(calls, key=lambda c: c.at("RINGING") or 0)
    for leg in (first_call, second_call):
        answered, ended = leg.at("ANSWERED"), leg.at("HUNGUP_BY_SERVICE")
        assert answered is not None, leg.labels
        assert ended is not None, leg.labels
        assert ended - answered >= 1.5  # at least the agent's talk
    # No more callbacks dialled than free agents: the second rang only after the first conversation ended.
    assert (second_call.at("RINGING") or 0) >= (first_call.at("HUNGUP_BY_SERVICE") or 0)
    # In order of place: the first caller's callback was connected first.
    assert rows[0].updated_at <= rows[1].updated_at


def test_surge_mode_bulletin_then_volunteer_for_information_nurse_for_symptoms_and_back(desk: Desk) -> None:
    hotline = desk.hotline
    profile, _ = load_profile(hotline.config.hotline.flows_dir / "surge_profiles" / "respiratory.yaml")
    desk.ready("nurse", "vol1")  # the nurse is the longer idle: the volunteer answers information calls anyway
    desk.cli("surge", "on", "--profile", "respiratory", "--reason", "演练")
    bulletin = f"{profile.bulletin.strip()}{SYMPTOMS_CHOICE}"
    wait_until("the node renders the bulletin", lambda: _rendered(hotline, bulletin), 60)
    time.sleep(1.0)  # and switches its entry flow (reload_interval 0.3 s)
    bulletin_ms = int(1000 * hotline.prompt_seconds([bulletin]))
    faq_ms = hotline.ms_of("surge_faq", ["faq_menu"])
    vol_answers, nurse_answers = desk.phones["vol1"].count("ANSWERED"), desk.phones["nurse"].count("ANSWERED")

    before = hotline.call_ids()
    # The whole bulletin, then 2 (information); in the FAQ menu 0 (a person).
    info = desk.call(CALLER, [Press(bulletin_ms + 500, "2"), Press(dtmf_play_ms("2") + faq_ms // 3, "0")])
    info_call = info.result(timeout=120)
    assert info_call.succeeded, info_call.errors
    (record,) = [r for r in hotline.repo.list_recent(20) if r.id not in before]
    path = [(s.flow, s.node, s.edge, s.input) for s in hotline.repo.steps(record.id)]
    assert ("surge_entry", "bulletin", "press 2", "2") in path
    assert ("surge_faq", "faq_menu", "press 0", "0") in path
    assert [(r.account_id, r.outcome) for r in desk.store.rings(record.id)] == [("vol1", "answered")]
    assert desk.phones["vol1"].count("ANSWERED") == vol_answers + 1
    # The caller was on the line through the whole bulletin before choosing.
    assert (info_call.stamps["HUNGUP_BY_SERVICE"] - info_call.stamps["ANSWERED"]) * 1000 >= bulletin_ms

    desk.ready("vol1", "nurse")  # now the volunteer is the longer idle: still never given a symptomatic caller
    before = hotline.call_ids()
    sick = desk.call(OTHER_CALLER, [Press(2000, "1")]).result(timeout=120)
    assert sick.succeeded, sick.errors
    (record,) = [r for r in hotline.repo.list_recent(20) if r.id not in before]
    path = [(s.flow, s.node, s.edge, s.input) for s in hotline.repo.steps(record.id)]
    assert ("surge_entry", "bulletin", "press 1", "1") in path
    assert [(r.account_id, r.outcome) for r in desk.store.rings(record.id)] == [("nurse", "answered")]
    assert desk.phones["nurse"].count("ANSWERED") == nurse_answers + 1

    desk.cli("surge", "off", "--reason", "演练结束")
    time.sleep(1.5)
    desk.ready("gen1")
    before = hotline.call_ids()
    normal = desk.call(CALLER, [Press(300, "2")]).result(timeout=120)
    assert normal.succeeded, normal.errors
    (record,) = [r for r in hotline.repo.list_recent(20) if r.id not in before]
    assert record.flow == "routing_desk"
    assert all(s.flow != "surge_entry" for s in hotline.repo.steps(record.id))
    assert [(r.account_id, r.outcome) for r in desk.store.rings(record.id)] == [("gen1", "answered")]


def _rendered(hotline: Hotline, text: str) -> bool:
    from ivr.prompts import Voice, sound_name

    voice = Voice(hotline.config.prompts.voice, hotline.config.prompts.speed)
    return (hotline.sandbox.sounds_dir / f"{sound_name(text, voice)}.wav").exists()
