"""Rollback of the audit trail: deleting the newest entries together with the signed heads that cover them, or
wiping both tables, must not pass ``audit verify``. The head signer remembers the largest head it signed (beside
its key) and publishes every head to a witness file; verification compares the database against both."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from compliance.audit import AuditIntegrityError, AuditLog, Ed25519Signer, SqlAuditStore
from compliance.audit_witness import HeadWitness
from ground import db
from ground.config import load_config
from medhotline import maintenance
from medhotline.cli import main
from medhotline.commands.audit import verify_command
from tests.unit.compliance.test_audit import Clock, append_one, tamper


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def witness(keys: Path, tmp_path: Path) -> HeadWitness:
    return HeadWitness(keys, tmp_path / "witness" / "audit-heads.jsonl")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'medhotline.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def fill(engine: Engine, signer: Ed25519Signer, witness: HeadWitness, start: int, count: int) -> AuditLog:
    """``count`` entries, a head signed after every ten and at the end."""
    log = AuditLog(SqlAuditStore(engine), clock=Clock())
    for i in range(start, start + count):
        append_one(log, i)
        if (i + 1) % 10 == 0:
            log.sign_head(signer, witness=witness)
    log.sign_head(signer, witness=witness)
    return log


def verify_out(engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = verify_command(str(engine.url), keys / Ed25519Signer.PUBLIC_FILE, witness=witness)
    return code, capsys.readouterr().out


def test_normal_operation_verifies(
    engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = Ed25519Signer.load_or_create(keys)
    fill(engine, signer, witness, 0, 25)
    code, out = verify_out(engine, keys, witness, capsys)
    assert code == 0, out
    assert "audit log OK: 25 entries" in out
    assert witness.witness_file is not None
    lines = witness.witness_file.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["size"] for line in lines] == [10, 20, 25]
    latest = witness.latest()
    assert latest is not None
    assert latest.size == 25


def test_truncation_with_its_heads_is_found(
    engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = Ed25519Signer.load_or_create(keys)
    fill(engine, signer, witness, 0, 25)
    tamper(engine, "DELETE FROM audit_entries WHERE seq >= 15", "DELETE FROM audit_heads WHERE size > 10")
    code, out = verify_out(engine, keys, witness, capsys)
    assert code == 1
    assert "audit trail has 15 entries but a head of 25 entries was signed at " in out
    assert "entries 15..24 are missing" in out


def test_wiping_both_tables_is_found(
    engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = Ed25519Signer.load_or_create(keys)
    fill(engine, signer, witness, 0, 25)
    tamper(engine, "DELETE FROM audit_entries", "DELETE FROM audit_heads")
    code, out = verify_out(engine, keys, witness, capsys)
    assert code == 1
    assert "audit trail has 0 entries but a head of 25 entries was signed at " in out


def test_rollback_then_new_entries_is_found_and_not_signed(
    engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = Ed25519Signer.load_or_create(keys)
    fill(engine, signer, witness, 0, 25)
    tamper(engine, "DELETE FROM audit_entries WHERE seq >= 15", "DELETE FROM audit_heads WHERE size > 10")
    log = AuditLog(SqlAuditStore(engine), clock=Clock())
    for i in range(100, 115):  # the rolled-back log grows past the remembered size with other entries
        append_one(log, i)
    with pytest.raises(AuditIntegrityError, match="head of 25 entries"):
        log.sign_head(signer, witness=witness)
    code, out = verify_out(engine, keys, witness, capsys)
    assert code == 1
    assert "head at size 25: root does not match" in out


def test_the_memory_alone_catches_a_deleted_witness_file(
    engine: Engine, keys: Path, witness: HeadWitness, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = Ed25519Signer.load_or_create(keys)
    fill(engine, signer, witness, 0, 25)
    assert witness.witness_file is not None
    witness.witness_file.unlink()
    tamper(engine, "DELETE FROM audit_entries", "DELETE FROM audit_heads")
    code, out = verify_out(engine, keys, witness, capsys)
    assert code == 1
    assert "audit trail has 0 entries but a head of 25 entries was signed at " in out


def test_audit_verify_command_finds_a_wiped_trail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: the service's head signing, then `medhotline audit verify` after both tables were wiped."""
    path = tmp_path / "medhotline.toml"
    path.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    assert main(["--config", str(path), "accounts", "add", "adm.zhao", "--name", "Zhao Min", "--role", "admin"]) == 0
    config = load_config(path, {})

    async def sign_once() -> None:  # the service signs a head when its signing task stops
        task = asyncio.create_task(maintenance.sign_audit_heads(config, interval=3600))
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(sign_once())
    capsys.readouterr()
    assert main(["--config", str(path), "audit", "verify"]) == 0
    assert "audit log OK: 1 entries, 1 signed heads verified" in capsys.readouterr().out
    engine = db.make_engine(config.database_url)
    try:
        tamper(engine, "DELETE FROM audit_entries", "DELETE FROM audit_heads")
    finally:
        engine.dispose()
    code = main(["--config", str(path), "audit", "verify"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "audit trail has 0 entries but a head of 1 entries was signed at " in out
