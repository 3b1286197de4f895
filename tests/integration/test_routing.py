"""Routing to real SIP phones: SIPp agent phones at their static contacts, SIPp patients, the real sandbox.

Six agents: a physician who answers, a physician whose phone never answers, a nurse, two general agents and a
"physician" whose licence has expired; besides them the on-call phone, an agent who talks until the patient hangs
up and a supervisor's phone (for the supervisor actions). Each test puts exactly the agents it needs into the ready
state (the rest are paused, as a supervisor would), places patient calls through the test desk flow (one key per
consult category), and checks what the phones saw and what the database recorded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.config import Config
from medhotline.cli import main as cli
from medhotline.commands.supervise import ari_client
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, PhoneCall, Press, place_call
from medhotline.phones.agent import NEVER_MS, AgentPhone
from medhotline.phones.tone_pcap import tone_pcap
from medhotline.supervision import Supervision, Supervisor
from routing.ari_supervision import PhoneSettings
from routing.store import AgentStore
from tests.integration.conftest import CALLER, Hotline, running_hotline
from tests.integration.rtp_tap import RtpTap

pytestmark = pytest.mark.integration

DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / "routing_desk.yaml"
KEYS = {"diagnosis": "1", "general": "2", "emergency": "3", "medication": "4"}
# Emergencies escalate to the on-call phone after 10 s here; every category is spelled out, as a site would.
RULES = """
emergency:
  required: [[physician_license, nurse_license]]
  escalation: {after: 10, group: on_call}
diagnosis:
  required: [[physician_license]]
  head_start: 30
medication:
  required: [[pharmacist_license, physician_license]]
adverse_reaction:
  required: [[physician_license, nurse_license]]
vaccination:
  required: [[nurse_license, physician_license]]
triage:
  required: [[nurse_license, physician_license]]
appointment: {}
general: {}
"""
ROUTING = """
[routing]
rules_file = "{rules}"
ring_timeout = 4
wrap_up = 0.5
no_answer_pause = 600
first_announcement = 1
announce_every = 5
refresh_interval = 0.2

