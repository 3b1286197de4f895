"""Signed call records against a real key service (Ed25519 signing, the local RFC 3161 authority, data keys), a
real database and real encrypted recordings: sealing a call summary, a consent and an amendment verifies; each
kind of tampering (header, signature, timestamp token, body, recording file, recording row) is named by the
check, each in a fresh setup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, tsp  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit import AuditLog
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from compliance.keystore import signed_message
from compliance.timestamps import LocalTimestampAuthority, LocalTimestamper
from ground import db
from recordings.ingest import Ingestor
from recordings.records import (
    DATA_KEY_PURPOSE,
    TABLE,
    KeyServiceTimestamper,
    RecordSealer,
    RecordsError,
    SealedRecord,
    verify_records,
)
from recordings.retention import RetentionPolicy
from recordings.signed import (
    SIGNING_PURPOSE,
    CoveredRecording,
    Header,
    RecordCheck,
    RecordingFacts,
    StoredRecord,
    check_record,
    key_id,
    timestamp_imprint,
)
from recordings.store import RecordingRow, RecordingStore
from tests.unit.recordings.helpers import (
    AGENT,
    drop_recordings_guard,
    drop_records_guard,
    execute,
    finished_recording,
    sha256,
)


@dataclass
class Setup:
    engine: Engine
    keys: KeyServiceClient
    store: RecordingStore
    sealer: RecordSealer
    ring: DataKeyRing
    store_dir: Path
    spool_dir: Path
    audit: AuditLog
    last_wav: bytes = b""

    async def stored_recording(self, **kwargs: Any) -> RecordingRow:
        row, self.last_wav = finished_recording(self.store, self.engine, self.spool_dir, seconds=2, **kwargs)
        ingest = Ingestor(
            self.store,
            self.keys,
            spool_dir=self.spool_dir,
            store_dir=self.store_dir,
            policy=RetentionPolicy({"outpatient": 15, "emergency": 15, "inpatient": 30}),
            calls=db.CallRepository.for_engine(self.engine),
        )
        assert await ingest.ingest(row.id)
        return self.store.get(row.id)

    async def verify(self, call_id: str | None = None, **kwargs: Any) -> dict[str, RecordCheck]:
        checks = await verify_records(self.sealer, self.keys, self.store_dir, call_id=call_id, **kwargs)
        return {c.record_id: c for c in checks}

    async def body(self, record_id: str) -> dict[str, Any]:
        record = self.sealer.records.get(record_id)
        assert record is not None
        value = json.loads(await self.sealer.body(record))
        assert isinstance(value, dict)
        return value

    def record(self, record_id: str) -> StoredRecord:
        record = self.sealer.records.get(record_id)
        assert record is not None
        return record

    def tamper_record(self, record_id: str, column: str, value: object) -> None:
        drop_records_guard(self.engine)
        assert execute(self.engine, f"UPDATE call_records SET {column} = :v WHERE id = :id", v=value, id=record_id) == 1


@pytest.fixture
def setup(
    engine: Engine,
    sessions: sessionmaker[Session],
    keys: KeyServiceClient,
    store: RecordingStore,
    store_dir: Path,
    spool_dir: Path,
    audit: AuditLog,
) -> Setup:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)
    sealer = RecordSealer(sessions, keys, KeyServiceTimestamper(keys), ring, audit=audit)
    return Setup(engine, keys, store, sealer, ring, store_dir, spool_dir, audit)


async def sealed_summary(setup: Setup) -> tuple[SealedRecord, RecordingRow]:
    recording = await setup.stored_recording()
    sealed = await setup.sealer.seal_call_summary(recording.call_id, [recording])
    assert sealed is not None
    return sealed, recording


async def problems_of(setup: Setup, record_id: str) -> list[str]:
    checks = await setup.verify()
    return checks[record_id].problems


# --- sealing and verifying --------------------------------------------------------------------------------------


async def test_a_sealed_call_summary_verifies(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    checks = await setup.verify(recording.call_id)
    assert list(checks) == [sealed.id]
    check = checks[sealed.id]
    assert (check.ok, check.problems, check.notes, check.kind) == (True, [], [], "call_summary")
    assert check.timestamped_at == sealed.timestamped_at
    assert abs(sealed.timestamped_at - datetime.now(UTC)) < timedelta(minutes=5)

    record = setup.record(sealed.id)
    header = Header.parse(record.header)
    assert header.recordings == (
        CoveredRecording(recording.id, recording.plain_sha256 or "", recording.cipher_sha256 or ""),
    )
    assert (header.call, header.kind, header.amends, header.agent) == (recording.call_id, "call_summary", None, AGENT)
    anchors = await setup.keys.trust_anchors()
    assert header.signing_key == record.signing_key_id == key_id(anchors.signing_key)
    # The header holds ids, times and digests only: not the keywords the caller said, nor the category.
    assert "胸痛" not in record.header
    assert "cardiology" not in record.header

    body = await setup.body(sealed.id)
    assert hashlib.sha256(await setup.sealer.body(record)).hexdigest() == header.body_sha256
    assert (body["call"], body["category"], body["priority"], body["agent"]) == (
        recording.call_id, "cardiology", "normal", AGENT,
    )  # fmt: skip
    assert body["keywords"] == ["胸痛"]
    assert [(p["flow"], p["node"], p["edge"]) for p in body["path"]] == [
        ("hotline", "welcome", "next"), ("hotline", "symptoms", "matched"), ("queue", "answered", AGENT),
    ]  # fmt: skip
    assert (body["note"], body["note_author"]) == (None, None)
    signs = [e for e in setup.audit.store.entries() if e.action == "sign"]
    assert [json.loads(e.details)["record"] for e in signs] == [sealed.id]


async def test_a_call_is_summarised_once(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    assert await setup.sealer.seal_call_summary(recording.call_id, [recording]) is None
    assert [r.id for r in setup.sealer.records.for_call(recording.call_id)] == [sealed.id]


async def test_a_call_summarised_twice_at_once_keeps_one_summary(setup: Setup) -> None:
    recording = await setup.stored_recording()
    results = await asyncio.gather(
        setup.sealer.seal_call_summary(recording.call_id, [recording]),
        setup.sealer.seal_call_summary(recording.call_id, [recording]),
    )
    summaries = [r for r in setup.sealer.records.for_call(recording.call_id) if r.kind == "call_summary"]
    assert len(summaries) == 1
    assert [r.id for r in results if r is not None] == [summaries[0].id]


async def test_a_recording_not_yet_stored_cannot_be_sealed(setup: Setup) -> None:
    row, _ = finished_recording(setup.store, setup.engine, setup.spool_dir, seconds=1)
    with pytest.raises(RecordsError, match=f"recordings {row.id} are not stored yet"):
        await setup.sealer.seal_call_summary(row.call_id, [row])
    assert setup.sealer.records.for_call(row.call_id) == []


async def test_an_unknown_call_cannot_be_summarised(setup: Setup) -> None:
    with pytest.raises(RecordsError, match="no call"):
        await setup.sealer.seal_call_summary(str(uuid.uuid4()), [])


async def test_verify_all_covers_every_call(setup: Setup) -> None:
    first, _ = await sealed_summary(setup)
    second, _ = await sealed_summary(setup)
    checks = await setup.verify()
    assert set(checks) == {first.id, second.id}
    assert all(c.ok for c in checks.values())


# --- tampering, each named --------------------------------------------------------------------------------------


async def test_an_edited_header_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    header = setup.record(sealed.id).header
    assert f'"agent":"{AGENT}"' in header
    setup.tamper_record(sealed.id, "header", header.replace(f'"agent":"{AGENT}"', '"agent":"agent.xu"'))
    problems = await problems_of(setup, sealed.id)
    assert problems == [
        "signature: does not verify (the header or the signature was altered)",
        "timestamp: the token's message imprint does not match the record",
    ]


async def test_a_re_encoded_header_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    header = json.loads(setup.record(sealed.id).header)
    setup.tamper_record(sealed.id, "header", json.dumps(header, sort_keys=True))  # same content, with spaces
    problems = await problems_of(setup, sealed.id)
    assert problems == ["header: the header is not in canonical form (it was re-encoded or edited)"]


async def test_a_header_that_is_not_one_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    setup.tamper_record(sealed.id, "header", '{"format":1}')
    problems = await problems_of(setup, sealed.id)
    assert len(problems) == 1
    assert problems[0].startswith("header: the header is not a medhotline record header")


async def test_a_row_that_no_longer_matches_its_header_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    setup.tamper_record(sealed.id, "kind", "consent")
    assert await problems_of(setup, sealed.id) == ["header: the signed kind differs from the row's (row altered)"]


async def test_an_altered_signature_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    signature = bytearray(setup.record(sealed.id).signature)
    signature[10] ^= 0x01
    setup.tamper_record(sealed.id, "signature", bytes(signature))
    problems = await problems_of(setup, sealed.id)
    assert problems == [
        "signature: does not verify (the header or the signature was altered)",
        "timestamp: the token's message imprint does not match the record",
    ]


def flip_in_tst_info(token: bytes) -> bytes:
    """``token`` with the last byte of the TSTInfo's serial number changed (still valid DER)."""
    tst_der = bytes(cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"].contents)
    serial = bytes(tsp.TSTInfo.load(tst_der)["serial_number"].contents)
    assert token.count(tst_der) == 1
    assert tst_der.count(serial) == 1
    at = token.index(tst_der) + tst_der.index(serial) + len(serial) - 1
    return token[:at] + bytes([token[at] ^ 0x01]) + token[at + 1 :]


async def test_a_byte_changed_inside_the_timestamp_info_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    token = setup.record(sealed.id).timestamp_token
    setup.tamper_record(sealed.id, "timestamp_token", flip_in_tst_info(token))
    problems = await problems_of(setup, sealed.id)
    assert problems == [
        "timestamp: the token's signed message-digest does not match its TSTInfo (the TSTInfo was altered)"
    ]


async def test_a_timestamp_token_over_another_digest_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    other = await KeyServiceTimestamper(setup.keys).stamp(hashlib.sha256(b"another record").digest())
    setup.tamper_record(sealed.id, "timestamp_token", other)
    assert await problems_of(setup, sealed.id) == ["timestamp: the token's message imprint does not match the record"]


async def test_a_timestamp_from_an_untrusted_authority_is_named(setup: Setup, tmp_path: Path) -> None:
    """A forger re-stamps the right record with an authority of their own, even with a plausible time."""
    sealed, _ = await sealed_summary(setup)
    record = setup.record(sealed.id)
    forger = LocalTimestampAuthority.load_or_create(tmp_path / "forged-tsa")
    token = await LocalTimestamper(forger).stamp(timestamp_imprint(record.header.encode(), record.signature))
    setup.tamper_record(sealed.id, "timestamp_token", token)
    problems = await problems_of(setup, sealed.id)
    assert len(problems) == 1
    assert problems[0].startswith("timestamp: the TSA certificate is not trusted")
    # ... unless the verifier is told to trust that authority (an external TSA by configuration).
    trusted = await setup.verify(extra_tsa_certificates=[x509.load_pem_x509_certificate(forger.certificate_pem)])
    assert trusted[sealed.id].ok


async def test_a_garbled_timestamp_token_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    setup.tamper_record(sealed.id, "timestamp_token", setup.record(sealed.id).timestamp_token[:-20])
    assert await problems_of(setup, sealed.id) == ["timestamp: not a DER TimeStampToken"]


async def test_an_altered_body_token_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    token, _ = setup.sealer.records.body(sealed.id)
    middle = len(token) // 2
    altered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    setup.tamper_record(sealed.id, "body_token", altered)
    problems = await problems_of(setup, sealed.id)
    assert len(problems) == 1
    assert problems[0].startswith(
        f"body: the encrypted body does not decrypt: cannot decrypt call_records.body of row {sealed.id}"
    )


async def test_a_body_moved_from_another_record_is_named(setup: Setup) -> None:
    sealed, _ = await sealed_summary(setup)
    other, _ = await sealed_summary(setup)
    other_token, _ = setup.sealer.records.body(other.id)
    setup.tamper_record(sealed.id, "body_token", other_token)
    problems = await problems_of(setup, sealed.id)
    assert len(problems) == 1
    assert problems[0].startswith("body: the encrypted body does not decrypt")


async def test_a_body_re_encrypted_with_the_right_key_but_other_content_is_named(setup: Setup) -> None:
    """Someone holding the data key rewrites the summary: it decrypts, but not to what was signed."""
    sealed, _ = await sealed_summary(setup)
    body = await setup.body(sealed.id)
    body["category"] = "dermatology"
    key = await setup.ring.current_key(DATA_KEY_PURPOSE)
    async with setup.ring.cipher([key]) as cipher:
        forged = cipher.encrypt_bytes(json.dumps(body).encode(), table=TABLE, column="body", row_id=sealed.id)
    setup.tamper_record(sealed.id, "body_token", forged)
    problems = await problems_of(setup, sealed.id)
    assert problems == ["body: its SHA-256 differs from the signed one (the content was altered)"]


async def test_an_altered_recording_file_is_named(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    assert recording.path is not None
    path = setup.store_dir / recording.path
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    problems = await problems_of(setup, sealed.id)
    assert problems == [f"recording {recording.id}: the encrypted file's SHA-256 differs from the signed one"]


async def test_a_deleted_recording_file_is_named(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    assert recording.path is not None
    (setup.store_dir / recording.path).unlink()
    problems = await problems_of(setup, sealed.id)
    assert problems == [f"recording {recording.id}: the encrypted file is missing"]


async def test_a_rewritten_recording_digest_is_named(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    with pytest.raises(DBAPIError, match="refused"):  # the database guards it ...
        execute(setup.engine, "UPDATE recordings SET cipher_sha256 = :v WHERE id = :id", v="0" * 64, id=recording.id)
    drop_recordings_guard(setup.engine)  # ... until a DBA drops the guard
    execute(setup.engine, "UPDATE recordings SET cipher_sha256 = :v WHERE id = :id", v="0" * 64, id=recording.id)
    problems = await problems_of(setup, sealed.id)
    assert problems == [f"recording {recording.id}: the database's digests differ from the signed ones"]


async def test_a_purged_recording_is_a_note_not_a_problem(setup: Setup) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=16 * 366)
    recording = await setup.stored_recording(started_at=long_ago)
    sealed = await setup.sealer.seal_call_summary(recording.call_id, [recording])
    assert sealed is not None
    assert setup.store.mark_purged(recording.id, by="ops.li", at=datetime.now(UTC))
    assert recording.path is not None
    (setup.store_dir / recording.path).unlink()
    check = (await setup.verify())[sealed.id]
    assert check.ok
    assert check.notes == [f"recording {recording.id}: purged after its retention; its signed digests remain"]


def test_a_record_signed_by_an_untrusted_key_is_named() -> None:
    """check_record on its own: a whole record forged with another Ed25519 key (no key service needed)."""
    forged_key = Ed25519PrivateKey.generate()
    trusted_key = Ed25519PrivateKey.generate()
    raw = forged_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    trusted_raw = trusted_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    now = datetime.now(UTC)
    header = Header(str(uuid.uuid4()), "call-1", "consent", None, now, "0" * 64, (), None, key_id(raw))
    header_bytes = header.canonical()
    signature = forged_key.sign(signed_message(header_bytes, SIGNING_PURPOSE))
    record = StoredRecord(
        header.record, "call-1", "consent", None, now, header_bytes.decode(), signature, key_id(raw), b"", now
    )
    check = check_record(
        record,
        signing_keys={key_id(trusted_raw): trusted_key.public_key()},
        tsa_certificates=[],
        body_digest=lambda _: "0" * 64,
        recordings={},
        records={},
    )
    assert check.problems == [
        f"signature: signing key {key_id(raw)} is not a trusted records key",
        "timestamp: not a DER TimeStampToken",
    ]
    # The same record against the forger's key: the signature checks, so the trust anchor is what caught it.
    trusting_forger = check_record(
        replace(record, timestamp_token=b""),
        signing_keys={key_id(raw): forged_key.public_key()},
        tsa_certificates=[],
        body_digest=lambda _: "0" * 64,
        recordings={},
        records={},
    )
    assert trusting_forger.problems == ["timestamp: not a DER TimeStampToken"]


def test_links_to_recordings_and_records_of_other_calls_are_named() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    now = datetime.now(UTC)
    covered = CoveredRecording("rec-1", "a" * 64, "b" * 64)
    header = Header(
        "r-2",
        "call-1",
        "amendment",
        "r-1",
        now,
        "0" * 64,
        (covered, CoveredRecording("rec-9", "c" * 64, "d" * 64)),
        None,
        key_id(raw),
    )
    text = header.canonical()
    record = StoredRecord(
        "r-2",
        "call-1",
        "amendment",
        "r-1",
        now,
        text.decode(),
        key.sign(signed_message(text, SIGNING_PURPOSE)),
        key_id(raw),
        b"",
        now,
    )
    original = replace(record, id="r-1", call_id="call-2", kind="call_summary", amends=None)
    check = check_record(
        record,
        signing_keys={key_id(raw): key.public_key()},
        tsa_certificates=[],
        body_digest=lambda _: "0" * 64,
        recordings={"rec-1": RecordingFacts("rec-1", "call-2", "stored", "a" * 64, "b" * 64, "b" * 64)},
        records={"r-1": original},
    )
    assert check.problems == [
        "timestamp: not a DER TimeStampToken",
        "recording rec-1: belongs to another call",
        "recording rec-9: named by the record but not in the database",
        "amends r-1: a record of another call",
    ]


# --- notes and amendments ----------------------------------------------------------------------------------------


async def test_a_note_written_before_the_seal_goes_into_the_summary(setup: Setup) -> None:
    recording = await setup.stored_recording()
    note = "Patient advised to come to the emergency department; follow-up call tomorrow."
    assert await setup.sealer.add_note(recording.call_id, AGENT, f"  {note}\n") == ("staged", recording.call_id)
    assert setup.sealer.records.pending_note(recording.call_id) is not None
    sealed = await setup.sealer.seal_call_summary(recording.call_id, [recording])
    assert sealed is not None
    body = await setup.body(sealed.id)
    assert (body["note"], body["note_author"]) == (note, AGENT)
    assert setup.sealer.records.pending_note(recording.call_id) is None
    assert (await setup.verify(recording.call_id))[sealed.id].ok
    # The note is kept encrypted while it waits, and marked as sealed into the summary.
    with setup.engine.connect() as connection:
        token, sealed_in = connection.execute(
            text("SELECT note_token, sealed_in FROM call_notes WHERE call_id = :c"), {"c": recording.call_id}
        ).one()
    assert "emergency" not in token
    assert sealed_in == sealed.id


async def test_a_second_note_before_the_seal_is_refused(setup: Setup) -> None:
    recording = await setup.stored_recording()
    await setup.sealer.add_note(recording.call_id, AGENT, "first")
    with pytest.raises(RecordsError, match="already has a note waiting for its summary"):
        await setup.sealer.add_note(recording.call_id, AGENT, "second")


@pytest.mark.parametrize("text", ["", "   \n", "x" * 20_001])
async def test_a_note_must_hold_text_of_a_sane_length(setup: Setup, text: str) -> None:
    recording = await setup.stored_recording()
    with pytest.raises(RecordsError, match="a call note must hold 1 to 20000 characters"):
        await setup.sealer.add_note(recording.call_id, AGENT, text)


async def test_a_note_for_an_unknown_call_is_refused(setup: Setup) -> None:
    with pytest.raises(RecordsError, match="no call"):
        await setup.sealer.add_note(str(uuid.uuid4()), AGENT, "note")


async def test_a_note_after_the_seal_is_a_signed_amendment_and_the_summary_stays(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    before = setup.record(sealed.id)
    before_body = await setup.body(sealed.id)
    kind, amendment_id = await setup.sealer.add_note(recording.call_id, "nurse.liu", "Called back: symptoms eased.")
    assert kind == "amendment"

    assert setup.record(sealed.id) == before
    assert await setup.body(sealed.id) == before_body
    amendment = setup.record(amendment_id)
    header = Header.parse(amendment.header)
    assert (amendment.kind, amendment.amends, header.amends, header.agent) == (
        "amendment", sealed.id, sealed.id, "nurse.liu",
    )  # fmt: skip
    assert await setup.body(amendment_id) == {
        "call": recording.call_id,
        "amends": sealed.id,
        "note": "Called back: symptoms eased.",
        "note_author": "nurse.liu",
    }
    checks = await setup.verify(recording.call_id)
    assert set(checks) == {sealed.id, amendment_id}
    assert all(c.ok for c in checks.values())
    signs = [json.loads(e.details) for e in setup.audit.store.entries() if e.action == "sign"]
    assert signs[-1] == {"record": amendment_id, "call": recording.call_id, "kind": "amendment", "amends": sealed.id}


async def test_an_amendment_whose_original_was_altered_still_names_the_original(setup: Setup) -> None:
    sealed, recording = await sealed_summary(setup)
    _, amendment_id = await setup.sealer.add_note(recording.call_id, AGENT, "late note")
    signature = bytearray(setup.record(sealed.id).signature)
    signature[0] ^= 0x80
    setup.tamper_record(sealed.id, "signature", bytes(signature))
    checks = await setup.verify(recording.call_id)
    assert checks[amendment_id].ok
    assert not checks[sealed.id].ok


async def test_a_note_staged_while_the_summary_is_being_signed_becomes_an_amendment(
    setup: Setup, sessions: sessionmaker[Session]
) -> None:
    """The summary read "no note" just before the agent's note was staged: the note must not wait for ever."""
    recording = await setup.stored_recording()
    call_id = recording.call_id
    staged: list[tuple[str, str]] = []

    class NoteArrivesDuringStamp:
        def __init__(self, inner: KeyServiceTimestamper) -> None:
            self.inner = inner

        async def stamp(self, digest: bytes) -> bytes:
            if not staged:  # between reading the note and storing the summary
                staged.append(await sealer.add_note(call_id, AGENT, "written during the seal"))
            return await self.inner.stamp(digest)

    sealer = RecordSealer(sessions, setup.keys, NoteArrivesDuringStamp(KeyServiceTimestamper(setup.keys)), setup.ring)
    summary = await sealer.seal_call_summary(call_id, [recording])
    assert summary is not None
    assert staged == [("staged", call_id)]
    assert (await setup.body(summary.id))["note"] is None
    records = sealer.records.for_call(call_id)
    assert [r.kind for r in records] == ["call_summary", "amendment"]
    amendment = records[1]
    assert amendment.amends == summary.id
    assert (await setup.body(amendment.id))["note"] == "written during the seal"
    assert sealer.records.pending_note(call_id) is None
    assert all(c.ok for c in (await setup.verify(call_id)).values())


async def test_a_note_staged_just_after_the_summary_was_sealed_becomes_an_amendment(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_note looked for the summary just before it was stored, then staged the note: it amends."""
    sealed, recording = await sealed_summary(setup)
    records = setup.sealer.records
    real = records.summary_of
    looks: list[str] = []

    def stale_first_look(call_id: str) -> StoredRecord | None:
        looks.append(call_id)
        return None if len(looks) == 1 else real(call_id)

    monkeypatch.setattr(records, "summary_of", stale_first_look)
    kind, amendment_id = await setup.sealer.add_note(recording.call_id, AGENT, "raced the seal")
    assert kind == "amendment"
    assert setup.record(amendment_id).amends == sealed.id
    assert (await setup.body(amendment_id))["note"] == "raced the seal"
    assert records.pending_note(recording.call_id) is None
    assert all(c.ok for c in (await setup.verify(recording.call_id)).values())


# --- consent -----------------------------------------------------------------------------------------------------


async def test_a_consent_is_signed_and_linked_to_its_recording(setup: Setup) -> None:
    recording = await setup.stored_recording()
    consent = {
        "call": recording.call_id,
        "text_version": "remote-consultation-v2",
        "text_sha256": sha256("您是否同意通过电话进行远程咨询？".encode()),
        "confirmed": True,
        "digits": ["1", "1"],
    }
    sealed = await setup.sealer.seal_consent(recording.call_id, consent, recording)
    header = Header.parse(setup.record(sealed.id).header)
    assert (header.kind, header.call) == ("consent", recording.call_id)
    assert header.recordings == (
        CoveredRecording(recording.id, recording.plain_sha256 or "", recording.cipher_sha256 or ""),
    )
    assert header.recordings[0].plain_sha256 == sha256(setup.last_wav)  # the audio of the consent itself
    assert await setup.body(sealed.id) == consent
    assert (await setup.verify(recording.call_id))[sealed.id].ok


async def test_a_consent_with_an_altered_recording_is_named(setup: Setup) -> None:
    recording = await setup.stored_recording()
    sealed = await setup.sealer.seal_consent(recording.call_id, {"confirmed": True}, recording)
    assert recording.path is not None
    path = setup.store_dir / recording.path
    path.write_bytes(path.read_bytes() + b"\x00")
    problems = await problems_of(setup, sealed.id)
    assert problems == [f"recording {recording.id}: the encrypted file's SHA-256 differs from the signed one"]


async def test_a_consent_without_a_recording_verifies(setup: Setup) -> None:
    recording = await setup.stored_recording()
    sealed = await setup.sealer.seal_consent(recording.call_id, {"confirmed": True}, None)
    assert Header.parse(setup.record(sealed.id).header).recordings == ()
    assert (await setup.verify(recording.call_id))[sealed.id].ok
