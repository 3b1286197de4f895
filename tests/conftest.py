"""Shared fixtures: a fresh PostgreSQL database per test when the test PostgreSQL is available."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

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
    name = f"medhotline_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
