"""Ingest against a real key service (Unix socket), a real database and real files: a finished WAV becomes an
encrypted file in the store and its plaintext goes away; a process killed between any two steps is finished
by the next run with nothing lost and no plaintext left; bad input (no file, key service refusing, a file
already in the way) keeps the only copy of the audio."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import Engine

from compliance.audit import AuditLog
from compliance.keyservice_client import KeyServiceClient
from compliance.keyservice_protocol import KeyServiceError
from ground import db
from recordings.envelope import EnvelopeError, open_sealed, seal_file, sha256_file
from recordings.ingest import SUFFIX, TEMP_MARK, IngestError, Ingestor, stored_path, wav_duration
from recordings.retention import RetentionPolicy
from recordings.store import RecordingRow, RecordingStore
from tests.unit.recordings.helpers import (
    TOKEN,
    FakeClock,
    assert_no_plaintext,
    decrypt,
    files_under,
    finished_recording,
    sha256,
    write_wav,
)

POLICY: Final = RetentionPolicy({"outpatient": 15, "emergency": 20, "inpatient": 30})
REPO: Final = Path(__file__).resolve().parents[3]
STEPS: Final = ("keyed", "sealed", "renamed", "recorded")


def ingestor(
    store: RecordingStore,
    keys: KeyServiceClient,
    engine: Engine,
    spool_dir: Path,
    store_dir: Path,
    *,
    audit: AuditLog | None = None,
    clock: FakeClock | None = None,
) -> Ingestor:
    return Ingestor(
        store,
        keys,
        spool_dir=spool_dir,
        store_dir=store_dir,
        policy=POLICY,
        calls=db.CallRepository.for_engine(engine),
        audit=audit,
        clock=clock,
    )


def shared_with_others(store_dir: Path) -> list[Path]:
    """Files and directories of the store that anyone but the owner may read, write or enter."""
    return [p for p in [store_dir, *store_dir.rglob("*")] if p.stat().st_mode & 0o077]


def temporaries(store_dir: Path) -> list[Path]:
    return [p for p in files_under(store_dir) if TEMP_MARK in p.name]


async def assert_stored_intact(
    store: RecordingStore, keys: KeyServiceClient, row_id: str, wav: bytes, spool_dir: Path, store_dir: Path
) -> RecordingRow:
    """Stored, decrypting to the very WAV, digests matching the file, and no plaintext or temporary left."""
    row = store.get(row_id)
    assert row.state == "stored"
    assert row.path is not None
    assert row.spool_removed_at is not None
    assert await decrypt(keys, row, store_dir) == wav
    assert row.plain_sha256 == sha256(wav)
    assert row.cipher_sha256 == sha256_file(store_dir / row.path)
    assert (row.plain_size, row.cipher_size) == (len(wav), (store_dir / row.path).stat().st_size)
    assert files_under(spool_dir) == []
    assert temporaries(store_dir) == []
    assert files_under(store_dir) == [store_dir / row.path]
    assert_no_plaintext(store_dir, wav)
    return row


# --- the straight path ------------------------------------------------------------------------------------------


async def test_a_finished_recording_is_stored_encrypted_and_its_plaintext_removed(
    store: RecordingStore,
    keys: KeyServiceClient,
    engine: Engine,
    spool_dir: Path,
    store_dir: Path,
    audit: AuditLog,
) -> None:
    row, wav = finished_recording(store, engine, spool_dir, seconds=12.5)
    assert await ingestor(store, keys, engine, spool_dir, store_dir, audit=audit).ingest(row.id)

    done = await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)
    assert done.duration_seconds == 12.5
    assert done.path == stored_path(row) == f"{row.started_at:%Y/%m}/{row.id}{SUFFIX}"
    assert done.ended_at == row.ended_at
    assert done.retention_class == "outpatient"
    assert row.ended_at is not None
    assert done.retain_until == row.ended_at.replace(year=row.ended_at.year + 15)
    assert done.wrapped_key is not None
    assert done.kek_version == 1
    assert done.wrapped_key != await keys.unwrap(done.wrapped_key, done.key_purpose)  # only the wrapped form
    assert shared_with_others(store_dir) == []

    stores = [e for e in audit.store.entries() if e.action == "store"]
    assert len(stores) == 1
    assert json.loads(stores[0].details)["recording"] == row.id
    assert json.loads(stores[0].details)["plain_sha256"] == sha256(wav)


async def test_an_emergency_call_gets_the_emergency_retention(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir, priority="emergency")
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    done = store.get(row.id)
    assert row.ended_at is not None
    assert (done.retention_class, done.retain_until) == ("emergency", row.ended_at.replace(year=row.ended_at.year + 20))


async def test_the_stored_file_opens_only_under_its_own_key_and_row(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    first, _ = finished_recording(store, engine, spool_dir, seed=1)
    second, _ = finished_recording(store, engine, spool_dir, seed=2)
    ingest = ingestor(store, keys, engine, spool_dir, store_dir)
    assert await ingest.ingest(first.id)
    assert await ingest.ingest(second.id)
    a, b = store.get(first.id), store.get(second.id)
    assert a.wrapped_key is not None
    assert b.wrapped_key is not None
    assert a.path is not None
    assert a.wrapped_key != b.wrapped_key
    key_a = await keys.unwrap(a.wrapped_key, a.key_purpose)
    key_b = await keys.unwrap(b.wrapped_key, b.key_purpose)
    with pytest.raises(EnvelopeError, match="wrong key or context"):
        b"".join(open_sealed(store_dir / a.path, key_b, context=a.context))
    with pytest.raises(EnvelopeError, match="wrong key or context"):
        b"".join(open_sealed(store_dir / a.path, key_a, context=b.context))
    with pytest.raises(KeyServiceError):  # a wrapped key is bound to its recording
        await keys.unwrap(a.wrapped_key, b.key_purpose)


async def test_a_flipped_byte_in_the_stored_file_is_detected(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    done = store.get(row.id)
    assert done.path is not None
    path = store_dir / done.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EnvelopeError, match=r"chunk \d+"):
        await decrypt(keys, done, store_dir)
    assert sha256_file(path) != done.cipher_sha256


async def test_ingesting_twice_changes_nothing(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path, audit: AuditLog
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    ingest = ingestor(store, keys, engine, spool_dir, store_dir, audit=audit)
    assert await ingest.ingest(row.id)
    first = store.get(row.id)
    assert await ingest.ingest(row.id)
    assert await ingest.resume() == 0
    assert store.get(row.id) == first
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)
    assert len([e for e in audit.store.entries() if e.action == "store"]) == 1


async def test_a_file_that_is_not_a_wav_is_stored_without_a_duration(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir)
    spool = spool_dir / f"{row.name}.wav"
    raw = os.urandom(70_000)
    spool.write_bytes(raw)
    assert wav_duration(spool) is None
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    done = await assert_stored_intact(store, keys, row.id, raw, spool_dir, store_dir)
    assert done.duration_seconds is None


async def test_an_empty_recording_is_stored(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir, seconds=0)
    wav = (spool_dir / f"{row.name}.wav").read_bytes()
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    done = await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)
    assert done.duration_seconds == 0.0


# --- bad input ----------------------------------------------------------------------------------------------------


async def test_a_missing_spool_file_marks_the_recording_missing_with_the_reason(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir)
    (spool_dir / f"{row.name}.wav").unlink()
    assert not await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    missing = store.get(row.id)
    assert missing.state == "missing"
    assert missing.error == f"Asterisk left no file {row.name}.wav in the recording spool"
    assert missing.wrapped_key is None  # no key was made for nothing
    assert files_under(store_dir) == []
    assert not await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)  # and stays so


async def test_the_key_service_refusing_keeps_the_spool_file(
    store: RecordingStore, keyservice: Path, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    async with KeyServiceClient.unix(keyservice, "not-the-token-0123456789") as wrong:
        with pytest.raises(KeyServiceError):
            await ingestor(store, wrong, engine, spool_dir, store_dir).ingest(row.id)
        assert await ingestor(store, wrong, engine, spool_dir, store_dir).resume() == 0  # logged, not raised
    assert store.get(row.id).state == "finished"
    assert (spool_dir / f"{row.name}.wav").read_bytes() == wav
    assert files_under(store_dir) == []


async def test_a_store_that_cannot_be_written_keeps_the_spool_file(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, tmp_path: Path
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"a file where the store directory should be")
    with pytest.raises(IngestError, match=f"recording {row.id}: preparing"):
        await ingestor(store, keys, engine, spool_dir, blocked).ingest(row.id)
    assert await ingestor(store, keys, engine, spool_dir, blocked).resume() == 0
    assert store.get(row.id).state == "finished"
    assert (spool_dir / f"{row.name}.wav").read_bytes() == wav


async def test_a_recording_still_capturing_is_left_to_the_caller_on_resume(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, _ = finished_recording(store, engine, spool_dir)
    capturing = store.begin(row.call_id, "conversation", datetime.now(UTC))
    write_wav(spool_dir / f"{capturing.name}.wav", seconds=1)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).resume() == 1
    assert store.get(capturing.id).state == "capturing"
    assert (spool_dir / f"{capturing.name}.wav").exists()
    assert store.get(row.id).state == "stored"


@pytest.mark.parametrize("state", ["missing", "purged"])
async def test_a_recording_past_ingest_is_not_ingested(
    store: RecordingStore,
    keys: KeyServiceClient,
    engine: Engine,
    spool_dir: Path,
    store_dir: Path,
    state: str,
) -> None:
    row, _ = finished_recording(store, engine, spool_dir)
    if state == "missing":
        store.mark_missing(row.id, "lost", datetime.now(UTC))
    else:
        long_ago = datetime.now(UTC) - timedelta(days=16 * 366)
        row, _ = finished_recording(store, engine, spool_dir, started_at=long_ago, seed=3)
        old = ingestor(store, keys, engine, spool_dir, store_dir, clock=FakeClock(long_ago + timedelta(minutes=5)))
        assert await old.ingest(row.id)
        assert store.mark_purged(row.id, by="ops.li", at=datetime.now(UTC))
        write_wav(spool_dir / f"{row.name}.wav")
    assert not await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    assert store.get(row.id).state == state


async def test_a_recording_of_sixteen_years_ago_is_purgeable_after_ingest(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=16 * 366)
    old, _ = finished_recording(store, engine, spool_dir, started_at=long_ago, seed=4)
    recent, _ = finished_recording(store, engine, spool_dir, seed=5)
    assert await ingestor(store, keys, engine, spool_dir, store_dir, clock=FakeClock(long_ago)).ingest(old.id)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(recent.id)
    assert [r.id for r in store.expired(now)] == [old.id]
    assert not store.mark_purged(recent.id, by="ops.li", at=now)
    assert store.mark_purged(old.id, by="ops.li", at=now)


async def test_a_stale_temporary_of_an_earlier_attempt_is_removed(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    final = store_dir / stored_path(row)
    final.parent.mkdir(parents=True)
    stale = final.with_name(f"{final.name}{TEMP_MARK}999999")
    stale.write_bytes(b"half of an earlier attempt's ciphertext")
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    assert not stale.exists()
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)


async def test_an_unreadable_file_in_the_way_is_replaced(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    final = store_dir / stored_path(row)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not a sealed recording")
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)


async def test_a_file_in_the_way_holding_other_audio_is_kept_and_so_is_the_spool(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path, tmp_path: Path
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    claimed = await keys.generate_data_key(row.key_purpose)
    store.claim_key(row.id, claimed.wrapped, claimed.version)
    other = tmp_path / "other.wav"
    write_wav(other, seed=99)
    final = store_dir / stored_path(row)
    final.parent.mkdir(parents=True)
    seal_file(other, final, claimed.plain, context=row.context)
    before = final.read_bytes()
    with pytest.raises(IngestError, match="already holds other audio"):
        await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    assert final.read_bytes() == before
    assert (spool_dir / f"{row.name}.wav").read_bytes() == wav
    assert store.get(row.id).state == "finished"
    assert temporaries(store_dir) == []


async def test_another_node_storing_meanwhile_keeps_its_file_and_digests(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path, audit: AuditLog
) -> None:
    """Two nodes resume the same ingest: the other one places and records its file while this one is sealing.
    This one must not replace that file (the row's digests name it, and the database won't let them change)."""
    row, wav = finished_recording(store, engine, spool_dir)
    claimed = await keys.generate_data_key(row.key_purpose)
    store.claim_key(row.id, claimed.wrapped, claimed.version)
    spool = spool_dir / f"{row.name}.wav"

    def other_node(step: str, recording_id: str) -> None:
        if step != "sealed":
            return
        final = store_dir / stored_path(row)
        theirs = final.with_name(f"{final.name}{TEMP_MARK}other-node")
        sealed = seal_file(spool, theirs, claimed.plain, context=row.context)
        theirs.rename(final)
        assert store.mark_stored(
            recording_id,
            sealed,
            path=stored_path(row),
            duration_seconds=None,
            retention_class="outpatient",
            retain_until=datetime.now(UTC) + timedelta(days=15 * 366),
            at=datetime.now(UTC),
        )

    racing = Ingestor(
        store,
        keys,
        spool_dir=spool_dir,
        store_dir=store_dir,
        policy=POLICY,
        calls=db.CallRepository.for_engine(engine),
        audit=audit,
        checkpoint=other_node,
    )
    assert await racing.ingest(row.id)
    done = await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)
    assert done.duration_seconds is None  # the other node's record stands
    assert len([e for e in audit.store.entries() if e.action == "store"]) == 1


async def test_a_row_marked_missing_during_the_ingest_keeps_the_spool_file(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path
) -> None:
    """A node that can't see this spool marks the recording missing meanwhile: the plaintext is then the only
    copy the row can account for, so it must not be deleted."""
    row, wav = finished_recording(store, engine, spool_dir)

    def marked_missing(step: str, recording_id: str) -> None:
        if step == "renamed":
            store.mark_missing(recording_id, "no file on node-b", datetime.now(UTC))

    racing = Ingestor(
        store,
        keys,
        spool_dir=spool_dir,
        store_dir=store_dir,
        policy=POLICY,
        calls=db.CallRepository.for_engine(engine),
        checkpoint=marked_missing,
    )
    with pytest.raises(IngestError, match=f"recording {row.id} became missing during its ingest"):
        await racing.ingest(row.id)
    assert (spool_dir / f"{row.name}.wav").read_bytes() == wav


class Stop(Exception):
    """Raised by a checkpoint to stop an in-process ingest at a step (the crash tests below kill a process)."""


def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make os.link fail as on a file system without hard links; returns the names it was asked to make."""
    asked: list[str] = []

    def refuse(src: object, dst: object, *args: object, **kwargs: object) -> None:
        asked.append(str(dst))
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    return asked


