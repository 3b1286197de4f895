"""Recordings, consent and signed call records end to end: the real sandbox, SIPp patients, a SIPp agent phone,
the key service in its own process, and the CLI as an auditor or supervisor would use it.

The desk flow asks for the recorded consent to a remote consultation (press 1, then 1 again) and then queues
the caller for a general agent, whose phone answers and talks. Afterwards the database, the recordings store,
Asterisk's spool and the CLI are checked: what is stored is encrypted, nothing plain is left behind, an
authorised export decrypts to exactly the audio that was recorded, an unauthorised one is refused and audited,
and the signed records verify.
"""

from __future__ import annotations

import hashlib
import socket
import time
import wave
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore
from ground import db
from ground.config import Config
from medhotline.cli import main as cli
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, Press
from medhotline.phones.agent import AgentPhone
from medhotline.service import recording_spool
from recordings.records import CallRecordStore
from recordings.signed import Header
from recordings.store import RecordingRow, RecordingStore
from routing.store import AgentStore
from tests.integration.conftest import Hotline, running_hotline

pytestmark = pytest.mark.integration

DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / "recorded_desk.yaml"
SETTINGS = """
[routing]
ring_timeout = 8
wrap_up = 0.5
first_announcement = 30
refresh_interval = 0.2
"""
# The consent text takes about two seconds to read, then six seconds are given for the key: pressing 3.5 s
# after the answer lands in that window, and so does the second press 3 s later (after the shorter question).
CONSENTING: list[Action] = [Press(3500, "1"), Press(3000, "1")]


@pytest.fixture(scope="module")
def hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, AgentPhone]]:
    phone = AgentPhone("rec1", free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=500, talk_ms=2500)
    phone.start()

    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        now = datetime.now(UTC)
        AgentStore(sessions).add_agent_with_account("rec1", "rec1", ["agent"], "rec1", now, contact=phone.contact)
        accounts = AccountStore(sessions)
        # Unidentified callers' recordings belong to the hotline department (recordings.department).
        accounts.add("sup1", "Quality supervisor", ["supervisor"], now, departments=["hotline"])
        accounts.add("sup2", "Another department's supervisor", ["supervisor"], now, departments=["cardiology"])

    state = tmp_path_factory.mktemp("recordings")
    try:
        with running_hotline(
            state, "rec", SETTINGS, flow="recorded_desk", extra_flows=(DESK,), before_start=setup
        ) as running:
            wait_for_endpoint(running, "rec1")
            yield running, phone
    finally:
        phone.stop()