# The on-call group's own number leads nowhere here (no such endpoint: nobody answers), so the escalation goes
# on to its second target, the on-call phone at 8001, standing in for the external emergency number.
[routing.escalation_groups.on_call]
number = "8009"
ring_seconds = 5
then_number = "8001"
"""
YEAR = timedelta(days=365)
# Which phone each agent has, how it behaves, and the licence it holds (None: a general agent).
AGENTS: dict[str, tuple[str, str | None, bool]] = {
    # id: (role, licence kind, licence valid)
    "exdoc": ("physician", "physician_license", False),  # added first: the longest idle of all, never to ring
    "phys": ("physician", "physician_license", True),
    "slowdoc": ("physician", "physician_license", True),
    "nurse": ("nurse", "nurse_license", True),
    "gen1": ("agent", None, True),
    "gen2": ("agent", None, True),
    # The on-call physician's phone: never in the queue (always paused), reached by escalation at 8001.
    "oncall": ("physician", "physician_license", True),
    # A general agent who talks until the patient hangs up, and a supervisor's own phone (never in the queue).
    "talker": ("agent", None, True),
    "sup": ("supervisor", None, True),
}
TALK_MS = {"talker": 60_000, "sup": 60_000}
# What the supervisor says (a tone nothing else in the hotline makes) and what the agent's microphone picks up
# (a real phone sends audio all the time; a bridge mixes only what arrives).
SUPERVISOR_HZ = 1777
PLAYS = {"sup": tone_pcap(SUPERVISOR_HZ, 30), "talker": tone_pcap(425, 60, amplitude=1500)}
ENDPOINTS = {"oncall": "8001"}


class Desk:
    """The running hotline with its agents and their phones."""

    def __init__(self, hotline: Hotline, phones: dict[str, AgentPhone]) -> None:
        self.hotline = hotline
        self.phones = phones
        self.store = AgentStore(db.make_sessionmaker(hotline.config.database_url))
        self.pool = ThreadPoolExecutor(max_workers=6)

    def ready(self, *agent_ids: str) -> None:
        """Exactly these agents take calls, in this order of idle time (first = longest idle)."""
        now = datetime.now(UTC)
        for agent_id in AGENTS:
            self.store.pause(agent_id, "not in this test", now)
        self.settle()
        for agent_id in agent_ids:
            self.store.unpause(agent_id, datetime.now(UTC))
            self.settle()

    def settle(self) -> None:
        """Give every node's engine time to read the agent table (a few refresh intervals)."""
        time.sleep(0.8)

    def call(self, category: str, hang_up_after_ms: int | None = None) -> Future[PhoneCall]:
        presses: list[Action] = [Press(300, KEYS[category])]
        return self.pool.submit(self.hotline.call, self.hotline.config.hotline.number, presses, hang_up_after_ms)

    def queued_calls(self, route_node: str) -> list[str]:
        """Calls in progress that reached ``route_node`` (they are in the queue or talking)."""
        repo = self.hotline.repo
        return [
            r.id
            for r in repo.list_recent(200)
            if r.outcome == "in_progress" and any(s.node == route_node for s in repo.steps(r.id))
        ]

    def wait_queued(self, route_node: str, count: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            queued = self.queued_calls(route_node)
            if len(queued) >= count:
                return queued
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} queued {route_node} calls, found {queued}")
            time.sleep(0.2)

    def rings(self, call_id: str) -> list[tuple[str, str | None]]:
        return [(r.account_id, r.outcome) for r in self.store.rings(call_id)]

    def new_calls(self, before: set[str], count: int, timeout: float = 60.0) -> list[db.CallRecord]:
        """The ``count`` calls started since ``before``, once all of them are finished, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            new = [r for r in self.hotline.repo.list_recent(500) if r.id not in before]
            if len(new) == count and all(r.outcome != "in_progress" for r in new):
                return sorted(new, key=lambda r: r.started_at)
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} finished new calls, found {new}")
            time.sleep(0.2)


def add_agents(phones: dict[str, AgentPhone]) -> Callable[[Config], None]:
    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        store = AgentStore(sessions)
        now = datetime.now(UTC)
        AccountStore(sessions).add("admin1", "Credentials office", ["admin"], now)
        for agent_id, (role, kind, valid) in AGENTS.items():
            endpoint = ENDPOINTS.get(agent_id, agent_id)
            store.add_agent_with_account(agent_id, agent_id, [role], endpoint, now, contact=phones[agent_id].contact)
            if kind is not None:
                until = now + YEAR if valid else now - timedelta(days=1)
                cred = store.add_credential(agent_id, kind, f"L-{agent_id}", "卫健委", now - YEAR, until, now)
                store.verify_credential(cred, "admin1", now)

    return setup


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    phones = {
        agent_id: AgentPhone(
            agent_id,
            free_port(socket.SOCK_DGRAM),
            free_rtp_range(4),
            answer_after_ms=NEVER_MS if agent_id == "slowdoc" else 600,
            talk_ms=TALK_MS.get(agent_id, 1500),
            play=PLAYS.get(agent_id),
        ).start()
        for agent_id in AGENTS
    }
    state = tmp_path_factory.mktemp("routing")
    rules = state / "routing.yaml"
    rules.write_text(RULES, encoding="utf-8")
    try:
        with running_hotline(
            state,
            "route",
            ROUTING.format(rules=rules),
            flow="routing_desk",
            extra_flows=(DESK,),
            before_start=add_agents(phones),
        ) as hotline:
            running = Desk(hotline, phones)
            wait_for_endpoints(hotline)
            yield running
            running.pool.shutdown(wait=True)
    finally:
        for phone in phones.values():
            phone.stop()


def wait_for_endpoints(hotline: Hotline, timeout: float = 30.0) -> None:
    """The service writes the agents' PJSIP endpoints into the sandbox and reloads res_pjsip."""
    deadline = time.monotonic() + timeout
    while True:
        out = hotline.sandbox.cli_output("pjsip show endpoints")
        if all(f" {ENDPOINTS.get(a, a)}/" in out for a in AGENTS):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"agent endpoints not configured in Asterisk:\n{out}")
        time.sleep(0.5)


