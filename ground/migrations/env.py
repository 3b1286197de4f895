"""Alembic environment, driven programmatically by :func:`ground.db.upgrade`.

There is no ``alembic.ini`` at run time: ``ground.db`` builds the Alembic ``Config`` itself and hands over
an open connection in ``config.attributes["connection"]``, so the same code path serves the CLI, the service
start-up check and the tests, on SQLite and on PostgreSQL. Logging is not configured here (no ``fileConfig``):
the service's own JSON logging already covers Alembic's logger.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from ground.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode makes later migrations portable (copy-and-move tables).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (SQL script) migrations are not supported; use `medhotline db upgrade`")
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise TypeError("run migrations through ground.db.upgrade(), which supplies the connection")
    _run(connection)


_main()
