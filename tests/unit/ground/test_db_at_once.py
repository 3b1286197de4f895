"""The at-once writer (ground.db_at_once): Core statements run straight through SQLite's driver, exactly as
SQLAlchemy would run them; errors name the database; a failed transaction writes nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Insert, Update, bindparam, insert, select, text, update

from ground import db
from ground.db_at_once import AtOnceWriter, make_at_once_writer
from ground.models import Call, CallStep
from tests.sql_capture import sent_by_sqlalchemy

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

_CALL = (
    insert(Call)
    .values(
        id=bindparam("id"),
        node="node1",
        transport="ari",
        channel_id=bindparam("id"),
        channel_name="PJSIP/x",
        flow="hotline",
        started_at=bindparam("at", type_=Call.started_at.type),
        outcome="in_progress",
        triage_confirm_asked=False,
    )
    .returning(Call.id)
)
_OUTCOME = (
    update(Call)
    .where(
        Call.id.in_(bindparam("ids", expanding=True)), Call.outcome == "in_progress", Call.started_at <= bindparam("at")
    )
    .values(outcome=bindparam("outcome"), ended_at=bindparam("at"))
)
_STEP = insert(CallStep).values(
    call_id=bindparam("call"), seq=1, flow="hotline", node="n", node_type="menu", at=bindparam("at")
)


@pytest.fixture
def url(tmp_path: Path) -> str:
    database = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    db.upgrade(database)
    return database


@pytest.fixture
def writer(url: str) -> Iterator[AtOnceWriter]:
    made = make_at_once_writer(url)
    assert made is not None
    yield made
    made.close()


@pytest.mark.parametrize(
    ("statement", "parameters"),
    [
        (_CALL, {"id": "call-1", "at": T0}),
        (_OUTCOME, {"ids": ["call-1"], "outcome": "completed", "at": T0}),
        (_OUTCOME, {"ids": ["call-1", "call-2", "call-3"], "outcome": "abandoned", "at": T0}),
    ],
)
def test_the_driver_gets_exactly_what_sqlalchemy_would_send(
    writer: AtOnceWriter, statement: Insert | Update, parameters: dict[str, Any]
) -> None:
    """The SQL and the arguments, list parameters expanded and types converted (a datetime as SQLite stores it):
    this is also what fails first if SQLAlchemy ever changes how it marks a list parameter."""
    driver = writer.driver_statement(statement, parameters)
    assert (driver.sql, driver.bind(parameters)) == sent_by_sqlalchemy(writer.engine, statement, parameters)


def test_a_statement_is_compiled_once_per_list_length(writer: AtOnceWriter) -> None:
    one = writer.driver_statement(_OUTCOME, {"ids": ["a"], "outcome": "x", "at": T0})
    assert writer.driver_statement(_OUTCOME, {"ids": ["b"], "outcome": "y", "at": T0}) is one
    three = writer.driver_statement(_OUTCOME, {"ids": ["a", "b", "c"], "outcome": "x", "at": T0})
    assert three is not one
    assert three.sql.count("?") == one.sql.count("?") + 2


def test_writes_commit_and_read_back_through_sqlalchemy(url: str, writer: AtOnceWriter) -> None:
    with writer.transaction("starting two calls") as writes:
        assert writes.execute(_CALL, {"id": "call-1", "at": T0}).fetchone() == ("call-1",)
        writes.execute(_CALL, {"id": "call-2", "at": T0})
    with writer.transaction("ending them") as writes:
        ended = writes.execute(_OUTCOME, {"ids": ["call-1", "call-2", "nobody"], "outcome": "completed", "at": T0})
        assert ended.rowcount == 2
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Call.id, Call.outcome, Call.ended_at).order_by(Call.id)).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [("call-1", "completed", T0), ("call-2", "completed", T0)]


def test_the_connection_waits_neither_for_the_disk_nor_for_a_lock(writer: AtOnceWriter) -> None:
    with writer.transaction("reading its settings") as writes:
        settings = {
            pragma: writes.execute(text(f"PRAGMA {pragma}"), {}).fetchone()
            for pragma in ("busy_timeout", "wal_autocheckpoint", "synchronous", "foreign_keys", "journal_mode")
        }
    assert settings == {
        "busy_timeout": (0,),
        "wal_autocheckpoint": (0,),
        "synchronous": (1,),  # NORMAL
        "foreign_keys": (1,),
        "journal_mode": ("wal",),
    }


def test_another_writers_lock_is_would_wait_and_nothing_is_written(url: str, writer: AtOnceWriter) -> None:
    holder = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        holder.execute("BEGIN IMMEDIATE")
        locked = r"database at .*medhotline\.db: starting a call failed: database is locked"
        with pytest.raises(db.WouldWait, match=locked), writer.transaction("starting a call") as writes:
            writes.execute(_CALL, {"id": "call-1", "at": T0})
        holder.rollback()
    finally:
        holder.close()
    with writer.transaction("starting it again") as writes:
        writes.execute(_CALL, {"id": "call-1", "at": T0})
        assert writes.execute(text("SELECT count(*) FROM calls"), {}).fetchone() == (1,)


def test_a_refused_statement_rolls_back_the_whole_transaction_and_names_the_database(
    url: str, writer: AtOnceWriter
) -> None:
    refused = r"database at .*medhotline\.db: recording a step failed: FOREIGN KEY"
    # One transaction, two writes: the second is refused, so the first is not kept either.
    with pytest.raises(db.DatabaseError, match=refused), writer.transaction("recording a step") as writes:  # noqa: PT012
        writes.execute(_CALL, {"id": "call-1", "at": T0})
        writes.execute(_STEP, {"call": "no-such-call", "at": T0})
    with writer.transaction("counting") as writes:
        assert writes.execute(text("SELECT count(*) FROM calls"), {}).fetchone() == (0,)


def test_what_the_driver_cannot_run_exactly_is_left_to_sqlalchemy(writer: AtOnceWriter) -> None:
    """An empty list (SQLAlchemy renders a special empty IN) or a column default computed in Python: WouldWait,
    nothing written; the caller makes the write through SQLAlchemy instead. A parameter left out is a KeyError, as
    a programming error."""
    for _ in range(2):  # the second time from the cache of what could not be compiled
        with pytest.raises(db.WouldWait, match="list parameter ids"), writer.transaction("ending no calls") as writes:
            writes.execute(_OUTCOME, {"ids": [], "outcome": "completed", "at": T0})
    without_outcome = insert(Call).values(
        id="call-1", node="n", transport="ari", channel_id="c", channel_name="x", flow="f", started_at=T0
    )  # calls.outcome has a Python-side default, which SQLAlchemy computes as it executes
    with pytest.raises(db.WouldWait, match="column defaults"), writer.transaction("starting a call") as writes:
        writes.execute(without_outcome, {})
    with pytest.raises(KeyError), writer.transaction("starting a call without its time") as writes:
        writes.execute(_CALL, {"id": "call-1"})


def test_postgresql_has_no_at_once_writer() -> None:
    assert make_at_once_writer("postgresql+psycopg://medhotline@db.invalid/medhotline") is None


def test_an_unopenable_database_is_a_database_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "medhotline.db").mkdir()  # a directory where the file should be
    writer = make_at_once_writer(f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}")
    assert writer is not None
    try:
        failed = r"database at .*medhotline\.db: starting a call failed"
        with pytest.raises(db.DatabaseError, match=failed), writer.transaction("starting a call") as writes:
            writes.execute(_CALL, {"id": "call-1", "at": T0})
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("code", "busy"),
    [
        (sqlite3.SQLITE_BUSY, True),
        (517, True),
        (sqlite3.SQLITE_LOCKED, True),
        (262, True),
        (sqlite3.SQLITE_IOERR, False),
    ],
)
def test_the_extended_busy_codes_are_another_writers_lock(code: int, busy: bool) -> None:
    """SQLITE_BUSY_SNAPSHOT (517) and SQLITE_LOCKED_SHAREDCACHE (262) keep the primary code in their low byte."""
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = code
    assert db.is_busy(error) is busy