def test_a_diagnosis_call_rings_only_the_physician(desk: Desk) -> None:
    desk.ready("exdoc", "gen1", "nurse", "phys")  # exdoc longest idle, but its licence has expired
    before = desk.hotline.call_ids()
    patient = desk.call("diagnosis").result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert record.outcome == "routed"
    assert desk.rings(record.id) == [("phys", "answered")]
    assert desk.phones["phys"].count("ANSWERED") >= 1
    for other in ("exdoc", "gen1", "nurse"):
        assert desk.phones[other].count("RINGING") == 0, f"{other} rang for a diagnosis call"
    # The conversation really happened: the agent hung up after talking and the patient heard the hang-up.
    assert "HUNGUP_BY_SERVICE" in patient.stamps
    # Held through wrap-up (0.5 s here), then released.
    deadline = time.monotonic() + 5
    while desk.store.view("phys").reserved_call_id is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert desk.store.view("phys").reserved_call_id is None


def test_an_emergency_behind_three_general_calls_is_answered_first(desk: Desk) -> None:
    desk.ready()  # nobody: the calls have to wait
    before = desk.hotline.call_ids()
    generals = [desk.call("general") for _ in range(3)]
    general_ids = desk.wait_queued("general", 3)
    emergency = desk.call("emergency")
    (emergency_id,) = desk.wait_queued("emergency", 1)
    time.sleep(1.0)  # the emergency is queued behind three older calls
    desk.store.unpause("nurse", datetime.now(UTC))  # one agent who may take either kind frees up
    deadline = time.monotonic() + 30
    while not desk.rings(emergency_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    for agent_id in ("gen1", "gen2"):
        desk.store.unpause(agent_id, datetime.now(UTC))
    calls = [f.result(timeout=120) for f in (*generals, emergency)]
    assert all(c.succeeded for c in calls), [c.errors for c in calls]
    records = {r.id: r for r in desk.new_calls(before, 4)}
    assert set(records) == {*general_ids, emergency_id}
    assert all(r.outcome == "routed" for r in records.values())
    # The emergency was the newest of the four calls ...
    assert all(records[g].started_at < records[emergency_id].started_at for g in general_ids)
    # ... and the first to ring anyone: the nurse, and she answered.
    rings = sorted(
        (ring.rung_at, ring.call_id, ring.account_id, ring.outcome) for c in records for ring in desk.store.rings(c)
    )
    assert rings[0][1:] == (emergency_id, "nurse", "answered")
    assert {ring[2] for ring in rings if ring[1] in general_ids} <= {"gen1", "gen2", "nurse"}


def test_an_unanswered_ring_moves_to_the_next_agent_and_pauses_the_first(desk: Desk) -> None:
    desk.ready("slowdoc", "phys")  # slowdoc is longer idle: rings first, never answers
    before = desk.hotline.call_ids()
    patient = desk.call("diagnosis").result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert desk.rings(record.id) == [("slowdoc", "no_answer"), ("phys", "answered")]
    assert desk.store.view("slowdoc").paused_reason == "no answer"
    assert desk.phones["slowdoc"].count("CANCELLED") >= 1


def test_a_frozen_agent_stops_receiving_calls_even_while_ringing(desk: Desk) -> None:
    desk.ready("slowdoc", "phys")
    before = desk.hotline.call_ids()
    pending = desk.call("diagnosis")
    (call_id,) = desk.wait_queued("diagnosis", 1)
    deadline = time.monotonic() + 20
    while desk.rings(call_id) != [("slowdoc", None)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert desk.rings(call_id) == [("slowdoc", None)]
    code = cli(
        ["--config", str(desk.hotline.config_path), "agents", "freeze", "slowdoc", "--reason", "licence suspended"]
    )
    assert code == 0
    patient = pending.result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert desk.rings(record.id) == [("slowdoc", "released"), ("phys", "answered")]
    # The freeze is an audited permission change.
    engine = db.make_engine(desk.hotline.config.database_url)
    try:
        entries = list(AuditLog(SqlAuditStore(engine)).store.entries())
    finally:
        engine.dispose()
    assert any(e.action == "account_freeze" for e in entries)
    # And no new call reaches the frozen agent, even if it is the only physician left ready.
    desk.ready("slowdoc")
    rings_before = desk.phones["slowdoc"].count("RINGING")
    before = desk.hotline.call_ids()
    patient = desk.call("diagnosis", hang_up_after_ms=5000).result(timeout=60)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert record.outcome == "caller_hangup"
    assert desk.rings(record.id) == []
    assert desk.phones["slowdoc"].count("RINGING") == rings_before


def test_a_caller_hanging_up_while_waiting_leaves_nothing_reserved(desk: Desk) -> None:
    desk.ready()
    before = desk.hotline.call_ids()
    patient = desk.call("medication", hang_up_after_ms=3000).result(timeout=60)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert record.outcome == "caller_hangup"
    assert all(view.reserved_call_id is None for view in desk.store.routing_snapshot())
    assert "routing_desk" in (record.flow or "")


def test_a_waiting_caller_pressing_0_becomes_an_emergency(desk: Desk) -> None:
    desk.ready()
    before = desk.hotline.call_ids()
    pending = desk.pool.submit(
        desk.hotline.call, desk.hotline.config.hotline.number, [Press(300, KEYS["general"]), Press(3000, "0")], None
    )
    (call_id,) = desk.wait_queued("general", 1)
    deadline = time.monotonic() + 30
    while not any(s.node == "reclassified" for s in desk.hotline.repo.steps(call_id)):
        assert time.monotonic() < deadline, "the waiting call was not reclassified"
        time.sleep(0.2)
    desk.ready("gen1", "nurse")  # gen1 is the longer idle, but may not take an emergency
    patient = pending.result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert desk.rings(record.id) == [("nurse", "answered")]
    steps = [(s.node, s.edge, s.input) for s in desk.hotline.repo.steps(record.id) if s.flow == "queue"]
    # The route prompt is the queue's on ARI (docs/routing.md); the key may come before its end or after it.
    assert ("route_prompt", "played", desk.hotline.sound_of("routing_desk", "general")) in steps
    queue_path = [step for step in steps if step[0] != "route_prompt"]
    assert queue_path == [
        ("queued", "general", "normal"),
        ("reclassified", "emergency", "0"),
        ("answered", "nurse", None),
    ]


def test_an_emergency_nobody_takes_escalates_to_the_group_then_its_second_target(desk: Desk) -> None:
    desk.ready()
    answered_before = desk.phones["oncall"].count("ANSWERED")
    before = desk.hotline.call_ids()
    patient = desk.call("emergency").result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert (record.outcome, record.transfer_to) == ("transferred", "8009")
    assert desk.rings(record.id) == []
    assert desk.phones["oncall"].count("ANSWERED") == answered_before + 1
    escalated = [s for s in desk.hotline.repo.steps(record.id) if s.node == "escalated"]
    assert [(s.flow, s.edge) for s in escalated] == [("queue", "on_call")]


def test_a_call_whose_ivr_ran_over_fastagi_joins_the_same_queue(desk: Desk) -> None:
    desk.ready("gen1")
    before = desk.hotline.call_ids()
    number = f"agi-{desk.hotline.config.hotline.number}"
    patient = desk.pool.submit(desk.hotline.call, number, [Press(300, KEYS["general"])], None).result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert (record.transport, record.outcome) == ("fastagi", "routed")
    assert desk.rings(record.id) == [("gen1", "answered")]
    assert [s.node for s in desk.hotline.repo.steps(record.id) if s.flow == "queue"] == ["queued", "answered"]
    assert "HUNGUP_BY_SERVICE" in patient.stamps


def test_an_identified_caller_is_visible_to_the_answering_agent_only_during_the_call(desk: Desk) -> None:
    """Privacy end to end: the registry (through the key service) identifies the caller, the agent who answers
    may read that patient while on the call (the access policy's current-call scope), and not afterwards."""
    config = desk.hotline.config_path
    registered = subprocess.run(
        [sys.executable, "-m", "medhotline", "--config", str(config), "patients", "add", "--from-json", "-"],
        input=json.dumps({"name": "李小雨", "phone": CALLER, "department": "pediatrics"}),
        capture_output=True,
        text=True,
        check=True,
    )
    patient_id = registered.stdout.strip()
    desk.ready("gen2")
    before = desk.hotline.call_ids()
    pending = desk.call("general")
    check = ["--config", str(config), "access", "check", "--as", "gen2", "--action", "read"]
    check += ["--kind", "patient_identity", "--patient", patient_id]
    allowed_during_call = False
    deadline = time.monotonic() + 60
    while not pending.done() and time.monotonic() < deadline:
        if desk.phones["gen2"].count("ANSWERED") and cli(check) == 0:
            allowed_during_call = True
            break
        time.sleep(0.1)
    patient = pending.result(timeout=90)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    path = [(s.flow, s.node, s.edge) for s in desk.hotline.repo.steps(record.id)]
    assert ("routing_desk", "identify", "found") in path
    assert ("queue", "answered", "gen2") in path
    assert allowed_during_call, "the answering agent could not read the caller's record during the call"
    deadline = time.monotonic() + 10
    while cli(check) == 0:  # the scope ends with the wrap-up
        assert time.monotonic() < deadline, "the agent could still read the record after the call"
        time.sleep(0.3)
    # The IVR's lookup is audited as a system read of that patient, never with the number itself.
    engine = db.make_engine(desk.hotline.config.database_url)
    try:
        entries = list(SqlAuditStore(engine).entries())
    finally:
        engine.dispose()
    lookups = [e for e in entries if e.actor == "ivr" and e.reason == "caller identification"]
    assert lookups
    assert all(CALLER not in (e.details or "") for e in entries)


def test_a_caller_hanging_up_while_the_agent_rings_cancels_the_ring(desk: Desk) -> None:
    unfrozen = cli(["--config", str(desk.hotline.config_path), "agents", "unfreeze", "slowdoc", "--reason", "cleared"])
    assert unfrozen == 0
    desk.ready("slowdoc")  # rings 4 s and never answers; the caller gives up before that
    cancelled_before = desk.phones["slowdoc"].count("CANCELLED")
    before = desk.hotline.call_ids()
    pending = desk.call("diagnosis", hang_up_after_ms=3000)
    (call_id,) = desk.wait_queued("diagnosis", 1)
    patient = pending.result(timeout=60)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert record.id == call_id
    assert record.outcome == "caller_hangup"
    assert desk.rings(record.id) == [("slowdoc", "caller_gone")]
    deadline = time.monotonic() + 10
    while desk.phones["slowdoc"].count("CANCELLED") == cancelled_before:
        assert time.monotonic() < deadline, "the agent's phone kept ringing after the caller left"
        time.sleep(0.2)
    view = desk.store.view("slowdoc")
    assert view.reserved_call_id is None
    assert view.paused_reason is None  # the caller left: not the agent's fault


def test_a_supervisor_whispers_to_the_agent_and_escalates_a_waiting_call(desk: Desk) -> None:
    """Whisper: the supervisor's phone (a SIPp UAS) is answered and bridged with a snoop on the AGENT's leg whose
    whisper goes ``out`` (to the agent's phone only); the conversation bridge is untouched; the action is audited
    with its reason; the patient's hang-up takes the supervision down. Escalate: a waiting call becomes an
    emergency, its path saying a supervisor moved it."""
    config = desk.hotline.config
    desk.ready("talker")
    before = desk.hotline.call_ids()
    pending = desk.call("general", hang_up_after_ms=9000)
    (call_id,) = desk.wait_queued("general", 1)
    deadline = time.monotonic() + 20
    while ("talker", "answered") not in desk.rings(call_id):
        assert time.monotonic() < deadline, "the agent did not answer"
        time.sleep(0.1)
    reason = "coaching the new agent on the script"

    async def whisper() -> None:
        engine = db.make_engine(config.database_url)
        ari = ari_client(config)
        try:
            supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), ari, lambda: datetime.now(UTC),
                                      PhoneSettings(caller_id=config.hotline.number, poll_seconds=0.2))  # fmt: skip
            tap, watching = await supervision.step_in(Supervisor("sup"), "whisper", call_id, reason)
            assert (tap.spy, tap.whisper) == ("both", "out")
            assert tap.agent_channel.startswith("agent-")
            bridges = {b["id"]: set(b["channels"]) for b in await ari.request("GET", "/bridges")}
            # The conversation holds the patient and the agent's leg, nothing else.
            assert bridges[f"talk-{call_id}"] == {tap.patient_channel, tap.agent_channel}
            assert bridges[tap.bridge] == {tap.supervisor_channel, tap.snoop_channel}
            channels = {c["id"]: c for c in await ari.request("GET", "/channels")}
            assert channels[tap.supervisor_channel]["state"] == "Up"
            # Asterisk names a snoop channel after the channel it taps (whose unique id is the agent leg's id).
            assert channels[tap.snoop_channel]["name"].startswith(f"Snoop/{tap.agent_channel}-")
            assert desk.phones["sup"].count("ANSWERED") == 1
            # The patient hangs up (9 s after the key): the supervision ends and leaves nothing behind.
            await asyncio.wait_for(watching, timeout=30)
            # ARI lists channels and bridges from Asterisk's snapshot cache, which follows a hang-up or a bridge's
            # removal a moment later: give the lists up to 2 s to catch up.
            ours = {tap.supervisor_channel, tap.snoop_channel, tap.bridge}
            for _ in range(40):
                left = {c["id"] for c in await ari.request("GET", "/channels")}
                left |= {b["id"] for b in await ari.request("GET", "/bridges")}
                if not left & ours:
                    break
                await asyncio.sleep(0.05)
            assert not left & ours
        finally:
            await ari.aclose()
            engine.dispose()

    asyncio.run(whisper())
    patient = pending.result(timeout=60)
    assert patient.succeeded, patient.errors
    (record,) = desk.new_calls(before, 1)
    assert record.outcome == "routed"
    # The supervisor's leg and its snoop are the service's to ignore, not unknown calls to warn about.
    assert config.service.log_file is not None
    log_lines = config.service.log_file.read_text(encoding="utf-8").splitlines()
    assert not [
        line
        for line in log_lines
        if "event_for_unknown_channel" in line and ("supervisor-" in line or "supsnoop-" in line)
    ]
    engine = db.make_engine(config.database_url)
    try:
        entries = [e for e in SqlAuditStore(engine).entries() if '"supervision"' in e.details and e.actor == "sup"]
    finally:
        engine.dispose()
    (entry,) = entries
    assert (entry.action, entry.outcome, entry.reason) == ("change", "success", reason)
    details = json.loads(entry.details)
    assert (details["action"], details["call"], details["agent"], details["whisper"]) == (
        "whisper",
        call_id,
        "talker",
        "out",
    )

    desk.ready()  # nobody takes calls: the next one waits until the supervisor moves it
    before = desk.hotline.call_ids()
    pending = desk.call("general", hang_up_after_ms=8000)
    (waiting,) = desk.wait_queued("general", 1)

    async def escalate() -> None:
        engine = db.make_engine(config.database_url)
        ari = ari_client(config)
        try:
            supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), ari, lambda: datetime.now(UTC))
            await supervision.escalate(Supervisor("sup"), waiting, "the caller sounds short of breath")
        finally:
            await ari.aclose()
            engine.dispose()

    deadline = time.monotonic() + 10
    while not any(s.node == "queued" for s in desk.hotline.repo.steps(waiting)):
        assert time.monotonic() < deadline, "the call never reached the queue"
        time.sleep(0.1)
    asyncio.run(escalate())
    assert pending.result(timeout=60).succeeded
    (record,) = desk.new_calls(before, 1)
    queue_path = [
        (s.node, s.edge, s.input)
        for s in desk.hotline.repo.steps(record.id)
        if s.flow == "queue" and s.node != "route_prompt"  # the route prompt: the queue's on ARI (docs/routing.md)
    ]
    assert queue_path[:2] == [("queued", "general", "normal"), ("reclassified", "emergency", "supervisor")]


