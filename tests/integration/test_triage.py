"""The triage tier end to end: a SIPp caller speaks (the scripted engine "hears" a Chinese sentence once the caller's
real audio has come through Asterisk), the real keyword classifier gives the level, the shipped hotline flow
routes, and the real routing rings agent phones (SIPp UAS).

- symptoms without a red flag ("我发烧两天了，浑身没劲") → the nurse-triage route → a nurse's phone, never the
  front desk;
- one weak cue ("胸口有点不舒服") → the caller hears "是否需要急救？需要请按1", presses 1 → an emergency.

Both depend on the classifier's triage levels (docs/triage.md): level "urgent" for the first sentence, "urgent"
with ``confirm`` for the second. Each scenario has an instance of its own, because the scripted engine hears its
sentences in order, once per listening.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from ground import db
from ground.config import Config
from ivr.flow_model import CONFIRM_QUESTION
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Press, Speak, speech_wav
from medhotline.phones.agent import AgentPhone
from routing.store import AgentStore
from tests.integration.conftest import Hotline, running_hotline

pytestmark = pytest.mark.integration

URGENT = "我发烧两天了，浑身没劲"
WEAK_CUE = "胸口有点不舒服"
BEFORE_LISTENING = ["greeting", "scope_notice", "ask"]
YEAR = timedelta(days=365)
# gen1 (no licence) is added first: the longest idle, so it would be rung first if triage ever reached it.
AGENTS: dict[str, tuple[str, str | None]] = {"gen1": ("agent", None), "nurse": ("nurse", "nurse_license")}
ROUTING = """
[routing]
ring_timeout = 6
wrap_up = 0.5
first_announcement = 30
refresh_interval = 0.2
"""


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


def wait_for_endpoints(hotline: Hotline, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = hotline.sandbox.cli_output("pjsip show endpoints")
        if all(f" {agent_id}/" in out for agent_id in AGENTS):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"agent endpoints not configured in Asterisk:\n{out}")
        time.sleep(0.5)


def desk(
    tmp_path_factory: pytest.TempPathFactory, name: str, script: list[str]
) -> Iterator[tuple[Hotline, dict[str, AgentPhone]]]:
    phones = {
        agent_id: AgentPhone(
            agent_id, free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=500, talk_ms=1500
        ).start()
        for agent_id in AGENTS
    }
    sentences = ", ".join(f'"{s}"' for s in script)
    extra = f'[speech]\nengine = "scripted"\nscript = [{sentences}]\n{ROUTING}'
    try:
        with running_hotline(tmp_path_factory.mktemp(name), name, extra, before_start=add_agents(phones)) as hotline:
            wait_for_endpoints(hotline)
            time.sleep(1.0)  # the engine has read the agent table and the phones' contacts
            yield hotline, phones
    finally:
        for phone in phones.values():
            phone.stop()


@pytest.fixture(scope="module")
def urgent_desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, dict[str, AgentPhone]]]:
    yield from desk(tmp_path_factory, "triage", [URGENT])


@pytest.fixture(scope="module")
def confirm_desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, dict[str, AgentPhone]]]:
    # The second listening is the confirmation's short speech pass: it hears nothing, so the key decides.
    yield from desk(tmp_path_factory, "confirm", [WEAK_CUE])


def test_symptoms_without_a_red_flag_reach_a_nurse(
    urgent_desk: tuple[Hotline, dict[str, AgentPhone]], tmp_path: Path
) -> None:
    hotline, phones = urgent_desk
    words = speech_wav(URGENT, "cmn", tmp_path / "caller.wav")
    before = hotline.call_ids()

    patient = hotline.call("12320", presses=[Speak(hotline.ms_of("hotline", BEFORE_LISTENING) + 1000, words)])

    assert patient.succeeded, patient.errors
    record = hotline.finished_record(before, timeout=60)
    assert (record.outcome, record.route_category, record.route_priority) == ("routed", "triage", "normal")
    assert (record.triage_level, record.triage_confirm_asked) == ("urgent", False)
    path = hotline.path(record)
    assert next((node, edge) for node, edge, _ in path if node == "ask") == ("ask", "triage urgent")
    assert any(node == "nurse_triage" for node, _, _ in path)
    rings = [
        (r.account_id, r.outcome)
        for r in AgentStore(db.make_sessionmaker(hotline.config.database_url)).rings(record.id)
    ]
    assert rings == [("nurse", "answered")]
    assert phones["nurse"].count("ANSWERED") == 1
    assert phones["gen1"].count("RINGING") == 0  # never the front desk
    assert URGENT not in (hotline.config.service.state_dir / "service.jsonl").read_text(encoding="utf-8")


def test_a_weak_cue_is_asked_once_and_key_1_makes_it_an_emergency(
    confirm_desk: tuple[Hotline, dict[str, AgentPhone]], tmp_path: Path
) -> None:
    hotline, phones = confirm_desk
    words = speech_wav(WEAK_CUE, "cmn", tmp_path / "caller.wav")
    before = hotline.call_ids()
    speak_at = hotline.ms_of("hotline", BEFORE_LISTENING) + 1000
    # The scripted engine hears the sentence after 1 s of the caller's audio; the question follows at once and
    # is heard in full (a key during it is no answer), then the key is read.
    question_ms = int(1000 * hotline.prompt_seconds([CONFIRM_QUESTION]))
    press_at = 1000 + question_ms + 4500  # after the question and the confirmation's short speech pass (4 s)

    patient = hotline.call("12320", presses=[Speak(speak_at, words), Press(press_at, "1")])

    assert patient.succeeded, patient.errors
    record = hotline.finished_record(before, timeout=60)
    assert (record.route_category, record.route_priority) == ("emergency", "emergency")
    assert record.outcome == "routed"
    assert (record.triage_level, record.triage_confirm_asked, record.triage_confirm_answer) == ("urgent", True, "key")
    ask = next((edge, heard) for node, edge, heard in hotline.path(record) if node == "ask")
    assert ask[0] == "confirmed emergency"
    assert ask[1] is not None
    assert ask[1].startswith("key: urgent")
    rings = [
        (r.account_id, r.outcome)
        for r in AgentStore(db.make_sessionmaker(hotline.config.database_url)).rings(record.id)
    ]
    assert rings == [("nurse", "answered")]  # an emergency: a clinician, never the front desk
    assert phones["gen1"].count("RINGING") == 0
