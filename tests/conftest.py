"""Shared fixtures: a fresh PostgreSQL database per test when the test PostgreSQL is available."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ground import db
from ground.db import scratch_postgres_database

POSTGRES_ENV = "MEDHOTLINE_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty, uniquely named database, dropped after the test.

    ``MEDHOTLINE_TEST_POSTGRES_URL`` points at an admin database (``postgresql+psycopg://postgres@host:port/
    postgres``). Without it the test is skipped on a developer machine but fails in CI: a CI run that silently
    skipped every PostgreSQL test would claim a coverage it does not have.
    """
    admin_url = os.environ.get(POSTGRES_ENV, "")
    if not admin_url:
        if _in_ci():
            pytest.fail(f"{POSTGRES_ENV} is not set but CI is: PostgreSQL tests must run in CI, not be skipped")
        pytest.skip(f"{POSTGRES_ENV} is not set (scripts/test starts a PostgreSQL and sets it)")
    with scratch_postgres_database(admin_url, "medhotline_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database, once as a SQLite file and once on the test PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    db.upgrade(url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


# Identifiers of the made-up patients and callers the tests use (tests/unit/test_his_registry.py's patients, the
# integration tests' and the demo's caller). Whatever the system writes (databases, logs) must never hold them.
PATIENT_IDENTIFIERS = (
    "王秀英",
    "李建国",
    "李小雨",
    "赵敏",
    "13800138000",
    "138-0013-8000",
    "13912345678",
    "02165432109",
    "021-6543-2109",
    "110105194912310021",
    "310104198002023456",
    "A12345678",
    "MRN-2024-000417",
    "MRN-2024-000988",
)
# What the system writes: database files and their journals, and logs. Test inputs (e.g. a JSON file fed to a
# CLI command on purpose) are not the system's writing and are not scanned.
_WRITTEN = (".db", ".db-wal", ".db-shm", ".db-journal", ".jsonl", ".log", ".stdout", ".out")


def identifiers_in(path: Path) -> list[str]:
    data = path.read_bytes()
    return [value for value in PATIENT_IDENTIFIERS if value.encode("utf-8") in data]


@pytest.fixture(scope="session", autouse=True)
def no_patient_identifier_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session: scan every database and log the tests made the system write."""
    yield
    base = tmp_path_factory.getbasetemp()
    leaks = {
        str(path.relative_to(base)): found
        for path in sorted(base.rglob("*"))
        if path.is_file() and path.name.endswith(_WRITTEN) and (found := identifiers_in(path))
    }
    assert not leaks, f"patient identifiers in clear in files the system wrote: {leaks}"