@pytest.mark.parametrize("mode", ["whisper", "barge"])
def test_the_supervisors_voice_reaches_the_agent_only_in_whisper_and_both_in_barge(desk: Desk, mode: str) -> None:
    """RTP checked on the wire: the supervisor's phone sends a 1777 Hz tone; the packets Asterisk sends to the
    agent's and the patient's phone are decoded and the tone looked for (a loopback capture, outside the media
    path). Whisper: the agent's phone gets the tone, the patient's none of it. Barge: both get it."""
    config = desk.hotline.config
    desk.ready("talker")
    before = desk.hotline.call_ids()
    patient_media = free_rtp_range(4)
    pending = desk.pool.submit(
        place_call, target_host="127.0.0.1", target_port=config.asterisk.sip_port, service=config.hotline.number,
        local_port=free_port(socket.SOCK_DGRAM), media_port=patient_media, caller=CALLER,
        presses=[Press(300, KEYS["general"])], hang_up_after_ms=9000,
    )  # fmt: skip
    (call_id,) = desk.wait_queued("general", 1)
    deadline = time.monotonic() + 20
    while ("talker", "answered") not in desk.rings(call_id):
        assert time.monotonic() < deadline, "the agent did not answer"
        time.sleep(0.1)
    ports = {patient_media: "patient", desk.phones["talker"].media_port: "agent"}

    async def step_in(tap: RtpTap) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        engine = db.make_engine(config.database_url)
        ari = ari_client(config)
        try:
            await asyncio.sleep(1.0)
            unsupervised = tap.counts()  # the conversation alone: no tone anywhere
            tap.reset()
            supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), ari, lambda: datetime.now(UTC),
                                      PhoneSettings(caller_id=config.hotline.number, poll_seconds=0.2))  # fmt: skip
            _, watching = await supervision.step_in(Supervisor("sup"), mode, call_id, "coaching on the script")
            await asyncio.sleep(3.0)
            supervised = tap.counts()
            await asyncio.wait_for(watching, timeout=30)
            return unsupervised, supervised
        finally:
            await ari.aclose()
            engine.dispose()

    with RtpTap(ports, SUPERVISOR_HZ) as tap:
        unsupervised, supervised = asyncio.run(step_in(tap))
    assert pending.result(timeout=60).succeeded
    desk.new_calls(before, 1)
    # (packets, packets carrying the tone) per phone. Both phones receive audio throughout.
    assert min(unsupervised["agent"][0], unsupervised["patient"][0]) > 20, unsupervised
    assert unsupervised["agent"][1] == unsupervised["patient"][1] == 0, unsupervised
    assert min(supervised["agent"][0], supervised["patient"][0]) > 100, supervised
    assert supervised["agent"][1] > 50, f"the agent did not hear the supervisor: {supervised}"
    if mode == "whisper":
        assert supervised["patient"][1] == 0, f"the patient heard the whisper: {supervised}"
    else:
        assert supervised["patient"][1] > 50, f"the patient did not hear the barge: {supervised}"
