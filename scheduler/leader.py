"""One active scheduler per cluster: whoever holds the leader lock runs the jobs and the dialer.

On PostgreSQL (several nodes) the lock is a session-level advisory lock held on a connection of its own: it is
released by the database the moment that connection dies, so when the leader's process or host dies another
node's next ``try_acquire`` (every few seconds) takes over. The leader checks its connection on every beat
(``held``): a leader that lost its connection stops scheduling at once, before another can start, so two never
schedule together for long — and the rounds' unique ids make even that overlap harmless.

On SQLite (one host) the lock is an exclusive ``flock`` on a file beside the database, which the kernel releases
when the process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final, Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from ground.logs import get_logger

log = get_logger(__name__)

# The advisory lock's key: a fixed 64-bit number that names "the medhotline scheduler" in this database.
ADVISORY_KEY: Final = 0x6D6564686F746C31  # "medhotl1"


class LeaderLock(Protocol):
    def try_acquire(self) -> bool: ...

    def held(self) -> bool: ...

    def release(self) -> None: ...


class PostgresLeaderLock:
    def __init__(self, engine: Engine, key: int = ADVISORY_KEY) -> None:
        self._engine = engine
        self._key = key
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self.held():
            return True
        self._drop()
        try:
            conn = self._engine.connect()
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar())
            conn.commit()
        except SQLAlchemyError as exc:
            log.warning("scheduler.leader_lock_unavailable", error=type(exc).__name__)
            return False
        if got:
            self._conn = conn
            log.info("scheduler.leader_acquired", lock="postgres-advisory")
        else:
            conn.close()
        return got

    def held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
        except SQLAlchemyError:
            log.error("scheduler.leader_lost", reason="the lock's database connection broke")
            self._drop()
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.invalidate()
                self._conn.close()
            self._conn = None


class FileLeaderLock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        log.info("scheduler.leader_acquired", lock="file")
        return True

    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def leader_lock_for(engine: Engine, state_dir: Path) -> LeaderLock:
    if engine.dialect.name == "postgresql":
        return PostgresLeaderLock(engine)
    return FileLeaderLock(state_dir / "scheduler.lock")
