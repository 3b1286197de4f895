"""The recordings table (``RecordingStore``) and the database's own guards (migration ``0008_recordings``), on
SQLite and PostgreSQL: each state change, and what the database refuses whatever the code does (raw SQL)."""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from compliance.data_keys import DataKeyStore
from compliance.keystore import WRAP_FORMAT, WRAPPED_SIZE
from ground.db import DatabaseError
from ground.errors import MedhotlineError
from recordings.envelope import SealedFile
from recordings.records import CallRecordStore
from recordings.store import RecordingNotFound, RecordingRow, RecordingStore, recording_name
from recordings.tables import SignedCallRecord
from tests.unit.recordings.helpers import execute, start_call

NOW = datetime.now(UTC)
WRAPPED = b"\x01" * 64
SEALED = SealedFile(plain_sha256="a" * 64, cipher_sha256="b" * 64, plain_size=1000, cipher_size=1100)


def stored(
    store: RecordingStore,
    engine: Engine,
    *,
    retain_until: datetime,
    started_at: datetime | None = None,
    sealed: SealedFile = SEALED,
) -> RecordingRow:
    """A recording taken through capture, key and store (the file itself is not needed here)."""
    start = started_at or NOW - timedelta(minutes=10)
    row = store.begin(start_call(engine, started_at=start), "conversation", start)
    assert store.finish(row.id, start + timedelta(minutes=4))
    store.claim_key(row.id, WRAPPED, 1)
    assert store.mark_stored(
        row.id,
        sealed,
        path=f"{start:%Y/%m}/{row.id}.mhrec",
        duration_seconds=240.0,
        retention_class="outpatient",
        retain_until=retain_until,
        at=start + timedelta(minutes=5),
    )
    return store.get(row.id)


def refused(engine: Engine, sql: str, **params: Any) -> str:
    """The database's refusal of ``sql`` (raw, through the engine), as text."""
    with pytest.raises(DBAPIError) as caught:
        execute(engine, sql, **params)
    return str(caught.value.orig)


# --- capture -------------------------------------------------------------------------------------------------------


def test_begin_names_each_recording_of_a_call_in_turn(store: RecordingStore, engine: Engine) -> None:
    call_id = start_call(engine)
    first = store.begin(call_id, "ivr", NOW, department="hotline")
    second = store.begin(call_id, "conversation", NOW + timedelta(seconds=30))
    assert first.name == recording_name(call_id, "ivr", 1) == f"medhotline-{call_id}-ivr-1"
    assert second.name == f"medhotline-{call_id}-conversation-2"
    assert (first.state, first.legal_hold, first.wrapped_key, first.department) == ("capturing", False, None, "hotline")
    assert first.key_purpose == f"recording:{first.id}"
    assert first.context == f"medhotline-recording|{first.id}".encode()
    assert [r.id for r in store.for_call(call_id)] == [first.id, second.id]


def test_begin_refuses_an_unknown_kind(store: RecordingStore, engine: Engine) -> None:
    with pytest.raises(MedhotlineError, match="unknown recording kind 'video'"):
        store.begin(start_call(engine), "video", NOW)


def test_begin_refuses_a_name_already_used(store: RecordingStore, engine: Engine) -> None:
    call_id = start_call(engine)
    store.begin(call_id, "conversation", NOW, name="fixed-name")
    with pytest.raises(DatabaseError, match="refused"):
        store.begin(call_id, "conversation", NOW, name="fixed-name")


def test_begin_refuses_an_unknown_call(store: RecordingStore) -> None:
    with pytest.raises(DatabaseError, match="refused"):
        store.begin(str(uuid.uuid4()), "conversation", NOW)