def wait_for_endpoint(hotline: Hotline, endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while f" {endpoint}/" not in hotline.sandbox.cli_output("pjsip show endpoints"):
        assert time.monotonic() < deadline, "the agent's endpoint was not configured in Asterisk"
        time.sleep(0.5)


def new_call(hotline: Hotline, before: set[str], timeout: float = 60.0) -> db.CallRecord:
    deadline = time.monotonic() + timeout
    while True:
        new = [r for r in hotline.repo.list_recent(50) if r.id not in before and r.outcome != "in_progress"]
        if new:
            return new[0]
        assert time.monotonic() < deadline, "the call did not finish"
        time.sleep(0.2)


def stored_recordings(config: Config, call_id: str, count: int, timeout: float = 30.0) -> list[RecordingRow]:
    store = RecordingStore(db.make_sessionmaker(config.database_url))
    deadline = time.monotonic() + timeout
    while True:
        rows = store.for_call(call_id)
        if len(rows) >= count and all(r.state == "stored" and r.spool_removed_at for r in rows):
            return rows
        assert time.monotonic() < deadline, f"recordings not stored: {[(r.kind, r.state, r.error) for r in rows]}"
        time.sleep(0.3)


def records_of(config: Config, call_id: str, kinds: set[str], timeout: float = 30.0) -> dict[str, Header]:
    records = CallRecordStore(db.make_sessionmaker(config.database_url))
    deadline = time.monotonic() + timeout
    while True:
        found = {r.kind: Header.parse(r.header) for r in records.for_call(call_id)}
        if kinds <= set(found):
            return found
        assert time.monotonic() < deadline, f"signed records {sorted(kinds)} not made; found {sorted(found)}"
        time.sleep(0.3)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_consented_call_answered_by_an_agent_is_recorded_encrypted_and_signed(
    hotline: tuple[Hotline, AgentPhone], tmp_path: Path
) -> None:
    desk, phone = hotline
    config = desk.config
    before = desk.call_ids()
    patient = desk.call(config.hotline.number, CONSENTING)
    assert patient.succeeded, patient.errors
    record = new_call(desk, before)
    path = [(s.flow, s.node, s.edge) for s in desk.repo.steps(record.id)]
    assert ("recorded_desk", "consent_remote", "given") in path
    assert ("queue", "answered", "rec1") in path
    assert phone.count("ANSWERED") >= 1

    rows = {r.kind: r for r in stored_recordings(config, record.id, 2)}
    assert set(rows) == {"consent", "conversation"}
    for row in rows.values():
        assert row.path is not None
        assert row.retention_class == "outpatient"
        stored = config.recordings_store / row.path
        assert stored.read_bytes()[:5] == b"MHREC", "a stored recording is not in the encrypted format"
        assert sha256(stored) == row.cipher_sha256
        assert row.duration_seconds is not None
        assert row.duration_seconds > 0.5
        assert row.retain_until is not None
        assert row.retain_until.year >= row.started_at.year + 15
    # No plaintext left: not in Asterisk's spool, and nothing in the store that is not ciphertext.
    spool = recording_spool(config)
    assert not [p.name for p in spool.glob(f"*{record.id}*")], "plaintext recordings left in the spool"
    for file in config.recordings_store.rglob("*"):
        if file.is_file():
            assert not file.read_bytes().startswith(b"RIFF"), f"plain WAV in the store: {file}"
            assert ".tmp-" not in file.name, f"temporary left behind: {file}"

    # The consent's signed record names its recording's hash; the summary names both recordings.
    headers = records_of(config, record.id, {"consent", "call_summary"})
    consent = rows["consent"]
    assert [(c.id, c.plain_sha256) for c in headers["consent"].recordings] == [(consent.id, consent.plain_sha256)]
    assert {c.id for c in headers["call_summary"].recordings} == {r.id for r in rows.values()}
    assert headers["call_summary"].agent == "rec1"
    assert cli(["--config", str(desk.config_path), "records", "verify", record.id]) == 0

    # An authorised export (a hotline supervisor, with a reason) re-encrypted to the requester decrypts to the
    # very audio recorded: its SHA-256 is the stored plaintext digest.
    conversation = rows["conversation"]
    base = ["--config", str(desk.config_path), "recordings"]
    private, public = tmp_path / "sup1.key", tmp_path / "sup1.pub"
    assert cli([*base, "keygen", "--private", str(private), "--public", str(public)]) == 0
    export = tmp_path / "call.mhexp"
    reason = ["--reason", "quality review of a recorded call"]
    assert (
        cli(
            [
                *base,
                "export",
                conversation.id,
                "--as",
                "sup1",
                *reason,
                "--recipient",
                str(public),
                "--out",
                str(export),
            ]
        )
        == 0
    )
    assert export.read_bytes()[:5] != b"RIFF"
    audio = tmp_path / "call.wav"
    assert cli([*base, "decrypt-export", str(export), "--identity", str(private), "--out", str(audio)]) == 0
    assert sha256(audio) == conversation.plain_sha256
    with wave.open(str(audio), "rb") as w:
        assert w.getnframes() / w.getframerate() > 1.0  # both parties, for the length of the conversation

    # Unauthorised: the agent (agents hear no recordings) and another department's supervisor are refused.
    for account in ("rec1", "sup2"):
        refused = tmp_path / f"{account}.mhexp"
        out = ["--recipient", str(public), "--out", str(refused)]
        assert cli([*base, "export", conversation.id, "--as", account, *reason, *out]) != 0
        assert not refused.exists()
    engine = db.make_engine(config.database_url)
    try:
        entries = list(SqlAuditStore(engine).entries())
    finally:
        engine.dispose()
    denied = [e for e in entries if e.action == "denied" and '"recording"' in e.details and e.actor in ("rec1", "sup2")]
    assert {e.actor for e in denied} == {"rec1", "sup2"}
    exports = [e for e in entries if e.action == "export" and e.actor == "sup1" and e.outcome == "success"]
    assert exports
    assert all(e.reason == "quality review of a recorded call" for e in exports)


def test_a_caller_who_hangs_up_before_confirming_gives_no_consent(hotline: tuple[Hotline, AgentPhone]) -> None:
    desk, _ = hotline
    config = desk.config
    before = desk.call_ids()
    patient = desk.call(config.hotline.number, [Press(3500, "1")], hang_up_after_ms=5500)
    assert patient.succeeded, patient.errors
    record = new_call(desk, before)
    assert record.outcome == "caller_hangup"
    (row,) = stored_recordings(config, record.id, 1)
    assert row.kind == "consent"  # the exchange itself is kept as part of the call's record
    time.sleep(2.0)  # longer than a consent takes to be sealed after its recording is stored
    kinds = {r.kind for r in CallRecordStore(db.make_sessionmaker(config.database_url)).for_call(record.id)}
    assert "consent" not in kinds


def test_over_fastagi_the_consent_is_recorded_by_mixmonitor_and_the_queue_records_the_agent(
    hotline: tuple[Hotline, AgentPhone],
) -> None:
    """The legacy path: the IVR (and its consent recording, by MixMonitor) over FastAGI, then the ARI queue."""
    desk, _ = hotline
    config = desk.config
    before = desk.call_ids()
    patient = desk.call("agi-" + config.hotline.number, CONSENTING)
    assert patient.succeeded, patient.errors
    record = new_call(desk, before)
    assert record.transport == "fastagi"
    path = [(s.flow, s.node, s.edge) for s in desk.repo.steps(record.id)]
    assert ("recorded_desk", "consent_remote", "given") in path
    assert ("queue", "answered", "rec1") in path
    rows = {r.kind: r for r in stored_recordings(config, record.id, 2)}
    assert set(rows) == {"consent", "conversation"}
    assert rows["consent"].duration_seconds is not None
    assert rows["consent"].duration_seconds > 1.0  # the consent exchange itself, not an empty file
    headers = records_of(config, record.id, {"consent", "call_summary"})
    assert [c.id for c in headers["consent"].recordings] == [rows["consent"].id]
    assert not list(recording_spool(config).glob(f"*{record.id}*"))
    assert cli(["--config", str(desk.config_path), "records", "verify", record.id]) == 0
