"""Legal hold and removal of recordings (``recordings.removal``): reason checked first, audit entry before the
row and the file change, refusals audited, a purge sweeping files a crash left behind."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from compliance.access import AccessError
from compliance.audit import AuditLog
from recordings.removal import RecordingRemoval
from recordings.store import RecordingRow, RecordingStore
from tests.unit.recordings.test_recordings_store import NOW, stored

ACTOR = "os:ops.li"


def removal(store: RecordingStore, audit: AuditLog, tmp_path: Path) -> RecordingRemoval:
    return RecordingRemoval(store, audit, tmp_path, actor=ACTOR)


def with_file(row: RecordingRow, store_dir: Path) -> Path:
    assert row.path is not None
    path = store_dir / row.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ciphertext")
    return path


def entries(audit: AuditLog) -> list[tuple[str, str, str, dict[str, object]]]:
    return [(e.actor, e.action, e.outcome, json.loads(e.details)) for e in audit.store.entries()]


def test_remove_audits_first_then_marks_the_row_and_deletes_the_file(
    store: RecordingStore, engine: Engine, audit: AuditLog, tmp_path: Path
) -> None:
    row = stored(store, engine, retain_until=NOW - timedelta(days=1))
    path = with_file(row, tmp_path)
    got, refusal = removal(store, audit, tmp_path).remove(row.id, reason=" retention period ended ", at=NOW)
    assert (got.id, refusal) == (row.id, None)
    assert store.get(row.id).state == "purged"
    assert not path.exists()
    assert entries(audit) == [
        (ACTOR, "delete", "success", {"recording": row.id, "call": row.call_id, "operation": "purge"})
    ]
    assert [e.reason for e in audit.store.entries()] == ["retention period ended"]


def test_remove_before_the_retention_date_is_refused_and_audited(
    store: RecordingStore, engine: Engine, audit: AuditLog, tmp_path: Path
) -> None:
    row = stored(store, engine, retain_until=NOW + timedelta(days=1))
    path = with_file(row, tmp_path)
    _, refusal = removal(store, audit, tmp_path).remove(row.id, reason="retention period ended", at=NOW)
    assert refusal is not None
    assert store.get(row.id).state == "stored"
    assert path.exists()
    [(actor, action, outcome, details)] = entries(audit)
    assert (actor, action, outcome, details["recording"]) == (ACTOR, "denied", "denied", row.id)


@pytest.mark.parametrize("reason", ["called from 13800138000", " "])
def test_a_bad_reason_changes_and_audits_nothing(
    store: RecordingStore, engine: Engine, audit: AuditLog, tmp_path: Path, reason: str
) -> None:
    row = stored(store, engine, retain_until=NOW - timedelta(days=1))
    path = with_file(row, tmp_path)
    removing = removal(store, audit, tmp_path)
    for attempt in (
        lambda: removing.remove(row.id, reason=reason, at=NOW),
        lambda: removing.purge_expired(reason=reason, at=NOW),
        lambda: removing.set_hold([row.id], on=True, reason=reason, at=NOW),
    ):
        with pytest.raises(AccessError, match="reason"):
            attempt()
    assert store.get(row.id).state == "stored"
    assert not store.get(row.id).legal_hold
    assert path.exists()
    assert entries(audit) == []


def test_purge_removes_the_expired_skips_the_held_and_sweeps_leftover_files(
    store: RecordingStore, engine: Engine, audit: AuditLog, tmp_path: Path
) -> None:
    expired = stored(store, engine, retain_until=NOW - timedelta(days=2))
    held = stored(store, engine, retain_until=NOW - timedelta(days=1))
    current = stored(store, engine, retain_until=NOW + timedelta(days=1))
    files = {row.id: with_file(row, tmp_path) for row in (expired, held, current)}
    removing = removal(store, audit, tmp_path)
    assert removing.set_hold([held.id], on=True, reason="complaint 88", at=NOW) == 1
    dry = removing.purge_expired(reason="retention period ended", at=NOW, dry_run=True)
    assert ([r.id for r in dry.expired], dry.purged) == ([expired.id], 0)
    assert files[expired.id].exists()
    # A purged row whose file a crash left behind.
    crashed = stored(store, engine, retain_until=NOW - timedelta(days=3))
    leftover = with_file(crashed, tmp_path)
    assert store.mark_purged(crashed.id, by=ACTOR, at=NOW)
    result = removing.purge_expired(reason="retention period ended", at=NOW)
    assert (result.purged, result.skipped) == (1, 0)
    assert not files[expired.id].exists()
    assert not leftover.exists()
    assert files[held.id].exists()
    assert files[current.id].exists()
    assert [(a, o) for _, a, o, _ in entries(audit)] == [("legal_hold", "success"), ("delete", "success")]


def test_a_hold_that_changes_nothing_is_not_audited(
    store: RecordingStore, engine: Engine, audit: AuditLog, tmp_path: Path
) -> None:
    row = stored(store, engine, retain_until=NOW)
    removing = removal(store, audit, tmp_path)
    assert removing.set_hold([row.id], on=False, reason="complaint settled", at=NOW) == 0
    assert entries(audit) == []
    assert removing.set_hold([row.id], on=True, reason="complaint 88", at=NOW) == 1
    assert entries(audit) == [(ACTOR, "legal_hold", "success", {"recordings": [row.id], "hold": True})]