def test_finish_once(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    ended = NOW + timedelta(minutes=3)
    assert store.finish(row.id, ended)
    assert not store.finish(row.id, ended + timedelta(hours=1))
    again = store.get(row.id)
    assert (again.state, again.ended_at) == ("finished", ended)


def test_set_patient_links_only_recordings_without_one(store: RecordingStore, engine: Engine) -> None:
    call_id = start_call(engine)
    first = store.begin(call_id, "ivr", NOW, patient_id="p-1", department="cardiology")
    second = store.begin(call_id, "conversation", NOW)
    store.set_patient(call_id, "p-2", "pediatrics")
    assert (store.get(first.id).patient_id, store.get(first.id).department) == ("p-1", "cardiology")
    assert (store.get(second.id).patient_id, store.get(second.id).department) == ("p-2", "pediatrics")


def test_get_of_an_unknown_recording(store: RecordingStore) -> None:
    with pytest.raises(RecordingNotFound, match="no recording nope"):
        store.get("nope")


# --- ingest --------------------------------------------------------------------------------------------------------


def test_a_second_claim_keeps_the_first_key(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    first = store.claim_key(row.id, b"\x01" * 64, 1)
    second = store.claim_key(row.id, b"\x02" * 64, 2)
    assert (first.wrapped_key, first.kek_version) == (b"\x01" * 64, 1)
    assert (second.wrapped_key, second.kek_version) == (b"\x01" * 64, 1)
    assert store.get(row.id).wrapped_key == b"\x01" * 64


def test_claim_key_of_an_unknown_recording(store: RecordingStore) -> None:
    with pytest.raises(RecordingNotFound):
        store.claim_key("nope", WRAPPED, 1)


def test_mark_stored_records_everything_once(store: RecordingStore, engine: Engine) -> None:
    until = NOW + timedelta(days=15 * 365)
    row = stored(store, engine, retain_until=until)
    assert (row.state, row.plain_sha256, row.cipher_sha256, row.plain_size, row.cipher_size) == (
        "stored", "a" * 64, "b" * 64, 1000, 1100,
    )  # fmt: skip
    assert (row.retention_class, row.retain_until, row.duration_seconds) == ("outpatient", until, 240.0)
    assert row.path is not None
    assert row.path.endswith(f"{row.id}.mhrec")
    assert row.ended_at == row.started_at + timedelta(minutes=4)  # the finish time stays
    other = SealedFile("c" * 64, "d" * 64, 1, 2)
    assert not store.mark_stored(
        row.id, other, path="x", duration_seconds=None, retention_class="inpatient", retain_until=until, at=NOW
    )
    assert store.get(row.id).cipher_sha256 == "b" * 64


def test_mark_stored_of_a_recording_still_capturing_sets_its_end(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    store.claim_key(row.id, WRAPPED, 1)
    at = NOW + timedelta(minutes=7)
    assert store.mark_stored(
        row.id, SEALED, path="p", duration_seconds=None, retention_class="outpatient", retain_until=NOW, at=at
    )
    assert store.get(row.id).ended_at == at


def test_a_stored_row_must_be_complete(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    with pytest.raises(DatabaseError, match="refused"):  # no wrapped key: the check constraint stored_complete
        store.mark_stored(
            row.id, SEALED, path="p", duration_seconds=None, retention_class="outpatient", retain_until=NOW, at=NOW
        )
    assert store.get(row.id).state == "capturing"


def test_pending_lists_unfinished_ingests_only(store: RecordingStore, engine: Engine) -> None:
    capturing = store.begin(start_call(engine), "conversation", NOW - timedelta(minutes=3))
    finished = store.begin(start_call(engine), "conversation", NOW - timedelta(minutes=2))
    store.finish(finished.id, NOW)
    missing = store.begin(start_call(engine), "conversation", NOW - timedelta(minutes=1))
    store.mark_missing(missing.id, "no file", NOW)
    spool_left = stored(store, engine, retain_until=NOW + timedelta(days=1), started_at=NOW - timedelta(minutes=4))
    assert [r.id for r in store.pending()] == [spool_left.id, capturing.id, finished.id]
    store.mark_spool_removed(spool_left.id, NOW)
    store.mark_spool_removed(spool_left.id, NOW + timedelta(hours=1))  # the first removal time stays
    assert store.get(spool_left.id).spool_removed_at == NOW
    assert [r.id for r in store.pending()] == [capturing.id, finished.id]


def test_mark_missing_keeps_the_reason_and_only_from_capture(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    store.mark_missing(row.id, "Asterisk left no file x.wav", NOW)
    missing = store.get(row.id)
    assert (missing.state, missing.error) == ("missing", "Asterisk left no file x.wav")
    done = stored(store, engine, retain_until=NOW)
    store.mark_missing(done.id, "late", NOW)
    assert store.get(done.id).state == "stored"


def test_recent_filters(store: RecordingStore, engine: Engine) -> None:
    call_id = start_call(engine)
    older = store.begin(call_id, "ivr", NOW - timedelta(minutes=2))
    newer = store.begin(call_id, "conversation", NOW - timedelta(minutes=1))
    store.finish(newer.id, NOW)
    assert [r.id for r in store.recent(call_id=call_id)] == [newer.id, older.id]
    assert [r.id for r in store.recent(call_id=call_id, state="finished")] == [newer.id]
    assert [r.id for r in store.recent(call_id=call_id, limit=1)] == [newer.id]


# --- retention, hold and purge ------------------------------------------------------------------------------------


def test_expired_lists_only_stored_past_retention_and_not_held(store: RecordingStore, engine: Engine) -> None:
    old = stored(store, engine, retain_until=NOW - timedelta(days=30))
    older = stored(store, engine, retain_until=NOW - timedelta(days=60))
    held = stored(store, engine, retain_until=NOW - timedelta(days=30))
    store.set_hold([held.id], on=True, reason="litigation 2041-17", by="legal.ma", at=NOW)
    stored(store, engine, retain_until=NOW + timedelta(days=1))
    unfinished = store.begin(start_call(engine), "conversation", NOW)
    assert [r.id for r in store.expired(NOW)] == [older.id, old.id]
    assert unfinished.id not in [r.id for r in store.expired(NOW + timedelta(days=365 * 100))]


def test_set_hold_on_and_off(store: RecordingStore, engine: Engine) -> None:
    a = stored(store, engine, retain_until=NOW)
    b = stored(store, engine, retain_until=NOW)
    assert store.set_hold([a.id, b.id], on=True, reason="complaint 88", by="legal.ma", at=NOW) == 2
    assert store.set_hold([a.id], on=True, reason="another", by="legal.ma", at=NOW) == 0  # already held
    held = store.get(a.id)
    assert (held.legal_hold, held.hold_reason, held.hold_by) == (True, "complaint 88", "legal.ma")
    assert store.set_hold([a.id, "nope"], on=False, reason="settled", by="legal.ma", at=NOW) == 1
    lifted = store.get(a.id)
    assert (lifted.legal_hold, lifted.hold_reason, lifted.hold_by) == (False, None, None)
    assert store.get(b.id).legal_hold


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_hold_needs_a_reason(store: RecordingStore, engine: Engine, reason: str) -> None:
    row = stored(store, engine, retain_until=NOW)
    with pytest.raises(MedhotlineError, match="a legal hold needs a reason"):
        store.set_hold([row.id], on=True, reason=reason, by="legal.ma", at=NOW)
    assert not store.get(row.id).legal_hold


def test_extend_retention_only_upward(store: RecordingStore, engine: Engine) -> None:
    until = NOW + timedelta(days=365)
    row = stored(store, engine, retain_until=until)
    assert not store.extend_retention(row.id, "inpatient", until - timedelta(days=1))
    assert not store.extend_retention(row.id, "inpatient", until)
    assert store.get(row.id).retention_class == "outpatient"
    later = until + timedelta(days=15 * 365)
    assert store.extend_retention(row.id, "inpatient", later)
    again = store.get(row.id)
    assert (again.retention_class, again.retain_until) == ("inpatient", later)
    unstored = store.begin(start_call(engine), "conversation", NOW)
    assert not store.extend_retention(unstored.id, "inpatient", later)


def test_mark_purged_only_when_expired_and_not_held(store: RecordingStore, engine: Engine) -> None:
    current = stored(store, engine, retain_until=NOW + timedelta(days=1))
    assert not store.mark_purged(current.id, by="ops.li", at=NOW)
    held = stored(store, engine, retain_until=NOW - timedelta(days=1))
    store.set_hold([held.id], on=True, reason="litigation", by="legal.ma", at=NOW)
    assert not store.mark_purged(held.id, by="ops.li", at=NOW)
    expired = stored(store, engine, retain_until=NOW - timedelta(days=1))
    assert store.mark_purged(expired.id, by="ops.li", at=NOW)
    assert not store.mark_purged(expired.id, by="ops.li", at=NOW)  # once
    tombstone = store.get(expired.id)
    assert (tombstone.state, tombstone.purged_by, tombstone.purged_at) == ("purged", "ops.li", NOW)
    assert (tombstone.plain_sha256, tombstone.cipher_sha256, tombstone.path) == ("a" * 64, "b" * 64, expired.path)
    assert store.get(current.id).state == store.get(held.id).state == "stored"


def test_mark_purged_with_a_clock_ahead_is_still_refused_by_the_database(store: RecordingStore, engine: Engine) -> None:
    """The code's own check uses the caller's time; the database's uses its own clock, which wins."""
    row = stored(store, engine, retain_until=NOW + timedelta(days=30))
    with pytest.raises(DatabaseError, match="purge before the retention date or under legal hold refused"):
        store.mark_purged(row.id, by="ops.li", at=NOW + timedelta(days=31))
    assert store.get(row.id).state == "stored"


def test_a_recording_of_a_call_sixteen_years_ago_is_purged(store: RecordingStore, engine: Engine) -> None:
    start = NOW - timedelta(days=16 * 366)
    row = stored(store, engine, retain_until=start + timedelta(days=15 * 366), started_at=start)
    assert [r.id for r in store.expired(NOW)] == [row.id]
    assert store.mark_purged(row.id, by="ops.li", at=NOW)
    assert store.expired(NOW) == []


# --- what the database refuses whatever the code does -------------------------------------------------------------


def test_the_database_refuses_deleting_a_recording(store: RecordingStore, engine: Engine) -> None:
    capturing = store.begin(start_call(engine), "conversation", NOW)
    done = stored(store, engine, retain_until=NOW - timedelta(days=1))
    for row in (capturing, done):
        assert "DELETE refused" in refused(engine, "DELETE FROM recordings WHERE id = :id", id=row.id)
    assert "DELETE refused" in refused(engine, "DELETE FROM recordings")
    assert store.get(capturing.id).state == "capturing"
    assert store.get(done.id).state == "stored"


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("cipher_sha256", "f" * 64),
        ("plain_sha256", "f" * 64),
        ("path", "elsewhere.mhrec"),
        ("cipher_size", 1),
        ("plain_size", None),
    ],
)
def test_the_database_refuses_rewriting_a_stored_recording(
    store: RecordingStore, engine: Engine, column: str, value: object
) -> None:
    row = stored(store, engine, retain_until=NOW + timedelta(days=1))
    sql = f"UPDATE recordings SET {column} = :value WHERE id = :id"
    assert "stored recording's digests or path refused" in refused(engine, sql, value=value, id=row.id)
    assert store.get(row.id) == row


def test_the_database_refuses_rewriting_a_purged_recording(store: RecordingStore, engine: Engine) -> None:
    row = stored(store, engine, retain_until=NOW - timedelta(days=1))
    assert store.mark_purged(row.id, by="ops.li", at=NOW)
    sql = "UPDATE recordings SET cipher_sha256 = :v WHERE id = :id"
    assert "refused" in refused(engine, sql, v="0" * 64, id=row.id)


def test_digests_of_a_recording_not_yet_stored_may_be_written(store: RecordingStore, engine: Engine) -> None:
    """The guard is about stored recordings; an ingest in progress writes its row freely."""
    row = store.begin(start_call(engine), "conversation", NOW)
    assert execute(engine, "UPDATE recordings SET cipher_sha256 = :v WHERE id = :id", v="0" * 64, id=row.id) == 1


def test_the_database_refuses_purging_before_the_retention_date(store: RecordingStore, engine: Engine) -> None:
    row = stored(store, engine, retain_until=NOW + timedelta(days=1))
    sql = "UPDATE recordings SET state = 'purged' WHERE id = :id"
    assert "purge before the retention date or under legal hold refused" in refused(engine, sql, id=row.id)
    assert store.get(row.id).state == "stored"


def test_the_database_refuses_purging_under_legal_hold(store: RecordingStore, engine: Engine) -> None:
    row = stored(store, engine, retain_until=NOW - timedelta(days=1))
    store.set_hold([row.id], on=True, reason="litigation", by="legal.ma", at=NOW)
    purge = "UPDATE recordings SET state = 'purged' WHERE id = :id"
    assert "under legal hold refused" in refused(engine, purge, id=row.id)
    # Lifting the hold in the very statement that purges is the same thing.
    lift_and_purge = (
        "UPDATE recordings SET state = 'purged', legal_hold = :off, hold_reason = NULL WHERE id = :id"
    )  # fmt: skip
    assert "under legal hold refused" in refused(engine, lift_and_purge, off=False, id=row.id)
    assert store.get(row.id).state == "stored"


def test_the_database_refuses_purging_a_recording_without_a_date(store: RecordingStore, engine: Engine) -> None:
    row = store.begin(start_call(engine), "conversation", NOW)
    sql = "UPDATE recordings SET state = 'purged' WHERE id = :id"
    assert "refused" in refused(engine, sql, id=row.id)


def test_the_database_lets_an_expired_recording_be_purged(store: RecordingStore, engine: Engine) -> None:
    """The guard is not a blanket refusal: past retention and not held, the raw purge goes through."""
    row = stored(store, engine, retain_until=NOW - timedelta(seconds=1))
    assert execute(engine, "UPDATE recordings SET state = 'purged' WHERE id = :id", id=row.id) == 1
    assert store.get(row.id).state == "purged"


def test_the_database_refuses_shortening_the_retention_of_a_stored_recording(
    store: RecordingStore, engine: Engine
) -> None:
    row = stored(store, engine, retain_until=NOW + timedelta(days=15 * 365))
    sql = "UPDATE recordings SET retain_until = :until WHERE id = :id"
    assert "refused" in refused(engine, sql, until=NOW - timedelta(days=1), id=row.id)


def test_the_database_refuses_taking_a_stored_recording_out_of_stored(store: RecordingStore, engine: Engine) -> None:
    row = stored(store, engine, retain_until=NOW + timedelta(days=1))
    assert "refused" in refused(engine, "UPDATE recordings SET state = 'finished' WHERE id = :id", id=row.id)


# --- signed call records are append-only ------------------------------------------------------------------------------


def a_record(engine: Engine) -> SignedCallRecord:
    """A row of call_records as the sealer would write it (the bytes need not verify here)."""
    wrapped = struct.pack(">BI", WRAP_FORMAT, 1) + b"\x07" * (WRAPPED_SIZE - 5)  # well-formed, never unwrapped
    data_key = DataKeyStore.for_engine(engine).add("call_records", wrapped, NOW, version=1)
    row = SignedCallRecord(
        id=str(uuid.uuid4()),
        call_id=start_call(engine),
        kind="call_summary",
        amends=None,
        created_at=NOW,
        header="{}",
        signature=b"\x00" * 64,
        signing_key_id="k",
        timestamp_token=b"\x30\x00",
        timestamped_at=NOW,
        body_token="t",
        data_key_id=data_key.id,
    )
    CallRecordStore.for_engine(engine).add(row)
    return row


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE call_records SET header = 'forged' WHERE id = :id",
        "UPDATE call_records SET timestamp_token = signature WHERE id = :id",
        "DELETE FROM call_records WHERE id = :id",
        "DELETE FROM call_records",
    ],
)
def test_the_database_refuses_changing_a_signed_record(engine: Engine, sql: str) -> None:
    row = a_record(engine)
    assert "signed call records are append-only" in refused(engine, sql, id=row.id)
    kept = CallRecordStore.for_engine(engine).get(row.id)
    assert kept is not None
    assert (kept.header, kept.signature) == ("{}", b"\x00" * 64)


def test_an_amendment_must_name_the_original(engine: Engine) -> None:
    original = a_record(engine)
    with pytest.raises(DBAPIError, match="amendment_names_original"):
        execute(
            engine,
            "INSERT INTO call_records (id, call_id, kind, amends, created_at, header, signature, signing_key_id, "
            "timestamp_token, timestamped_at, body_token, data_key_id) SELECT :id, call_id, 'amendment', NULL, "
            "created_at, header, signature, signing_key_id, timestamp_token, timestamped_at, body_token, data_key_id "
            "FROM call_records WHERE id = :original",
            id=str(uuid.uuid4()),
            original=original.id,
        )


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("table", ["call_records", "recordings"])
def test_postgres_refuses_truncate(engine: Engine, table: str) -> None:
    a_record(engine)
    stored(RecordingStore.for_engine(engine), engine, retain_until=NOW - timedelta(days=1))
    assert "refused" in refused(engine, f"TRUNCATE {table} CASCADE")
