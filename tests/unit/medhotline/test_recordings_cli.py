"""``medhotline recordings`` and ``records`` through the real CLI entry point and a real key service process:
ingest of pending recordings, access-checked export (re-encrypted and watermarked), refusals audited, legal hold,
retention purge, key rotation reaching the recordings, and ``records verify`` naming a tampered recording."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore, StoredEntry
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from compliance.keystore import read_token_file
from ground import db
from ground.config import load_config
from medhotline.cli import main
from recordings.envelope import read_wav_comment
from recordings.records import KeyServiceTimestamper, RecordSealer
from recordings.store import RecordingRow, RecordingStore
from tests.unit.medhotline.cli_run import Setup, run

YEARS_16 = timedelta(days=16 * 366)
pytestmark = pytest.mark.usefixtures("reset_logging")


@pytest.fixture
def desk(setup: Setup, keyservice_process: object) -> Setup:
    """A migrated database with a supervisor of the hotline department, an agent, and a recordings spool."""
    with setup.config.open("a", encoding="utf-8") as config:
        config.write(f'[recordings]\nspool_dir = "{setup.state / "spool"}"\n')
    (setup.state / "spool").mkdir(parents=True)
    assert main(["--config", str(setup.config), "db", "upgrade"]) == 0
    now = datetime.now(UTC)
    with sessions_of(setup) as sessions:
        accounts = AccountStore(sessions)
        accounts.add("sup1", "Quality supervisor", ["supervisor"], now, departments=["hotline"])
        accounts.add("agent1", "Front desk", ["agent"], now)
    return setup


@contextmanager
def sessions_of(desk: Setup) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(desk.database_url)
    try:
        yield sessionmaker(engine, expire_on_commit=False)
    finally:
        engine.dispose()


def make_recording(desk: Setup, *, ended_ago: timedelta = timedelta(0), seconds: float = 1.5) -> RecordingRow:
    """A finished call recording in the spool, as Asterisk leaves it."""
    with sessions_of(desk) as sessions:
        return _make_recording(desk, sessions, ended_ago, seconds)


def _make_recording(desk: Setup, sessions: sessionmaker[Session], ended_ago: timedelta, seconds: float) -> RecordingRow:
    calls = db.CallRepository(sessions)
    started = datetime.now(UTC) - ended_ago - timedelta(minutes=2)
    call_id = str(uuid.uuid4())
    calls.start(
        call_id=call_id,
        node="node1",
        transport="ari",
        channel_id="c1",
        channel_name="PJSIP/patients-1",
        flow="hotline",
        flow_version="v1",
        started_at=started,
    )
    calls.finish(call_id, outcome="routed", ended_at=started + timedelta(minutes=1), last_step="general")
    store = RecordingStore(sessions)
    row = store.begin(call_id, "conversation", started, department="hotline")
    with wave.open(str(desk.state / "spool" / f"{row.name}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(range(256)) * int(seconds * 8000 * 2 / 256))
    assert store.finish(row.id, datetime.now(UTC) - ended_ago)
    return row


def stored(desk: Setup, recording_id: str) -> RecordingRow:
    with sessions_of(desk) as sessions:
        return RecordingStore(sessions).get(recording_id)


def audit_entries(desk: Setup) -> list[StoredEntry]:
    engine = db.make_engine(desk.database_url)
    try:
        return list(SqlAuditStore(engine).entries())
    finally:
        engine.dispose()


def test_ingest_export_refusals_hold_and_rotation(
    desk: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = make_recording(desk)
    spool_file = desk.state / "spool" / f"{row.name}.wav"
    plain_sha = hashlib.sha256(spool_file.read_bytes()).hexdigest()
    assert run(desk, capsys, "recordings", "ingest", "--pending").code == 0
    row = stored(desk, row.id)
    assert row.state == "stored"
    assert row.plain_sha256 == plain_sha
    assert not spool_file.exists()
    shown = run(desk, capsys, "recordings", "show", row.id)
    assert "state:          stored" in shown.out
    assert plain_sha in shown.out

    # Export re-encrypted to the requester decrypts to the recorded audio; the watermark names who and when.
    private, public = tmp_path / "me.key", tmp_path / "me.pub"
    assert run(desk, capsys, "recordings", "keygen", "--private", str(private), "--public", str(public)).code == 0
    why = ["--reason", "complaint review of the call"]
    out = tmp_path / "call.mhexp"
    export = run(desk, capsys, "recordings", "export", row.id, "--as", "sup1", *why, "--recipient", str(public),
                 "--out", str(out))  # fmt: skip
    assert export.code == 0, export.err
    audio = tmp_path / "call.wav"
    assert run(desk, capsys, "recordings", "decrypt-export", str(out), "--identity", str(private),
               "--out", str(audio)).code == 0  # fmt: skip
    assert hashlib.sha256(audio.read_bytes()).hexdigest() == plain_sha
    marked = tmp_path / "marked.wav"
    assert run(desk, capsys, "recordings", "export", row.id, "--as", "sup1", *why, "--watermark",
               "--out", str(marked)).code == 0  # fmt: skip
    comment = read_wav_comment(marked)
    assert comment is not None
    assert "exported by sup1" in comment
    with wave.open(str(marked), "rb") as a, wave.open(str(audio), "rb") as b:
        assert a.readframes(a.getnframes()) == b.readframes(b.getnframes())
    # Refused: an agent (agents hear no recordings); no reason; an existing output file is never overwritten.
    refused = run(desk, capsys, "recordings", "export", row.id, "--as", "agent1", *why, "--recipient", str(public),
                  "--out", str(tmp_path / "no.mhexp"))  # fmt: skip
    assert refused.code != 0
    assert "access denied" in refused.err
    assert not (tmp_path / "no.mhexp").exists()
    assert run(desk, capsys, "recordings", "export", row.id, "--as", "sup1", *why, "--recipient", str(public),
               "--out", str(out)).code != 0  # fmt: skip
    entries = audit_entries(desk)
    assert any(e.actor == "agent1" and e.action == "denied" and '"recording"' in e.details for e in entries)
    assert sum(1 for e in entries if e.actor == "sup1" and e.action == "export") >= 2

    # Delete before retention: refused and audited. Legal hold on and off.
    deleted = run(desk, capsys, "recordings", "delete", row.id, "--reason", "patient asked us to delete it")
    assert deleted.code != 0
    assert "retention" in deleted.err
    assert stored(desk, row.id).state == "stored"
    assert any(e.action == "denied" and '"purge"' in e.details for e in audit_entries(desk))
    assert run(desk, capsys, "recordings", "hold", row.id, "--reason", "litigation hold for case 2026-A").code == 0
    assert stored(desk, row.id).legal_hold
    assert run(desk, capsys, "recordings", "release", row.id, "--reason", "litigation closed, hold lifted").code == 0
    assert not stored(desk, row.id).legal_hold

    # A KEK rotation reaches the recording's own key; the file still decrypts afterwards.
    assert run(desk, capsys, "keys", "rotate").code == 0
    status = run(desk, capsys, "keys", "status")
    assert "recording keys wrapped under KEK v1: 1  <- to rewrap" in status.out
    rewrap = run(desk, capsys, "keys", "rewrap")
    assert rewrap.code == 0
    assert "rewrapped 1 recording key(s); 0 remaining" in rewrap.out
    assert stored(desk, row.id).kek_version == 2
    (rewrapped,) = [e for e in audit_entries(desk) if '"rewrap_recordings"' in e.details]
    assert (rewrapped.action, rewrapped.outcome, rewrapped.role) == ("key_operation", "success", "admin")
    assert json.loads(rewrapped.details) == {"operation": "rewrap_recordings", "kek_version": 2, "rewrapped": 1,
                                             "failed": [], "remaining": 0}  # fmt: skip
    again = tmp_path / "again.mhexp"
    assert run(desk, capsys, "recordings", "export", row.id, "--as", "sup1", *why, "--recipient", str(public),
               "--out", str(again)).code == 0  # fmt: skip


def test_purge_removes_only_expired_recordings_not_on_hold(desk: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    old, held, recent = (make_recording(desk, ended_ago=YEARS_16), make_recording(desk, ended_ago=YEARS_16),
                         make_recording(desk))  # fmt: skip
    assert run(desk, capsys, "recordings", "ingest", "--pending").code == 0
    assert run(desk, capsys, "recordings", "hold", held.id, "--reason", "litigation hold for case 2026-B").code == 0
    dry = run(desk, capsys, "recordings", "purge", "--expired", "--dry-run")
    assert old.id in dry.out
    assert held.id not in dry.out
    assert run(desk, capsys, "recordings", "purge").code != 0  # --expired is required
    purged = run(desk, capsys, "recordings", "purge", "--expired")
    assert purged.code == 0
    assert "purged 1 expired" in purged.out
    config = load_config(desk.config)
    states = {r.id: stored(desk, r.id) for r in (old, held, recent)}
    assert states[old.id].state == "purged"
    assert states[old.id].plain_sha256 is not None  # the tombstone keeps its digests
    assert not (config.recordings_store / (states[old.id].path or "x")).exists()
    for kept in (held, recent):
        assert states[kept.id].state == "stored"
        assert (config.recordings_store / (states[kept.id].path or "x")).exists()
    assert any(e.action == "delete" and old.id in e.details for e in audit_entries(desk))
    # The database refuses an early purge whatever the code does.
    engine = db.make_engine(desk.database_url)
    try:
        with pytest.raises(Exception, match="retention"), engine.begin() as conn:
            conn.execute(text("UPDATE recordings SET state = 'purged' WHERE id = :id"), {"id": recent.id})
    finally:
        engine.dispose()


def test_records_verify_names_a_tampered_recording(desk: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    row = make_recording(desk)
    assert run(desk, capsys, "recordings", "ingest", "--pending").code == 0
    row = stored(desk, row.id)
    note = run(desk, capsys, "records", "note", row.call_id, "--as", "agent1", "--text", "患者咨询降压药用法，已解答。")
    assert note.code == 0
    assert "sealed with the call's summary" in note.out
    config = load_config(desk.config)

    async def seal() -> None:
        token = read_token_file(config.service.state_dir / "keyservice.token").decode()
        async with KeyServiceClient.unix(config.keyservice_socket, token) as keys:
            engine = db.make_engine(desk.database_url)
            sessions = sessionmaker(engine, expire_on_commit=False)
            audit = AuditLog(SqlAuditStore(engine))
            ring = DataKeyRing(DataKeyStore(sessions), keys, audit=audit)
            sealer = RecordSealer(sessions, keys, KeyServiceTimestamper(keys), ring, audit=audit)
            assert await sealer.seal_call_summary(row.call_id, [row]) is not None
            engine.dispose()

    asyncio.run(seal())
    ok = run(desk, capsys, "records", "verify", row.call_id)
    assert ok.code == 0, ok.out
    assert "1 record(s) checked, 0 failed" in ok.out
    shown = run(desk, capsys, "records", "show", row.call_id, "--as", "sup1", "--reason", "quality review of the call")
    assert shown.code == 0, shown.err
    assert "患者咨询降压药用法" in shown.out  # the note went into the signed summary
    after = run(desk, capsys, "records", "note", row.call_id, "--as", "agent1", "--text", "补充：建议复诊。")
    assert "amendment" in after.out
    assert run(desk, capsys, "records", "verify", "--all").code == 0
    path = config.recordings_store / (row.path or "x")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    bad = run(desk, capsys, "records", "verify", row.call_id)
    assert bad.code == 1
    assert f"recording {row.id}: the encrypted file's SHA-256 differs from the signed one" in bad.out


def _expired_and_stored(desk: Setup, capsys: pytest.CaptureFixture[str]) -> tuple[RecordingRow, Path]:
    row = make_recording(desk, ended_ago=YEARS_16)
    assert run(desk, capsys, "recordings", "ingest", "--pending").code == 0
    row = stored(desk, row.id)
    path = load_config(desk.config).recordings_store / (row.path or "x")
    assert path.exists()
    return row, path


def test_a_delete_whose_audit_entry_fails_deletes_nothing(desk: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    row, path = _expired_and_stored(desk, capsys)
    engine = db.make_engine(desk.database_url)
    try:
        with engine.begin() as conn:  # the audit log refuses every deletion entry (a full disk, a broken table)
            if engine.dialect.name == "sqlite":
                conn.execute(
                    text(
                        "CREATE TRIGGER no_delete_entries BEFORE INSERT ON audit_entries "
                        "WHEN NEW.action = 'delete' BEGIN SELECT RAISE(ABORT, 'audit unavailable'); END"
                    )
                )
            else:
                conn.execute(
                    text(
                        "CREATE FUNCTION no_delete_entries() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'audit unavailable'; END $$"
                    )
                )
                conn.execute(text("CREATE TRIGGER no_delete_entries BEFORE INSERT ON audit_entries FOR EACH ROW "
                                  "WHEN (NEW.action = 'delete') EXECUTE FUNCTION no_delete_entries()"))  # fmt: skip
    finally:
        engine.dispose()
    deleted = run(desk, capsys, "recordings", "delete", row.id, "--reason", "retention period ended")
    assert deleted.code == 1
    assert deleted.err.startswith("medhotline: ")
    assert "audit" in deleted.err
    assert stored(desk, row.id).state == "stored"  # nothing deleted without its audit entry
    assert path.exists()


def test_a_delete_reason_is_checked_like_a_hold_reason(desk: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    row, path = _expired_and_stored(desk, capsys)
    before = len(audit_entries(desk))
    for reason in ("called from 13800138000", " "):
        deleted = run(desk, capsys, "recordings", "delete", row.id, "--reason", reason)
        assert deleted.code == 1
        assert deleted.err.startswith("medhotline: ")
        assert "reason" in deleted.err
        assert "13800138000" not in deleted.err
    assert stored(desk, row.id).state == "stored"
    assert path.exists()
    assert len(audit_entries(desk)) == before
