"""Helpers of the recordings tests (and of the scheduler and quality tests that use recordings): real WAV files,
real calls, raw SQL as a DBA. The fixtures (the key service in process, the stores) are in the conftest files:
``tests/unit/conftest.py`` and ``tests/unit/recordings/conftest.py``.
"""

from __future__ import annotations

import hashlib
import random
import uuid
import wave
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, text

from compliance.keyservice_client import KeyServiceClient
from ground import db
from recordings.envelope import open_sealed
from recordings.store import RecordingRow, RecordingStore

TOKEN = "recordings-test-token-0123456789abcdef"
SAMPLE_RATE = 8000
AGENT = "agent.wu"


# --- data ---------------------------------------------------------------------------------------------------------


def write_wav(path: Path, *, seconds: float = 12.5, seed: int = 7) -> bytes:
    """A mono 16-bit WAV of pseudo-random samples (no run of bytes a ciphertext could hold by chance); returns
    the file's bytes. 12.5 s at 8 kHz is 200 000 bytes of audio: several 64 KiB chunks."""
    frames = round(seconds * SAMPLE_RATE)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(random.Random(seed).randbytes(frames * 2))
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_call(
    engine: Engine,
    *,
    started_at: datetime | None = None,
    priority: str | None = "normal",
    category: str | None = "cardiology",
    agent: str | None = AGENT,
    finished: bool = True,
) -> str:
    """A call with a path through the IVR (a welcome, a listen step that caught a keyword) to an agent."""
    calls = db.CallRepository.for_engine(engine)
    call_id = str(uuid.uuid4())
    start = started_at or datetime.now(UTC) - timedelta(minutes=5)
    calls.start(
        call_id=call_id,
        node="node-a",
        transport="ari",
        channel_id=f"ch-{call_id[:8]}",
        channel_name="PJSIP/trunk-00000001",
        flow="hotline",
        flow_version="3",
        started_at=start,
    )
    calls.mark_answered(call_id, start)
    steps = [
        ("hotline", "welcome", "say", "next", None),
        ("hotline", "symptoms", "listen", "matched", "胸痛"),
    ]
    if agent is not None:
        steps.append(("queue", "answered", "queue", agent, None))
    for n, (flow, node, node_type, edge, said) in enumerate(steps, start=1):
        calls.add_step(
            call_id, flow=flow, node=node, node_type=node_type, edge=edge, input=said, at=start + timedelta(seconds=n)
        )
    if finished:
        calls.finish(
            call_id,
            outcome="completed",
            ended_at=start + timedelta(minutes=4),
            route_category=category,
            route_priority=priority,
        )
    return call_id


def finished_recording(
    store: RecordingStore,
    engine: Engine,
    spool_dir: Path,
    *,
    started_at: datetime | None = None,
    priority: str | None = "normal",
    seconds: float = 12.5,
    seed: int = 7,
) -> tuple[RecordingRow, bytes]:
    """A call, its conversation recording (finished) and the WAV Asterisk left in the spool."""
    start = started_at or datetime.now(UTC) - timedelta(minutes=5)
    call_id = start_call(engine, started_at=start, priority=priority)
    row = store.begin(call_id, "conversation", start + timedelta(seconds=3))
    assert store.finish(row.id, start + timedelta(minutes=4))
    wav = write_wav(spool_dir / f"{row.name}.wav", seconds=seconds, seed=seed)
    return store.get(row.id), wav


async def decrypt(keys: KeyServiceClient, row: RecordingRow, store_dir: Path) -> bytes:
    """The stored recording decrypted with its own (unwrapped) key and context."""
    assert row.wrapped_key is not None
    assert row.path is not None
    key = await keys.unwrap(row.wrapped_key, row.key_purpose)
    return b"".join(open_sealed(store_dir / row.path, key, context=row.context))


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def assert_no_plaintext(directory: Path, wav: bytes) -> None:
    """No file under ``directory`` holds the WAV header or any of several 64-byte stretches of its audio."""
    needles = [wav[:44]] + [wav[at : at + 64] for at in range(44, len(wav) - 64, max(1, len(wav) // 16))]
    for path in files_under(directory):
        data = path.read_bytes()
        found = [i for i, needle in enumerate(needles) if needle in data]
        assert not found, f"{path} holds plaintext of the recording (pieces {found})"


# --- the database as a DBA with full rights -------------------------------------------------------------------


def execute(engine: Engine, sql: str, **params: object) -> int:
    """Raw SQL through the engine in its own transaction; returns the affected row count."""
    with engine.begin() as connection:
        return int(connection.execute(text(sql), params).rowcount)


def drop_records_guard(engine: Engine) -> None:
    """Remove what makes call_records append-only, as a DBA tampering with the table could."""
    if engine.dialect.name == "sqlite":
        execute(engine, "DROP TRIGGER call_records_no_update")
    else:
        execute(engine, "DROP TRIGGER call_records_append_only ON call_records")


def drop_recordings_guard(engine: Engine) -> None:
    """Remove what fixes a stored recording's digests, as a DBA tampering with the table could."""
    if engine.dialect.name == "sqlite":
        execute(engine, "DROP TRIGGER recordings_fixed_when_stored")
    else:
        execute(engine, "DROP TRIGGER recordings_guard ON recordings")


@dataclass
class FakeClock:
    """A clock the test moves; used only where the behaviour depends on the date (retention)."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now
