"""The service's background duties: they retry instead of failing, and they do their job when things work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.config import Config, load_config
from medhotline import maintenance
from telephony.ports import PatientDirectory


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = load_config(
        None,
        environ={
            "MEDHOTLINE__SERVICE__STATE_DIR": str(tmp_path),
            "MEDHOTLINE__KEYSERVICE__DIRECTORY": str(tmp_path / "keys"),
        },
    )
    db.upgrade(config.database_url)
    return config


async def test_without_a_key_service_the_directory_is_retried_not_fatal(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "DIRECTORY_RETRY", 0.05)
    installed: list[PatientDirectory] = []
    with capture_logs() as logs:
        task = asyncio.create_task(maintenance.connect_patient_directory(config, installed.append))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    failures = [e for e in logs if e["event"] == "patients.directory_unavailable"]
    assert len(failures) >= 2  # tried again, and again
    assert str(config.keyservice_socket) in failures[0]["reason"]
    assert installed == []


async def test_audit_heads_are_signed_periodically_and_at_stop(config: Config) -> None:
    engine = db.make_engine(config.database_url)
    try:
        audit = AuditLog(SqlAuditStore(engine))
        audit.append(actor="admin1", role="admin", action="permission_change", outcome="success", reason="test")
        task = asyncio.create_task(maintenance.sign_audit_heads(config, interval=0.05))
        await asyncio.sleep(0.3)
        assert [h.size for h in audit.store.heads()][-1] == 1
        audit.append(actor="admin1", role="admin", action="permission_change", outcome="success", reason="again")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert audit.store.heads()[-1].size == 2  # the final head, signed on the way out
    finally:
        engine.dispose()
    assert (config.service.state_dir / "audit").is_dir()


async def test_expired_break_glass_grants_are_closed_by_the_sweep(config: Config) -> None:
    from datetime import UTC, datetime, timedelta

    from compliance.access_store import AccessControl
    from compliance.accounts import AccountStore

    engine = db.make_engine(config.database_url)
    try:
        long_ago = datetime.now(UTC) - timedelta(hours=3)
        AccountStore.for_engine(engine).add("dr.wu", "Wu", ["physician"], long_ago, departments=["cardiology"])
        access = AccessControl.for_engine(engine)
        grant = access.open_break_glass(
            "dr.wu", "patient unconscious in the ward, records needed", long_ago, department="cardiology", minutes=60
        )
        task = asyncio.create_task(maintenance.sweep_break_glass(config, interval=0.05))

        def closed() -> list[Any]:
            return [e for e in AuditLog(SqlAuditStore(engine)).store.entries() if e.action == "break_glass_end"]

        # Until the first sweep has closed it (a loaded machine may take seconds), then several sweeps more.
        for _ in range(600):  # at most about 30 s
            if closed():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ends = closed()
    finally:
        engine.dispose()
    assert len(ends) == 1  # closed once, however often the sweep ran
    assert ends[0].reason == "expired"
    assert grant.id in (ends[0].details or "")
