"""The primary PostgreSQL dies (SIGKILL) during a stream of call records and audit entries; its synchronous standby
is promoted with ``pg_ctl promote``; the writers carry on through the same libpq multi-host URL.

The writes go through the service's own path: the call-record writer (``_CallWrites`` with ``record_write``,
which retries while no writable primary answers) over ``CallRepository``, and ``AuditLog`` over the SQL store.
Afterwards, read from the promoted server: every call whose writes were acknowledged is there, complete (started,
one step, finished), none twice; every acknowledged audit entry is there and the chain verifies, including the
head signed before the primary died.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from structlog.testing import capture_logs

from compliance.audit import AuditLog, Ed25519Signer, JsonValue, SqlAuditStore, audit_entries, verify
from ground import db
from ground.models import Call, CallStep
from medhotline.call_lifecycle import _CallWrites, record_write
from tests.pg_replication import pg_bin, replicated_postgres

pytestmark = pytest.mark.postgres

WORKERS = 4
BEFORE_KILL = 24  # calls acknowledged before the primary is killed
AFTER_PROMOTION = 24  # calls started after the promotion that must be acknowledged too


async def test_a_promotion_loses_no_acknowledged_call_record_or_audit_entry() -> None:
    if pg_bin() is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("PostgreSQL binaries are missing in CI")
        pytest.skip("PostgreSQL binaries not installed")
    with replicated_postgres() as pg:
        await asyncio.to_thread(db.upgrade, pg.url)
        engine = db.make_engine(pg.url)
        repo = db.CallRepository.for_engine(engine)
        store = SqlAuditStore(engine)
        audit = AuditLog(store)
        signer = Ed25519Signer(Ed25519PrivateKey.generate())
        acknowledged_calls: list[str] = []
        acknowledged_audit: list[str] = []
        stop = asyncio.Event()
        acked = asyncio.Condition()

        async def until_acknowledged(count: int) -> None:
            async with acked:
                await acked.wait_for(lambda: len(acknowledged_calls) >= count)

        async def one_call(worker: int) -> None:
            call_id = str(uuid.uuid4())
            now = datetime.now(UTC)
            writes = _CallWrites(record_write)
            writes.add(
                "start",
                repo.start,
                call_id=call_id,
                node="A",
                transport="ari",
                channel_id=call_id[:8],
                channel_name=f"PJSIP/patients-{worker}",
                flow="main",
                flow_version="v1",
                started_at=now,
            )
            writes.add(
                "step",
                repo.add_step,
                call_id,
                flow="main",
                node="menu",
                node_type="menu",
                edge=None,
                input=None,
                at=now,
            )
            writes.add("end", repo.finish, call_id, outcome="completed", ended_at=datetime.now(UTC))
            await writes.drain()
            async with acked:
                acknowledged_calls.append(call_id)
                acked.notify_all()
            details: dict[str, JsonValue] = {"call": call_id, "via": "failover test"}
            if await record_write("audit", audit.append, actor="service", role="system", action="change",
                                  outcome="success", reason="call recorded", details=details):  # fmt: skip
                acknowledged_audit.append(call_id)

        async def worker(n: int) -> None:
            while not stop.is_set():
                await one_call(n)

        with capture_logs() as logs:
            workers = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
            await asyncio.wait_for(until_acknowledged(BEFORE_KILL), timeout=60)
            head = await asyncio.to_thread(audit.sign_head, signer)
            await asyncio.to_thread(pg.kill_primary)
            killed_at = len(acknowledged_calls)

            # Between the kill and the promotion no server takes writes: a direct write gets the project's error,
            # naming the database without its password and without a library traceback, and stores nothing.
            refused_id = str(uuid.uuid4())
            with pytest.raises(db.DatabaseUnavailable) as refused:
                repo.start(call_id=refused_id, node="A", transport="ari", channel_id="ch-refused",
                           channel_name="PJSIP/patients-x", flow="main", flow_version="v1",
                           started_at=datetime.now(UTC))  # fmt: skip
            assert "recording call" in str(refused.value)
            assert refused.value.__cause__ is None
            assert refused.value.__suppress_context__

            await asyncio.sleep(0.5)  # the writers meet the dead primary and the standby still in recovery
            await asyncio.to_thread(pg.promote_standby)
            promoted_at = len(acknowledged_calls)
            await asyncio.wait_for(until_acknowledged(promoted_at + AFTER_PROMOTION), timeout=60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=60)

        events = [entry["event"] for entry in logs]
        assert "call.record_failed" not in events, [e for e in logs if e["event"] == "call.record_failed"]
        # The stream did meet the failover: writes were cut off and retried, not merely paused around it.
        assert "call.record_retry" in events
        assert killed_at >= BEFORE_KILL

        engine.dispose()
        standby = db.make_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{pg.standby.port}/{pg.database}?target_session_attrs=read-write"
        )
        try:
            with standby.connect() as connection:
                calls = {row.id: row.outcome for row in connection.execute(select(Call.id, Call.outcome))}
                counted = select(CallStep.call_id, func.count().label("n")).group_by(CallStep.call_id)
                steps = {row.call_id: row.n for row in connection.execute(counted)}
                audited = connection.execute(select(audit_entries.c.details)).scalars().all()
            assert refused_id not in calls
            missing = [call_id for call_id in acknowledged_calls if call_id not in calls]
            assert not missing, f"{len(missing)} acknowledged calls lost in the failover"
            assert all(calls[call_id] == "completed" for call_id in acknowledged_calls)
            assert all(steps.get(call_id) == 1 for call_id in acknowledged_calls), "a step lost or written twice"
            in_log = {json.loads(details)["call"] for details in audited}
            assert set(acknowledged_audit) <= in_log
            assert len(acknowledged_audit) == len(acknowledged_calls)
            report = verify(SqlAuditStore(standby), signer.public_key, trusted_head=head)
            assert report.ok, report.summary()
            assert report.size >= len(acknowledged_audit)
        finally:
            standby.dispose()
