"""What SQLAlchemy hands the database driver for a statement: to check a path that runs statements through the
driver directly (ground.db_at_once) against SQLAlchemy's own."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable


def sent_by_sqlalchemy(engine: Engine, statement: Executable, parameters: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """The SQL and arguments SQLAlchemy sends for ``statement`` (run in a transaction that is rolled back; whether
    the database accepts it does not matter here)."""
    seen: list[tuple[str, list[Any]]] = []

    def capture(conn: object, cursor: object, sql: str, args: Any, context: object, many: bool) -> None:
        seen.append((sql, list(args)))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as connection:
            with contextlib.suppress(DBAPIError):
                connection.execute(statement, dict(parameters))
            connection.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(seen) == 1, seen
    return seen[0]
