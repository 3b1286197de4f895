"""``his send-test`` (one PDQ query for a test number, answer code and round trip) and ``his replay-outbox``
(failed messages queued again with their bytes and control ids; acknowledged ones left alone), against the
in-process simulated HIS over MLLP on loopback. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from his.audit import Hl7Audit
from his.messages import new_control_id
from his.outbound import Appointment, build_siu
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.send_test import TEST_PHONE, send_test
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY, SYNTHETIC_PATIENTS, SimulatedHis
from his.transport import Backoff, MllpClient
from medhotline.cli import main

FAST = Backoff(initial=0.01, maximum=0.01)
PATIENT = SYNTHETIC_PATIENTS[0]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedHis]:
    his = SimulatedHis()
    await his.start()
    try:
        yield his
    finally:
        await his.aclose()


def config_file(tmp_path: Path, database_url: str, port: int) -> Path:
    config = tmp_path / "medhotline.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n[database]\nurl = "{database_url}"\n'
                      f'[his]\nenabled = true\nport = {port}\nconnect_timeout = 0.5\n', encoding="utf-8")  # fmt: skip
    return config


async def test_send_test_reads_the_answer_and_says_when_there_is_none(sim: SimulatedHis) -> None:
    assert sim.port is not None
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    try:
        nf = await send_test(client, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY)
        found = await send_test(client, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, phone=PATIENT.phone)
    finally:
        await client.aclose()
    assert (nf.ok, nf.code, nf.status, nf.candidates) == (True, "AA", "NF", 0)
    assert nf.seconds > 0
    assert (found.status, found.candidates) == ("OK", 1)
    assert sim.pdq_queries == 2
    assert sim.received == {}  # a query: nothing stored on the HIS's side
    await sim.aclose()
    down = MllpClient("127.0.0.1", sim.port, backoff=FAST, connect_timeout=0.5)
    try:
        gone = await send_test(down, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY)
    finally:
        await down.aclose()
    assert (gone.ok, gone.code) == (False, "-")
    assert gone.error


async def test_cli_send_test_prints_code_and_round_trip_and_audits(
    sim: SimulatedHis, engine: Engine, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sim.port is not None
    config = config_file(tmp_path, database_url, sim.port)
    code = await asyncio.to_thread(main, ["--config", str(config), "his", "send-test"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("HIS: AA NF to MH")
    assert out.rstrip().endswith(" ms")
    assert TEST_PHONE not in out
    with engine.connect() as conn:
        audited = [repr(tuple(r)) for r in conn.execute(text("SELECT * FROM audit_entries"))]
    assert any("QBP^Q22" in row and "send-test" in row for row in audited)
    assert not any(TEST_PHONE in row for row in audited)
    await sim.aclose()
    code = await asyncio.to_thread(main, ["--config", str(config), "his", "send-test"])
    assert code == 1
    assert capsys.readouterr().out.startswith("HIS: no acceptance (")


async def test_replay_outbox_requeues_failed_same_bytes_and_leaves_acknowledged(
    sim: SimulatedHis,
    engine: Engine,
    database_url: str,
    his_keys: KeyServiceClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert sim.port is not None
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    store = OutboxStore.for_engine(engine)
    outbox = Outbox(store, ring, audit=Hl7Audit(audit), node="n1", backoff=FAST, max_attempts=1)
    start = datetime(2026, 12, 10, 1, 0, tzinfo=UTC)
    appointment = Appointment("bk-9", start, start + timedelta(minutes=15), "FLU", "influenza", "clinic-1")
    messages = [build_siu(event, appointment, PATIENT, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=start,
                          control_id=new_control_id()) for event in ("S12", "S13", "S15")]  # fmt: skip
    for m in messages:
        await outbox.enqueue(m)
    refused_1, refused_2, sent = (m.control_id for m in messages)
    sim.refuse("SIU", "AR", "AIS-3", "service not offered", times=2)
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    try:
        kinds = [(await outbox.send_next(client)).kind for _ in range(3)]
    finally:
        await client.aclose()
    assert kinds == ["failed", "failed", "sent"]
    bodies = {e.control_id: e.body_enc for e in store.list()}
    config = config_file(tmp_path, database_url, sim.port)

    def cli(*argv: str) -> tuple[int, str]:
        code = main(["--config", str(config), "his", "replay-outbox", *argv])
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(cli, "--type", "SIU^S13")
    assert code == 0
    assert out.splitlines() == [f"{refused_2}: queued again"]
    code, out = await asyncio.to_thread(cli, "--since", "2999-01-01")
    assert (code, out) == (0, "")
    code, out = await asyncio.to_thread(cli)
    assert f"{refused_1}: queued again" in out
    assert "1 acknowledged (AA) left alone" in out
    assert store.counts() == {"pending": 2, "sent": 1}
    assert {e.control_id: e.body_enc for e in store.list()} == bodies  # same stored bytes
    client = MllpClient("127.0.0.1", sim.port, backoff=FAST)
    try:
        kinds = [(await outbox.send_next(client)).kind for _ in range(3)]
    finally:
        await client.aclose()
    assert kinds == ["sent", "sent", "idle"]
    assert sim.deliveries == [refused_1, refused_2, sent, refused_1, refused_2]
    argv = ["--config", str(config), "his", "replay-outbox", "--since", "yesterday"]
    assert await asyncio.to_thread(main, argv) == 1
    assert "--since 'yesterday': expected an ISO date" in capsys.readouterr().err