async def test_a_store_without_hard_links_still_ingests(
    store: RecordingStore,
    keys: KeyServiceClient,
    engine: Engine,
    spool_dir: Path,
    store_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    asked = no_hard_links(monkeypatch)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    assert asked == [str(store_dir / stored_path(row))]
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)


async def test_a_store_without_hard_links_keeps_an_earlier_attempts_file(
    store: RecordingStore,
    keys: KeyServiceClient,
    engine: Engine,
    spool_dir: Path,
    store_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)

    def stop_after_rename(step: str, recording_id: str) -> None:
        if step == "renamed":
            raise Stop

    first = Ingestor(
        store,
        keys,
        spool_dir=spool_dir,
        store_dir=store_dir,
        policy=POLICY,
        calls=db.CallRepository.for_engine(engine),
        checkpoint=stop_after_rename,
    )
    with pytest.raises(Stop):
        await first.ingest(row.id)
    earlier = (store_dir / stored_path(row)).read_bytes()
    no_hard_links(monkeypatch)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    assert (store_dir / stored_path(row)).read_bytes() == earlier
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)


# --- a real process death between the steps --------------------------------------------------------------------

CRASHING_INGEST = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    from pathlib import Path

    from ground import db
    from compliance.keyservice_client import KeyServiceClient
    from recordings.ingest import Ingestor
    from recordings.retention import RetentionPolicy
    from recordings.store import RecordingStore

    url, socket_path, token, spool, store_dir, recording_id, crash_at = sys.argv[1:]


    def checkpoint(step: str, rid: str) -> None:
        if step == crash_at and rid == recording_id:
            os._exit(137)  # a process death: no finally, no atexit, no flush


    async def main() -> None:
        engine = db.make_engine(url)
        async with KeyServiceClient.unix(Path(socket_path), token) as keys:
            ingestor = Ingestor(
                RecordingStore.for_engine(engine),
                keys,
                spool_dir=Path(spool),
                store_dir=Path(store_dir),
                policy=RetentionPolicy({"outpatient": 15, "emergency": 20, "inpatient": 30}),
                calls=db.CallRepository.for_engine(engine),
                checkpoint=checkpoint,
            )
            await ingestor.ingest(recording_id)
        sys.exit(3)  # reaching here means the crash point was never hit


    asyncio.run(main())
    """
)


async def run_crashing_ingest(
    tmp_path: Path, database_url: str, keyservice: Path, spool_dir: Path, store_dir: Path, row_id: str, step: str
) -> None:
    """The ingest in a child process killed at ``step``; the test's loop keeps serving the key service."""
    script = tmp_path / "crashing_ingest.py"
    script.write_text(CRASHING_INGEST, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        database_url,
        str(keyservice),
        TOKEN,
        str(spool_dir),
        str(store_dir),
        row_id,
        step,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 137, f"the ingest did not die at {step}: {output.decode(errors='replace')}"


@pytest.mark.parametrize("step", STEPS)
async def test_a_process_killed_between_steps_is_finished_by_the_next_run(
    store: RecordingStore,
    keys: KeyServiceClient,
    keyservice: Path,
    engine: Engine,
    database_url: str,
    spool_dir: Path,
    store_dir: Path,
    tmp_path: Path,
    audit: AuditLog,
    step: str,
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    spool = spool_dir / f"{row.name}.wav"
    final = store_dir / stored_path(row)
    await run_crashing_ingest(tmp_path, database_url, keyservice, spool_dir, store_dir, row.id, step)

    # Where the dead process left things: the spool file (the only plaintext) is always still there.
    crashed = store.get(row.id)
    assert spool.read_bytes() == wav
    assert crashed.wrapped_key is not None
    assert crashed.state == ("stored" if step == "recorded" else "finished")
    assert bool(temporaries(store_dir)) == (step == "sealed")
    assert final.exists() == (step in ("renamed", "recorded"))
    assert_no_plaintext(store_dir, wav)

    assert await ingestor(store, keys, engine, spool_dir, store_dir, audit=audit).resume() == 1

    done = await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)
    assert done.wrapped_key == crashed.wrapped_key  # the first key is kept
    if step == "recorded":
        assert (done.cipher_sha256, done.stored_at) == (crashed.cipher_sha256, crashed.stored_at)
    assert done.duration_seconds == 12.5
    assert len([e for e in audit.store.entries() if e.action == "store"]) == 1
    assert await ingestor(store, keys, engine, spool_dir, store_dir).resume() == 0


async def test_two_crashes_in_a_row_still_end_stored(
    store: RecordingStore,
    keys: KeyServiceClient,
    keyservice: Path,
    engine: Engine,
    database_url: str,
    spool_dir: Path,
    store_dir: Path,
    tmp_path: Path,
) -> None:
    row, wav = finished_recording(store, engine, spool_dir)
    await run_crashing_ingest(tmp_path, database_url, keyservice, spool_dir, store_dir, row.id, "renamed")
    first_file = (store_dir / stored_path(row)).read_bytes()
    await run_crashing_ingest(tmp_path, database_url, keyservice, spool_dir, store_dir, row.id, "sealed")
    assert (store_dir / stored_path(row)).read_bytes() == first_file  # never replaced by the second attempt
    assert await ingestor(store, keys, engine, spool_dir, store_dir).resume() == 1
    await assert_stored_intact(store, keys, row.id, wav, spool_dir, store_dir)


async def test_a_store_directory_moved_elsewhere_still_opens(
    store: RecordingStore, keys: KeyServiceClient, engine: Engine, spool_dir: Path, store_dir: Path, tmp_path: Path
) -> None:
    """Rows hold paths relative to the store: a restored backup under another root opens the same."""
    row, wav = finished_recording(store, engine, spool_dir)
    assert await ingestor(store, keys, engine, spool_dir, store_dir).ingest(row.id)
    moved = tmp_path / "restored"
    shutil.copytree(store_dir, moved)
    assert await decrypt(keys, store.get(row.id), moved) == wav
