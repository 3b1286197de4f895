"""Audit trail: entries, signed heads, append-only storage, tamper detection, inclusion proofs, CLI functions."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from compliance import (
    AUDIT_METADATA,
    AuditEntry,
    AuditError,
    AuditIntegrityError,
    AuditLog,
    Ed25519Signer,
    InclusionProof,
    MemoryAuditStore,
    ProofError,
    SignedTreeHead,
    SqlAuditStore,
    check_consistency,
    check_inclusion,
    load_public_key,
    prove,
    prove_consistency,
    verify,
)
from compliance.audit import AuditStore, key_id, signed_head_bytes
from compliance.merkle import leaf_hash, merkle_root
from ground import db
from ground.errors import EXIT_UNABLE
from ground.models import Base
from medhotline.commands.audit import prove_command, verify_command

T0 = datetime(2026, 11, 27, 8, 30, 0, tzinfo=UTC)
PATIENT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ENTRIES = 25
HEAD_EVERY = 10


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def signer(tmp_path: Path) -> Ed25519Signer:
    return Ed25519Signer.load_or_create(tmp_path / "keys")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    db.upgrade(url)
    return url


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = db.make_engine(sqlite_url)
    yield engine
    engine.dispose()


def append_one(log: AuditLog, i: int) -> AuditEntry:
    actions: list[Any] = ["read", "export", "change", "denied", "break_glass_start", "permission_change"]
    action = actions[i % len(actions)]
    return log.append(
        actor=f"staff:nurse-{i % 3}",
        role="nurse" if i % 2 else "physician",
        action=action,
        outcome="denied" if action == "denied" else "success",
        patient=PATIENT if i % 4 else None,
        reason=f"callback requested, note {chr(97 + i % 26)}",
        details={"channel": "ari", "attempt": i, "fields": ["lab_results"]},
    )


def fill(store: AuditStore, signer: Ed25519Signer, count: int = ENTRIES) -> AuditLog:
    """``count`` entries with a signed head after every HEAD_EVERY (sizes 10 and 20 for 25 entries)."""
    log = AuditLog(store, clock=Clock())
    for i in range(count):
        append_one(log, i)
        if (i + 1) % HEAD_EVERY == 0:
            log.sign_head(signer)
    return log


def drop_triggers(engine: Engine) -> None:
    """What an attacker with DDL rights (or a copy of the file) can do; the verifier must still notice."""
    with engine.begin() as connection:
        for table in ("audit_entries", "audit_heads"):
            for op in ("update", "delete"):
                connection.execute(text(f"DROP TRIGGER {table}_no_{op}"))


def tamper(engine: Engine, *statements: str | tuple[str, dict[str, Any]]) -> None:
    drop_triggers(engine)
    with engine.begin() as connection:
        for statement in statements:
            if isinstance(statement, tuple):
                connection.execute(text(statement[0]), statement[1])
            else:
                connection.execute(text(statement))


def renumber(where: str, delta: int) -> list[str]:
    """Shift seq by ``delta`` for the rows matching ``where``, in two steps so the primary key never collides."""
    return [
        f"UPDATE audit_entries SET seq = -seq - 1000000 WHERE {where}",
        f"UPDATE audit_entries SET seq = -(seq + 1000000) + ({delta}) WHERE seq < 0",
    ]


# --- entries and their encoding ---------------------------------------------------------------------------------


def test_canonical_encoding_is_sorted_compact_utf8() -> None:
    entry = AuditEntry(
        seq=7,
        at=datetime(2026, 1, 2, 4, 5, 6, 789, tzinfo=UTC),
        actor="staff:kim",
        role="nurse",
        action="read",
        outcome="success",
        patient=PATIENT,
        reason="Rückruf zu Befund",
        details={"b": [1, True, None], "a": "x"},
    )
    expected = (
        '{"action":"read","actor":"staff:kim","at":"2026-01-02T04:05:06.000789Z",'
        '"details":"{\\"a\\":\\"x\\",\\"b\\":[1,true,null]}","outcome":"success",'
        f'"patient":"{PATIENT}","reason":"Rückruf zu Befund","role":"nurse","seq":7,"v":1}}'
    ).encode()
    assert entry.canonical() == expected
    assert entry.leaf_hash() == leaf_hash(expected)
    stored = entry.stored()
    assert stored.content_matches()
    assert stored.to_entry() == entry


def test_times_are_normalised_to_utc() -> None:
    cet = datetime(2026, 1, 2, 5, 5, 6, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    entry = AuditEntry(0, cet, "system", "service", "key_operation", "success")
    assert entry.stored().at == "2026-01-02T05:05:06.000000Z"
    with pytest.raises(AuditError, match="timezone-aware"):
        AuditEntry(0, datetime(2026, 1, 2), "system", "service", "read", "success")


@pytest.mark.parametrize(
    "patient",
    [
        "John Smith",
        "+82 10 1234 5678",
        "01012345678",
        "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",  # upper case: not the canonical form
        "abc123",  # too short to be a blind id
        PATIENT + "0",  # odd length
        "",
    ],
)
def test_patient_field_accepts_only_a_blind_id(patient: str) -> None:
    log = AuditLog(MemoryAuditStore(), clock=Clock())
    with pytest.raises(AuditError, match="blind id"):
        log.append(actor="staff:kim", role="nurse", action="read", outcome="success", patient=patient)
    assert list(log.store.entries()) == []


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("reason", "called back on 010-1234-5678", "looks like a phone"),
        ("reason", "born 1970/01/02", "looks like a phone"),
        ("details", {"phone": "x"}, "personal data"),
        ("details", {"patient_name": "Kim"}, "personal data"),
        ("details", {"note": "+82 (10) 1234 5678"}, "looks like a phone"),
        ("details", {"ids": [{"mrn_like": 12345678}]}, "looks like an identifier"),
        ("details", {"ratio": 0.5}, "float is not allowed"),
        ("details", {"Bad Key": 1}, "lower-case identifier"),
        ("actor", "Kim Min-ji", "staff or system id"),
        ("role", "Nurse", "role name"),
        ("action", "delete_everything", "unknown audit action"),
        ("outcome", "maybe", "unknown outcome"),
    ],
)
def test_entries_without_personal_data_only(field: str, value: Any, match: str) -> None:
    fields: dict[str, Any] = {"actor": "staff:kim", "role": "nurse", "action": "read", "outcome": "success"}
    fields[field] = value
    log = AuditLog(MemoryAuditStore(), clock=Clock())
    with pytest.raises(AuditError, match=match):
        log.append(**fields)
    assert list(log.store.entries()) == []


# --- signer ------------------------------------------------------------------------------------------------------


def test_signer_key_file_is_private_and_reused(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    first = Ed25519Signer.load_or_create(directory)
    key_file = directory / Ed25519Signer.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    second = Ed25519Signer.load_or_create(directory)
    assert key_id(first.public_key) == key_id(second.public_key)
    public = load_public_key(directory / Ed25519Signer.PUBLIC_FILE)
    assert key_id(public) == key_id(first.public_key)
    os.chmod(key_file, 0o644)
    with pytest.raises(AuditError, match="readable by others"):
        Ed25519Signer.load_or_create(directory)


def test_load_public_key_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot read"):
        load_public_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(AuditError, match="cannot read"):
        load_public_key(tmp_path / "junk.pem")


# --- log, heads, verification on both stores ---------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditStore]:
    if request.param == "memory":
        yield MemoryAuditStore()
        return
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        yield SqlAuditStore(engine)
    finally:
        engine.dispose()


def test_append_sign_and_verify(store: AuditStore, signer: Ed25519Signer) -> None:
    log = fill(store, signer)
    entries = list(store.entries())
    assert [e.seq for e in entries] == list(range(ENTRIES))
    assert [h.size for h in store.heads()] == [10, 20]
    head = store.heads()[-1]
    assert head.root_hash == merkle_root([e.canonical() for e in entries[:20]])
    assert head.key_id == key_id(signer.public_key)
    report = verify(store, signer.public_key)
    assert report.ok, report.problem
    assert (report.size, report.heads_checked, report.unsigned) == (ENTRIES, 2, 5)
    assert "5 entries are not yet covered" in report.summary()
    # Nothing new: signing again returns the same head; after more entries, a new one.
    assert log.sign_head(signer) != head
    assert log.sign_head(signer) == store.heads()[-1]
    assert [h.size for h in store.heads()] == [10, 20, 25]
    assert verify(store, signer.public_key).unsigned == 0
    assert entries[3].to_entry().details == {"channel": "ari", "attempt": 3, "fields": ["lab_results"]}


def test_empty_log_verifies_and_signs(store: AuditStore, signer: Ed25519Signer) -> None:
    assert verify(store, signer.public_key).ok
    head = AuditLog(store, clock=Clock()).sign_head(signer)
    assert head.size == 0
    assert verify(store, signer.public_key).heads_checked == 1


def test_concurrent_appends_are_serialised(store: AuditStore, signer: Ed25519Signer) -> None:
    logs = [AuditLog(store, clock=Clock()) for _ in range(4)]  # separate logs: only the store serialises

    def work(log: AuditLog) -> None:
        for i in range(15):
            append_one(log, i)

    threads = [threading.Thread(target=work, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.seq for e in store.entries()] == list(range(60))
    logs[0].sign_head(signer)
    assert verify(store, signer.public_key).ok


def test_audit_tables_are_not_business_tables() -> None:
    assert set(AUDIT_METADATA.tables) == {"audit_entries", "audit_heads"}
    assert not set(AUDIT_METADATA.tables) & set(Base.metadata.tables)


# --- append-only -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_entries SET reason = 'nothing to see' WHERE seq = 3",
        "DELETE FROM audit_entries WHERE seq = 3",
        "DELETE FROM audit_entries",
        "UPDATE audit_heads SET size = 11 WHERE size = 10",
        "DELETE FROM audit_heads",
    ],
)
def test_sqlite_triggers_refuse_update_and_delete(engine: Engine, signer: Ed25519Signer, statement: str) -> None:
    store = SqlAuditStore(engine)
    fill(store, signer, 12)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
        connection.execute(text(statement))
    assert verify(store, signer.public_key).ok
    assert len(list(store.entries())) == 12


@pytest.mark.postgres
def test_postgres_triggers_refuse_update_delete_truncate(postgres_url: str, signer: Ed25519Signer) -> None:
    db.upgrade(postgres_url)
    engine = db.make_engine(postgres_url)
    try:
        store = SqlAuditStore(engine)
        fill(store, signer, 12)
        for statement in (
            "UPDATE audit_entries SET reason = 'x' WHERE seq = 3",
            "DELETE FROM audit_entries WHERE seq = 3",
            "TRUNCATE audit_entries",
            "UPDATE audit_heads SET size = 11",
            "DELETE FROM audit_heads",
            "TRUNCATE audit_heads",
        ):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
                connection.execute(text(statement))
        report = verify(store, signer.public_key)
        assert report.ok, report.problem
        assert report.size == 12
        proof = prove(store, 4)
        assert proof.head is not None
        assert check_inclusion(proof, proof.head, signer.public_key)
    finally:
        engine.dispose()


# --- tampering with the SQLite store -----------------------------------------------------------------------------


@pytest.fixture
def filled(engine: Engine, signer: Ed25519Signer) -> SqlAuditStore:
    store = SqlAuditStore(engine)
    fill(store, signer)
    assert verify(store, signer.public_key).ok
    return store


def changed(value: Any) -> Any:
    if value is None:  # a patient added to an entry that had none
        return PATIENT
    if isinstance(value, bytes):
        return bytes([value[0] ^ 0x01]) + value[1:]
    i = len(value) // 2
    return value[:i] + ("b" if value[i] == "a" else "a") + value[i + 1 :]


@pytest.mark.parametrize(
    "column", ["at", "actor", "role", "action", "patient", "reason", "outcome", "details", "leaf_hash"]
)
@pytest.mark.parametrize("seq", [0, 17, 23])
def test_changed_byte_is_found(
    engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer, column: str, seq: int
) -> None:
    with engine.connect() as connection:
        value = connection.execute(text(f"SELECT {column} FROM audit_entries WHERE seq = {seq}")).scalar_one()
    tamper(engine, (f"UPDATE audit_entries SET {column} = :v WHERE seq = {seq}", {"v": changed(value)}))
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("altered", seq)
    assert problem.message == f"entry {seq}: content does not match its leaf hash (altered)"


def test_first_problem_is_reported(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(
        engine,
        "UPDATE audit_entries SET reason = 'x' WHERE seq = 21",
        "UPDATE audit_entries SET reason = 'y' WHERE seq = 13",
    )
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert problem.seq == 13


def test_deleted_entry_is_found(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(engine, "DELETE FROM audit_entries WHERE seq = 18")
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.message) == ("removed", 18, "entry 18 missing (removed)")


def test_deleted_and_renumbered_entry_is_found(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(engine, "DELETE FROM audit_entries WHERE seq = 18", *renumber("seq > 18", -1))
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("removed", 18)
    assert problem.message.startswith("entry 18 missing (removed)")


def test_inserted_entry_is_found(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    forged = AuditEntry(18, T0 + timedelta(seconds=18, microseconds=5), "staff:kim", "nurse", "read", "success")
    row = forged.stored()
    values = {name: getattr(row, name) for name in (c.name for c in AUDIT_METADATA.tables["audit_entries"].columns)}
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    tamper(
        engine, *renumber("seq >= 18", 1), (f"INSERT INTO audit_entries ({columns}) VALUES ({placeholders})", values)
    )
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("inserted", 18)
    assert problem.message.startswith("entry 18 inserted")


def test_reordered_entries_are_found(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(
        engine,
        "UPDATE audit_entries SET seq = -1 WHERE seq = 5",
        "UPDATE audit_entries SET seq = 5 WHERE seq = 6",
        "UPDATE audit_entries SET seq = 6 WHERE seq = -1",
    )
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.message) == (
        "reordered",
        5,
        "entry 5: swapped with entry 6 (reordered)",
    )


def test_truncation_is_found(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(engine, "DELETE FROM audit_entries WHERE seq >= 15")
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("removed", 15)
    assert problem.message.startswith("entries 15..19 missing (removed: log truncated at 15")


def test_truncation_with_heads_needs_a_head_kept_by_the_auditor(
    engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer
) -> None:
    kept = filled.heads()[-1]
    tamper(engine, "DELETE FROM audit_entries WHERE seq >= 15", "DELETE FROM audit_heads WHERE size = 20")
    # The store alone now looks like a log of 15 entries with one head: undetectable without outside help.
    assert verify(filled, signer.public_key).ok
    problem = verify(filled, signer.public_key, trusted_head=kept).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("removed", 15)


@pytest.mark.parametrize(
    "statement",
    [
        ("UPDATE audit_heads SET root_hash = :v WHERE size = 20", {"v": leaf_hash(b"forged")}),
        ("UPDATE audit_heads SET size = 19 WHERE size = 20", {}),
        ("UPDATE audit_heads SET timestamp = '2027-01-01T00:00:00.000000Z' WHERE size = 20", {}),
        ("UPDATE audit_heads SET signature = :v WHERE size = 20", {"v": bytes(64)}),
    ],
)
def test_forged_head_is_found(
    engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer, statement: tuple[str, dict[str, Any]]
) -> None:
    tamper(engine, statement)
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert problem.kind == "forged"
    assert problem.message.endswith("signature invalid (forged)")
    assert problem.head_size in (19, 20)


def test_head_signed_by_another_key_is_forged(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    other = Ed25519PrivateKey.generate()
    root = merkle_root([e.canonical() for e in list(filled.entries())[:20]])
    assert root == filled.heads()[-1].root_hash  # the right root, but not signed by the log's key
    when = T0 + timedelta(hours=1)
    signature = other.sign(signed_head_bytes(20, root, when))
    tamper(
        engine,
        "DELETE FROM audit_heads WHERE size = 20",
        (
            "INSERT INTO audit_heads (size, root_hash, timestamp, signature, key_id) VALUES (20, :r, :t, :s, :k)",
            {"r": root, "t": "2026-11-27T09:30:00.000000Z", "s": signature, "k": key_id(other.public_key())},
        ),
    )
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.head_size) == ("forged", 20)
    assert problem.message == "head at size 20: signature invalid (forged)"


def test_rehashed_alteration_is_caught_by_the_next_head(
    engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer
) -> None:
    entry = filled.entry(12)
    assert entry is not None
    altered = replace(entry, reason="nothing happened")
    altered = replace(altered, leaf_hash=leaf_hash(altered.canonical()))
    tamper(
        engine,
        (
            "UPDATE audit_entries SET reason = :r, leaf_hash = :h WHERE seq = 12",
            {"r": altered.reason, "h": altered.leaf_hash},
        ),
    )
    problem = verify(filled, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.head_size) == ("altered", 20)
    assert "an entry in 10..19" in problem.message
    # And the service refuses to bless the tampered log with a new signature.
    with pytest.raises(AuditIntegrityError, match="does not extend the signed head at size 20"):
        AuditLog(filled, clock=Clock()).sign_head(signer)


def test_sign_head_refuses_unsigned_tampering(engine: Engine, filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    tamper(engine, "UPDATE audit_entries SET reason = 'x' WHERE seq = 22")
    with pytest.raises(AuditIntegrityError, match="entry 22"):
        AuditLog(filled, clock=Clock()).sign_head(signer)


def test_memory_store_reorder_and_duplicate(signer: Ed25519Signer) -> None:
    store = MemoryAuditStore()
    fill(store, signer)
    original = list(store.items)
    store.items[5], store.items[6] = store.items[6], store.items[5]
    problem = verify(store, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("reordered", 5)
    store.items = [*original[:8], original[7], *original[8:]]
    problem = verify(store, signer.public_key).problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.message) == ("inserted", 7, "entry 7 appears twice (inserted)")


# --- inclusion and consistency proofs ----------------------------------------------------------------------------


def test_every_entry_has_a_checkable_proof(filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    head = filled.heads()[-1]
    for seq in range(head.size):
        proof = prove(filled, seq)
        assert proof.head == head
        assert check_inclusion(proof, head, signer.public_key)
        # What the auditor receives is JSON.
        again = InclusionProof.from_json(json.loads(json.dumps(proof.to_json())))
        assert again == proof
        assert again.head is not None
        assert check_inclusion(again, SignedTreeHead.from_json(head.to_json()), signer.public_key)
    with pytest.raises(AuditError, match="not yet covered"):
        prove(filled, 22)
    with pytest.raises(AuditError, match="no audit entry 99"):
        prove(filled, 99)


def flip(value: bytes, bit: int = 0) -> bytes:
    b = bytearray(value)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def corrupted_proofs(proof: InclusionProof, other: InclusionProof) -> dict[str, InclusionProof]:
    path = proof.audit_path
    return {
        "wrong index": replace(proof, seq=proof.seq + 1),
        "another entry's index and content": replace(proof, seq=other.seq, entry=other.entry),
        "wrong size": replace(proof, tree_size=proof.tree_size - 1),
        "flipped bit in the entry": replace(proof, entry=proof.entry.replace(b'"read"', b'"reaD"')),
        "flipped bit in the path": replace(proof, audit_path=(flip(path[0], 77), *path[1:])),
        "extra element": replace(proof, audit_path=(*path, path[0])),
        "missing element": replace(proof, audit_path=path[:-1]),
        "reversed path": replace(proof, audit_path=tuple(reversed(path))),
    }


def test_corrupted_inclusion_proofs_are_rejected(filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    head = filled.heads()[-1]
    proof, other = prove(filled, 6), prove(filled, 11)
    assert b'"read"' in proof.entry
    for what, bad in corrupted_proofs(proof, other).items():
        with pytest.raises(ProofError):
            check_inclusion(bad, head, signer.public_key)
        assert what
    # A head that is not the one signed, or signed by someone else.
    with pytest.raises(ProofError, match="forged"):
        check_inclusion(proof, replace(head, root_hash=flip(head.root_hash)), signer.public_key)
    with pytest.raises(ProofError, match="forged"):
        check_inclusion(proof, head, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ProofError, match="size"):
        check_inclusion(proof, filled.heads()[0], signer.public_key)
    with pytest.raises(ProofError, match="malformed"):
        InclusionProof.from_json({"seq": 1})


def test_consistency_between_heads(filled: SqlAuditStore, signer: Ed25519Signer) -> None:
    old, new = filled.heads()
    proof = prove_consistency(filled, old.size, new.size)
    assert check_consistency(old, new, proof, signer.public_key)
    with pytest.raises(ProofError):
        check_consistency(old, new, [flip(proof[0]), *proof[1:]], signer.public_key)
    with pytest.raises(ProofError):
        check_consistency(old, new, proof[:-1], signer.public_key)
    with pytest.raises(ProofError):
        check_consistency(old, new, [*proof, proof[0]], signer.public_key)
    with pytest.raises(ProofError, match="forged"):
        check_consistency(replace(old, size=9), new, proof, signer.public_key)


# --- CLI functions -----------------------------------------------------------------------------------------------


@pytest.fixture
def public_key_file(tmp_path: Path, signer: Ed25519Signer) -> Path:
    return tmp_path / "keys" / Ed25519Signer.PUBLIC_FILE


def run(capsys: pytest.CaptureFixture[str], command: Callable[[], int]) -> tuple[int, str, str]:
    code = command()
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_command(
    sqlite_url: str,
    engine: Engine,
    filled: SqlAuditStore,
    public_key_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, lambda: verify_command(sqlite_url, public_key_file))
    assert code == 0
    assert "audit log OK: 25 entries, 2 signed heads verified" in out
    tamper(engine, "UPDATE audit_entries SET reason = 'x' WHERE seq = 17")
    code, out, _ = run(capsys, lambda: verify_command(sqlite_url, public_key_file))
    assert code == 1
    assert "entry 17: content does not match its leaf hash (altered)" in out
    code, _, err = run(capsys, lambda: verify_command(sqlite_url, public_key_file.with_name("missing.pem")))
    assert code == EXIT_UNABLE
    assert "cannot read the audit public key" in err


def test_prove_command(
    sqlite_url: str, filled: SqlAuditStore, public_key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, lambda: prove_command(sqlite_url, 7, public_key_file))
    assert code == 0, err
    assert "entry 7 is included in the signed tree of 20 entries" in err
    proof = InclusionProof.from_json(json.loads(out))
    assert proof.head is not None
    assert check_inclusion(proof, proof.head, load_public_key(public_key_file))
    code, _, err = run(capsys, lambda: prove_command(sqlite_url, 24, public_key_file))
    assert code == EXIT_UNABLE
    assert "not yet covered" in err


def test_commands_on_an_unmigrated_database(
    tmp_path: Path, public_key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    code, _, err = run(capsys, lambda: verify_command(url, public_key_file))
    assert code == EXIT_UNABLE
    assert "reading the audit log failed" in err
    code, _, err = run(capsys, lambda: prove_command(url, 0, public_key_file))
    assert code == EXIT_UNABLE
