"""What a PostgreSQL failover needs of the database adapter: libpq multi-host URLs, an error that says "no primary
now" apart from a refusal, writes that are idempotent when retried, and the call-record writer's retry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ground import db
from ground.db import CallRepository, DatabaseError, DatabaseUnavailable
from medhotline.call_lifecycle import record_write

FAILOVER_URL = (
    "postgresql+psycopg://u:s3cr3t-Pa55@10.0.0.1:5432,10.0.0.2:5433/medhotline?target_session_attrs=read-write"
)
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def test_a_multi_host_url_becomes_sqlalchemys_host_list() -> None:
    assert db.normalise_url(FAILOVER_URL) == (
        "postgresql+psycopg://u:s3cr3t-Pa55@/medhotline?host=10.0.0.1:5432&host=10.0.0.2:5433"
        "&target_session_attrs=read-write"
    )
    assert db.normalise_url("postgresql+psycopg://u@h1,h2/d") == "postgresql+psycopg://u@/d?host=h1&host=h2"
    single = "postgresql+psycopg://u:pw@h:5432/d?sslmode=verify-full"
    assert db.normalise_url(single) == single
    assert db.normalise_url("sqlite:////var/lib/a,b/medhotline.db") == "sqlite:////var/lib/a,b/medhotline.db"


def test_the_engine_hands_libpq_both_hosts_and_the_read_write_target() -> None:
    engine = db.make_engine(FAILOVER_URL)
    try:
        _, params = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()
    assert params["host"] == "10.0.0.1,10.0.0.2"
    assert params["port"] == "5432,5433"
    assert params["target_session_attrs"] == "read-write"
    assert params["dbname"] == "medhotline"
    assert "s3cr3t-Pa55" not in db.mask_url(FAILOVER_URL)
    assert "10.0.0.2" in db.mask_url(FAILOVER_URL)


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u:s3cr3t-Pa55@,h2/d", "postgresql+psycopg://u:s3cr3t-Pa55@h1,:5/d"]
)
def test_a_broken_host_list_is_refused_without_the_password(url: str) -> None:
    with pytest.raises(DatabaseError, match="invalid database URL") as info:
        db.make_engine(url)
    assert "s3cr3t-Pa55" not in str(info.value)


def test_no_server_answering_is_unavailable_not_a_refusal() -> None:
    # Two loopback ports nothing listens on (port 1 and 2 need root to bind): both hosts tried, both refused.
    url = "postgresql+psycopg://u:s3cr3t-Pa55@127.0.0.1:1,127.0.0.1:2/d?target_session_attrs=read-write"
    with pytest.raises(DatabaseUnavailable) as info:
        db.current_revision(url)
    assert "s3cr3t-Pa55" not in str(info.value)
    assert info.value.__cause__ is None


@pytest.fixture
def repo(tmp_path: Path) -> CallRepository:
    url = f"sqlite:///{tmp_path / 'medhotline.db'}"
    db.upgrade(url)
    return CallRepository.for_engine(db.make_engine(url))


def _start(repo: CallRepository, channel_id: str = "ch-1") -> None:
    repo.start(call_id="c1", node="A", transport="ari", channel_id=channel_id, channel_name="PJSIP/x",
               flow="main", flow_version=None, started_at=T0)  # fmt: skip


def test_a_retried_start_and_step_are_stored_once(repo: CallRepository) -> None:
    # What a retry after a COMMIT cut off by a failover does: the same write again, already stored.
    _start(repo)
    _start(repo)
    for _ in range(2):
        repo.add_step("c1", flow="main", node="menu", node_type="menu", edge=None, input=None, at=T0)
    repo.add_step("c1", flow="main", node="menu", node_type="menu", edge="1", input="1", at=T0)
    assert [(s.seq, s.edge) for s in repo.steps("c1")] == [(1, None), (2, "1")]
    with pytest.raises(DatabaseError, match="refused"):
        _start(repo, channel_id="another channel")  # another call under the same id is still refused


async def test_the_call_writer_retries_while_no_primary_answers() -> None:
    attempts: list[int] = []

    def flaky(fail: int) -> Callable[[], None]:
        def write() -> None:
            attempts.append(1)
            if len(attempts) <= fail:
                raise DatabaseUnavailable("database at postgresql+psycopg://u:***@/d: no primary")

        return write

    with capture_logs() as logs:
        assert await record_write("start", flaky(2))
    assert len(attempts) == 3
    assert [e["event"] for e in logs] == ["call.record_retry", "call.record_retry"]

    attempts.clear()
    with capture_logs() as logs:
        assert not await record_write("start", flaky(100), retry_for=0.5)
    assert logs[-1]["event"] == "call.record_failed"
    assert "exc_info" not in logs[-1]

    def refused() -> None:
        attempts.append(1)
        raise DatabaseError("database at sqlite:///x: recording call c1 refused: UNIQUE constraint failed")

    attempts.clear()
    with capture_logs() as logs:
        assert not await record_write("start", refused)
    assert len(attempts) == 1  # a refusal is not retried
    assert logs[-1]["event"] == "call.record_failed"
