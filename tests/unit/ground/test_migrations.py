"""Schema migrations, the start-up schema check, error mapping and the calls repository, on SQLite and PG."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from ground import db
from ground.db import CallNotFound, CallRepository, DatabaseError, DatabaseNotReady

EXPECTED_COLUMNS = {
    "id",
    "node",
    "transport",
    "channel_id",
    "channel_name",
    "flow",
    "flow_version",
    "started_at",
    "answered_at",
    "ended_at",
    "outcome",
    "last_step",
    "error",
    "route_category",
    "route_priority",
    "transfer_to",
    "triage_level",
    "triage_confidence",
    "triage_discriminator",
    "triage_confirm_asked",
    "triage_confirm_answer",
    "upgraded_at",
    "upgraded_by",
    "speech_admission",
}
STEP_COLUMNS = {"call_id", "seq", "flow", "node", "node_type", "edge", "input", "at"}
T0 = datetime(2024, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"


def _check_schema(url: str) -> None:
    engine = db.make_engine(url)
    try:
        inspector = inspect(engine)
        assert "calls" in inspector.get_table_names()
        assert {column["name"] for column in inspector.get_columns("calls")} == EXPECTED_COLUMNS
        assert {column["name"] for column in inspector.get_columns("call_steps")} == STEP_COLUMNS
        # Patient identifiers are never stored in clear.
        assert not any("caller" in column["name"] for column in inspector.get_columns("calls"))
        assert {index["name"] for index in inspector.get_indexes("calls")} >= {
            "ix_calls_started_at",
            "ix_calls_channel_id",
        }
        nullable = {column["name"]: column["nullable"] for column in inspector.get_columns("calls")}
        assert not nullable["outcome"]
        assert not nullable["started_at"]
        assert nullable["answered_at"]
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    engine = db.make_engine(url)
    try:
        _round_trip_on(CallRepository.for_engine(engine))
    finally:
        engine.dispose()


def _round_trip_on(repo: CallRepository) -> None:
    call_id = str(uuid.uuid4())
    repo.start(
        call_id=call_id,
        node="node1",
        transport="ari",
        channel_id="1732623456.12",
        channel_name="PJSIP/trunk-00000001",
        flow="hotline",
        flow_version="abc123",
        started_at=T0,
    )
    record = repo.get(call_id)
    assert record is not None
    assert record.outcome == "in_progress"
    assert record.started_at == T0
    assert record.started_at.tzinfo is not None
    assert record.answered_at is None

    beijing = timezone(timedelta(hours=8))
    repo.mark_answered(call_id, (T0 + timedelta(seconds=2)).astimezone(beijing))
    repo.mark_answered(call_id, T0 + timedelta(seconds=9))  # the first answer wins
    repo.add_step(call_id, flow="hotline", node="greeting", node_type="play", edge="next", input=None, at=T0)
    repo.add_step(call_id, flow="hotline", node="menu", node_type="menu", edge="press 2", input="2", at=T0)
    assert [(s.seq, s.node, s.edge, s.input) for s in repo.steps(call_id)] == [
        (1, "greeting", "next", None),
        (2, "menu", "press 2", "2"),
    ]
    assert repo.finish(call_id, outcome="caller_hangup", ended_at=T0 + timedelta(seconds=30)) is True
    # A later report of the same end does not overwrite the first.
    assert repo.finish(call_id, outcome="connection_lost", ended_at=T0 + timedelta(seconds=31)) is False

    record = repo.get(call_id)
    assert record is not None
    assert record.answered_at == T0 + timedelta(seconds=2)
    assert record.answered_at is not None
    assert record.answered_at.utcoffset() == timedelta(0)
    assert record.ended_at == T0 + timedelta(seconds=30)
    assert record.outcome == "caller_hangup"
    assert record.last_step == "menu"
    assert record.error is None
    assert record.speech_admission is None  # no listen node with speech reached
    repo.record_speech_admission(call_id, "refused")
    refused = repo.get(call_id)
    assert refused is not None
    assert refused.speech_admission == "refused"
    with pytest.raises(ValueError, match="speech admission 'maybe'"):
        repo.record_speech_admission(call_id, "maybe")
    with pytest.raises(CallNotFound):
        repo.record_speech_admission("no-such-call", "admitted")

    other = str(uuid.uuid4())
    repo.start(
        call_id=other,
        node="node1",
        transport="fastagi",
        channel_id="1732623457.13",
        channel_name="PJSIP/trunk-00000002",
        flow="hotline",
        flow_version=None,
        started_at=T0 + timedelta(minutes=1),
    )
    repo.finish(other, outcome="error", ended_at=T0 + timedelta(minutes=2), last_step="greeting", error="boom")
    assert [r.id for r in repo.list_recent(10)] == [other, call_id]
    assert [r.id for r in repo.list_recent(1)] == [other]
    finished = repo.get(other)
    assert finished is not None
    assert (finished.outcome, finished.last_step, finished.error) == ("error", "greeting", "boom")

    assert repo.get("no-such-call") is None
    with pytest.raises(CallNotFound):
        repo.add_step("no-such-call", flow="hotline", node="menu", node_type="menu", edge=None, input=None, at=T0)
    with pytest.raises(DatabaseError, match="refused"):
        repo.start(
            call_id=call_id,
            node="node1",
            transport="ari",
            channel_id="x",
            channel_name="y",
            flow="hotline",
            flow_version=None,
            started_at=T0,
        )


# --- SQLite ------------------------------------------------------------------------------------------------


def test_upgrade_creates_calls_table(sqlite_url: str, tmp_path: Path) -> None:
    assert db.current_revision(sqlite_url) is None
    db.upgrade(sqlite_url)
    _check_schema(sqlite_url)
    assert db.current_revision(sqlite_url) == db.head_revision()
    db.ensure_current(sqlite_url)
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def test_upgrade_twice_is_a_noop(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    db.upgrade(sqlite_url)
    assert db.current_revision(sqlite_url) == db.head_revision()
    _check_schema(sqlite_url)


def test_upgrade_to_unknown_revision(sqlite_url: str) -> None:
    with pytest.raises(DatabaseError, match="schema upgrade failed"):
        db.upgrade(sqlite_url, "no_such_revision")


def test_sqlite_pragmas(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_ensure_current_on_empty_database(sqlite_url: str) -> None:
    with pytest.raises(DatabaseNotReady) as info:
        db.ensure_current(sqlite_url)
    message = str(info.value)
    assert "run `medhotline db upgrade`" in message
    assert db.head_revision() in message
    assert "medhotline.db" in message


def test_ensure_current_on_unknown_revision(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'from_the_future'")
    finally:
        engine.dispose()
    with pytest.raises(DatabaseNotReady, match=r"from_the_future.*newer version"):
        db.ensure_current(sqlite_url)


def test_round_trip_sqlite(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    _round_trip(sqlite_url)


def test_naive_datetimes_and_bad_outcomes_are_refused(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    sessions = db.make_sessionmaker(sqlite_url)
    repo = CallRepository(sessions)
    with pytest.raises(DatabaseError, match="naive datetime"):
        repo.start(
            call_id="c1",
            node="n",
            transport="ari",
            channel_id="1",
            channel_name="x",
            flow="f",
            flow_version=None,
            started_at=datetime(2024, 1, 1),
        )
    assert repo.get("c1") is None
    with pytest.raises(ValueError, match="not a final call outcome"):
        repo.finish("c1", outcome="in_progress", ended_at=T0)
    with pytest.raises(ValueError, match="at least 1"):
        repo.list_recent(0)
    bind = sessions.kw["bind"]
    bind.dispose()


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://medhotline:s3cr3t-Pa55@127.0.0.1:1/medhotline",
        "postgresql://medhotline:s3cr3t-Pa55@127.0.0.1:1/medhotline",
    ],
)
def test_unreachable_postgres_gives_database_error_without_password(url: str) -> None:
    with pytest.raises(DatabaseError) as info:
        db.current_revision(url)
    message = str(info.value)
    assert "s3cr3t-Pa55" not in message
    assert "***" in message
    assert "127.0.0.1" in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:s3cr3t-Pa55@localhost/x",
        "postgresql+psycopg2://root:s3cr3t-Pa55@localhost/x",
        "not a url s3cr3t-Pa55",
        "postgresql+psycopg://root:s3cr3t-Pa55@localhost:notaport/x",
    ],
)
def test_bad_url_gives_database_error_without_password(url: str) -> None:
    with pytest.raises(DatabaseError) as info:
        db.upgrade(url)
    assert "s3cr3t-Pa55" not in str(info.value)


def test_unwritable_sqlite_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(DatabaseError, match="database directory"):
        db.make_engine(f"sqlite:///{blocker / 'sub' / 'x.db'}")


def test_mask_url() -> None:
    assert db.mask_url("postgresql+psycopg://u:pw@h/d") == "postgresql+psycopg://u:***@h/d"
    assert db.mask_url("sqlite:////var/lib/medhotline/medhotline.db") == "sqlite:////var/lib/medhotline/medhotline.db"


# --- PostgreSQL --------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_upgrade_and_round_trip_postgres(postgres_url: str) -> None:
    with pytest.raises(DatabaseNotReady, match="medhotline db upgrade"):
        db.ensure_current(postgres_url)
    db.upgrade(postgres_url)
    db.upgrade(postgres_url)
    _check_schema(postgres_url)
    assert db.current_revision(postgres_url) == db.head_revision()
    db.ensure_current(postgres_url)
    _round_trip(postgres_url)


def test_the_schema_refuses_a_speech_admission_the_code_does_not_know(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        repo = CallRepository.for_engine(engine)
        repo.start(
            call_id="c1",
            node="n",
            transport="ari",
            channel_id="1",
            channel_name="x",
            flow="f",
            flow_version=None,
            started_at=T0,
        )
        with engine.begin() as connection, pytest.raises(IntegrityError):
            connection.execute(text("UPDATE calls SET speech_admission = 'queued' WHERE id = 'c1'"))
        record = repo.get("c1")
        assert record is not None
        assert record.speech_admission is None  # the refused write changed nothing
    finally:
        engine.dispose()


def test_speech_admission_downgrades_and_upgrades_again(sqlite_url: str) -> None:
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            config = db._alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0012_callbacks_surge")
        assert "speech_admission" not in {c["name"] for c in inspect(engine).get_columns("calls")}
    finally:
        engine.dispose()
    db.upgrade(sqlite_url)
    _check_schema(sqlite_url)


def test_an_sqlite_database_with_calls_upgrades_across_table_rebuilds(sqlite_url: str) -> None:
    # A batch migration rebuilds `calls` on SQLite (new table, copy, drop, rename). With foreign keys enforced the
    # drop is an implicit DELETE: call_steps (ON DELETE CASCADE) would silently lose every step, and a table that
    # restricts made the upgrade fail half-way, leaving `_alembic_tmp_calls` behind (the demo's database did).
    db.upgrade(sqlite_url, "0012_callbacks_surge")
    engine = db.make_engine(sqlite_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO calls (id, node, transport, channel_id, channel_name, flow, started_at, outcome) "
                "VALUES ('c-before', 'n1', 'ari', 'ch1', 'PJSIP/x', 'hotline', '2026-12-01 09:00:00', 'completed')"
            ))  # fmt: skip
            connection.execute(text(
                "INSERT INTO call_steps (call_id, seq, flow, node, node_type, at) "
                "VALUES ('c-before', 1, 'hotline', 'greeting', 'play', '2026-12-01 09:00:01')"
            ))  # fmt: skip
            connection.execute(text("CREATE TABLE _alembic_tmp_calls (id VARCHAR(64))"))  # a failed attempt's
    finally:
        engine.dispose()
    db.upgrade(sqlite_url)
    _check_schema(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM calls")).scalars().all() == ["c-before"]
            assert connection.execute(text("SELECT count(*) FROM call_steps")).scalar() == 1
            assert "_alembic_tmp_calls" not in inspect(connection).get_table_names()
            assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1  # on again for the service
    finally:
        engine.dispose()
