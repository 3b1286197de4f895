"""Database adapter: engines, schema migrations and the calls repository.

Two backends are supported: an embedded SQLite file (one node, the default) and PostgreSQL through psycopg 3
(several nodes sharing one database). SQLAlchemy and driver errors are mapped here, at the adapter edge, to
the project's :class:`DatabaseError`, whose message says which database (password masked) and why, so callers
never handle library exceptions and a password never reaches a log line or a terminal.

Everything here is synchronous; the asyncio service calls it through ``asyncio.to_thread``. Each repository
method is its own short transaction, so a crash in the middle of a call never leaves a half-written row.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Self, cast
from urllib.parse import quote, quote_plus, urlencode

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.orm import Session, sessionmaker

from ground.errors import MedhotlineError
from ground.logs import get_logger
from ground.models import CALL_OUTCOMES, Call, CallOutcome, CallStep, Transport

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS: Final = 5000
POSTGRES_CONNECT_TIMEOUT_S: Final = 10
# Serialises schema upgrades of several nodes starting at once against one PostgreSQL (arbitrary constant).
log = get_logger(__name__)

_PG_MIGRATION_LOCK: Final = 0x6D6564686F746C6E


class DatabaseError(MedhotlineError):
    """The database is unreachable, misconfigured or refused an operation; the message says which and why."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, or the server reached is not (or no longer) a writable primary: a lost
    connection, a primary that died, a standby not yet promoted. Nothing of the failed transaction was stored
    unless its COMMIT itself was cut off; worth retrying once a primary answers again (docs/cluster.md)."""


class WouldWait(DatabaseError):
    """SQLite's lock was held by another writer longer than the connection waits (not at all for a write asked not
    to wait, see ``ground.db_at_once``), or a write asked not to wait has a database over the network.
    Nothing was written; the write can be done again where waiting is harmless."""


class DatabaseNotReady(DatabaseError):
    """The schema is not at the revision this code expects; the message says how to fix it."""


class CallNotFound(DatabaseError):
    """No call with that id is recorded."""


# libpq's multi-host form, ``scheme://[userinfo@]host1[:port1],host2[:port2][/db][?query]``: SQLAlchemy's URL
# parser reads one host and port only, so the host list moves into repeated ``host=`` query parameters, the form
# SQLAlchemy's psycopg dialect turns back into libpq's ``host=h1,h2 port=p1,p2``.
_MULTI_HOST = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^@/]*@)?(?P<hosts>[^@/?]*,[^@/?]*)(?P<rest>.*)$"
)


def normalise_url(url: str) -> str:
    """``url`` with a libpq multi-host list (``h1:p1,h2:p2``) moved to ``?host=h1:p1&host=h2:p2``; other URLs as
    given. A failover URL: ``postgresql+psycopg://u@h1:5432,h2:5432/db?target_session_attrs=read-write``."""
    match = _MULTI_HOST.match(url)
    if match is None:
        return url
    hosts = match["hosts"].split(",")
    if any(not host or host.startswith(":") for host in hosts):
        raise ValueError("a host list needs a host before every comma and port")
    rest = match["rest"]
    path, _, query = rest.partition("?")
    extra = urlencode([("host", host) for host in hosts], safe=":[]")
    return f"{match['scheme']}{match['user'] or ''}{path or '/'}?{extra}{'&' + query if query else ''}"


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``, safe for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Unparseable, so we cannot tell what in it is secret: mask a "user:password@" part if there is one,
        # else show only the scheme.
        masked, count = re.subn(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)
        if count:
            return masked
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url)
        return f"{scheme.group()}... (unparseable, not shown)" if scheme else "(unparseable URL, not shown)"


def _secrets_of(url: str) -> list[str]:
    try:
        password = make_url(normalise_url(url)).password
    except (ArgumentError, ValueError):
        match = re.search(r"//[^/:@]*:([^@/]*)@", url)
        password = match.group(1) if match else None
    if not password:
        return []
    raw = str(password)
    return sorted({raw, quote(raw, safe=""), quote_plus(raw)}, key=len, reverse=True)


def _scrub(message: str, url: str) -> str:
    """Remove the URL's password from a driver message, in case a driver ever echoes it back."""
    for secret in _secrets_of(url):
        message = message.replace(secret, "***")
    return message


def _reason(exc: BaseException) -> str:
    """The driver's own reason, without SQLAlchemy's dump of statement and parameters (may hold call data)."""
    orig = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return "; ".join(lines[:3]) or type(orig).__name__


# SQLSTATE classes of "no usable primary here": connection exceptions (08), the server shutting down or not yet
# accepting (57P01..57P03), and a read-only transaction (25006, a standby reached without read-write targeting).
_UNAVAILABLE_SQLSTATES: Final = ("08", "57P01", "57P02", "57P03", "25006")


def is_unavailable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means no writable PostgreSQL primary answered (retry later), rather than a
    refusal of this statement (never worth retrying)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    # psycopg's failures to connect at all (refused, timed out, target_session_attrs unmet) carry no SQLSTATE;
    # SQLite's OperationalError ("database is locked") is not a failover matter.
    return isinstance(exc, OperationalError) and type(exc.orig).__module__.startswith("psycopg")


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite refused because another connection held its lock past this connection's busy timeout (a
    SQLAlchemy error, or the driver's own from a write made through it directly)."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    # The extended codes (SQLITE_BUSY_SNAPSHOT: a WAL snapshot another writer moved past) keep the primary code
    # in their low byte.
    return (
        isinstance(orig, sqlite3.OperationalError)
        and isinstance(code, int)
        and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    )


def _error_kind(exc: BaseException) -> type[DatabaseError]:
    """Which DatabaseError a driver's error becomes: a failover's, a held SQLite lock's, or any other."""
    if is_unavailable(exc):
        return DatabaseUnavailable
    return WouldWait if is_busy(exc) else DatabaseError


def _mapped(url: str, doing: str, exc: SQLAlchemyError | CommandError | OSError | sqlite3.Error) -> DatabaseError:
    reason = _scrub(_reason(exc), url)
    kind = _error_kind(exc)
    return kind(f"database at {mask_url(url)}: {doing} failed: {reason}")


@contextmanager
def mapped_errors(url: str, doing: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into DatabaseError naming the (masked) database and the reason.

    ``from None``: the chained library exception could repeat the URL; our message already has the reason.
    """
    try:
        yield
    except DatabaseError:
        raise
    except (SQLAlchemyError, CommandError, OSError, sqlite3.Error) as exc:
        raise _mapped(url, doing, exc) from None


def _parse(url: str) -> URL:
    try:
        parsed = make_url(normalise_url(url))
    except (ArgumentError, ValueError):
        raise DatabaseError(f"invalid database URL {mask_url(url)!r}") from None
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    if backend == "sqlite" and driver == "pysqlite":
        return parsed
    if backend == "postgresql":
        if "+" not in parsed.drivername:
            # psycopg 3 is the driver we ship; a bare postgresql:// would pick psycopg2.
            return parsed.set(drivername="postgresql+psycopg")
        if driver == "psycopg":
            return parsed
    raise DatabaseError(
        f"unsupported database URL {mask_url(url)!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # foreign_keys is off by default in SQLite; WAL lets readers run while a writer commits, and
        # busy_timeout makes a concurrent writer wait instead of failing at once with "database is locked".
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")
    finally:
        cursor.close()


def _on_sqlite_connect_unsynced(dbapi_connection: Any, connection_record: Any) -> None:
    _on_sqlite_connect(dbapi_connection, connection_record)
    cursor = dbapi_connection.cursor()
    try:
        # In WAL mode NORMAL skips the fsync at commit: a commit survives a crash of the process (it is in the
        # OS's cache) and the file is never corrupted; only a power cut or an OS crash can lose the last commits
        # made this way, and the next commit on a durable connection (FULL) syncs them with its own.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _on_sqlite_connect_at_once(dbapi_connection: Any, connection_record: Any) -> None:
    _on_sqlite_connect_unsynced(dbapi_connection, connection_record)
    cursor = dbapi_connection.cursor()
    try:
        # Used on the event loop (ground.db_at_once): a writer holding the lock is reported at once
        # (SQLITE_BUSY, the caller does the write in a thread), and a commit here never runs the WAL checkpoint,
        # which copies pages for milliseconds; the service's other connections checkpoint as they commit.
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    finally:
        cursor.close()


def make_engine(url: str, *, durable: bool = True, at_once: bool = False) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL with the settings the service relies on.

    ``durable=False`` (SQLite only; see :func:`make_reservation_sessionmaker`): commits do not wait for the disk.
    ``at_once=True`` (SQLite only; see ``ground.db_at_once``): neither for the disk nor for a lock.

    For SQLite the file's parent directory is created (mode 0700: the database holds call data) if missing.
    No connection is opened here; connection errors surface (as DatabaseError) on first use.
    """
    parsed = _parse(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                with mapped_errors(url, "creating the database directory"):
                    Path(database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            engine = create_engine(parsed)
            if at_once:
                event.listen(engine, "connect", _on_sqlite_connect_at_once)
            else:
                event.listen(engine, "connect", _on_sqlite_connect if durable else _on_sqlite_connect_unsynced)
            return engine
        return create_engine(
            parsed,
            # Nodes hold connections across PostgreSQL restarts and fail-overs: test them before use.
            pool_pre_ping=True,
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        )
    except (ArgumentError, NoSuchModuleError) as exc:
        raise DatabaseError(f"database at {mask_url(url)}: {_scrub(str(exc), url)}") from None


def make_sessionmaker(url: str) -> sessionmaker[Session]:
    """Sessions over a new engine for ``url``; objects stay readable after commit."""
    return sessionmaker(make_engine(url), expire_on_commit=False)


def make_reservation_sessionmaker(url: str, durable: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions for the routing engine's agent reservations, which are on the way to the agent's phone.

    On SQLite, a separate engine whose commits do not wait for the disk (``synchronous=NORMAL`` in WAL mode):
    a reservation lost in a power cut is harmless on a single node, which releases its reservations when it
    starts again. On PostgreSQL ``durable`` itself: there another node could ring an agent whose reservation a
    database crash lost, so the reservation stays a durable commit (docs/decisions.md, "Reservation commits").
    """
    if _parse(url).get_backend_name() != "sqlite":
        return durable
    return sessionmaker(make_engine(url, durable=False), expire_on_commit=False)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    """The newest migration this code knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` in one transaction; a no-op when it is already there.

    On SQLite, foreign keys are not enforced while migrations run and are checked before the end: a batch migration
    rebuilds a table (new table, copy, drop the old, rename), and with enforcement the drop is an implicit DELETE
    that would cascade to every row pointing at the table (every call's steps, notes, records) or fail half-way.
    A rebuild table left by such a failed attempt (``_alembic_tmp_<table>`` beside ``<table>``) is dropped first.
    """
    engine = make_engine(url)
    try:
        with mapped_errors(url, "schema upgrade"), engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                _prepare_sqlite_migration(connection)
            if connection.dialect.name == "postgresql":
                # Held until commit: a second node starting at the same time waits, then finds nothing to do.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config = _alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    tables = sorted({str(row[0]) for row in broken})
                    raise DatabaseError(
                        f"database at {mask_url(url)}: schema upgrade found {len(broken)} rows whose reference is "
                        f"missing (tables {', '.join(tables)}); the upgrade stops here"
                    )
    finally:
        engine.dispose()


def _prepare_sqlite_migration(connection: Connection) -> None:
    """Foreign keys off for this connection (a PRAGMA that only takes effect outside a transaction: it runs before
    the first write opens one), and the rebuild tables of an earlier failed batch migration dropped."""
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    names = set(connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars())
    for name in sorted(names):
        if name.startswith("_alembic_tmp_") and name.removeprefix("_alembic_tmp_") in names:
            log.warning("db.migration_leftover_dropped", table=name)
            connection.exec_driver_sql(f'DROP TABLE "{name}"')


def current_revision(url: str) -> str | None:
    """The schema revision the database is at, or None for a database never migrated."""
    engine = make_engine(url)
    try:
        with mapped_errors(url, "reading the schema revision"), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def ensure_current(url: str) -> None:
    """Refuse to start on a schema that is not at head, rather than fail later in the middle of a call."""
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    where = mask_url(url)
    known = {script.revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseNotReady(
            f"database at {where} is at revision {current}, which this version of medhotline does not know "
            f"(expected {head}): it was upgraded by a newer version"
        )
    raise DatabaseNotReady(
        f"database at {where} is at revision {current or 'none (empty database)'}, expected {head}: "
        "run `medhotline db upgrade`"
    )


@contextmanager
def current_engine(url: str) -> Iterator[Engine]:
    """An engine over a database whose schema is current (else :class:`DatabaseNotReady` saying what to do),
    disposed when the block ends: what a one-shot command needs."""
    ensure_current(url)
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class CallStepRecord:
    seq: int
    flow: str
    node: str
    node_type: str
    edge: str | None
    input: str | None
    at: datetime


@dataclass(frozen=True)
class CallRecord:
    """A snapshot of one row of ``calls``, detached from any session."""

    id: str
    node: str
    transport: str
    channel_id: str
    channel_name: str
    flow: str
    flow_version: str | None
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    outcome: str
    last_step: str | None
    error: str | None
    route_category: str | None = None
    route_priority: str | None = None
    transfer_to: str | None = None
    triage_level: str | None = None
    triage_confidence: float | None = None
    triage_discriminator: str | None = None
    triage_confirm_asked: bool = False
    triage_confirm_answer: str | None = None
    upgraded_at: datetime | None = None
    upgraded_by: str | None = None
    speech_admission: str | None = None

    @classmethod
    def from_row(cls, row: Call) -> CallRecord:
        return cls(
            id=row.id,
            node=row.node,
            transport=row.transport,
            channel_id=row.channel_id,
            channel_name=row.channel_name,
            flow=row.flow,
            flow_version=row.flow_version,
            started_at=row.started_at,
            answered_at=row.answered_at,
            ended_at=row.ended_at,
            outcome=row.outcome,
            last_step=row.last_step,
            error=row.error,
            route_category=row.route_category,
            route_priority=row.route_priority,
            transfer_to=row.transfer_to,
            triage_level=row.triage_level,
            triage_confidence=row.triage_confidence,
            triage_discriminator=row.triage_discriminator,
            triage_confirm_asked=bool(row.triage_confirm_asked),
            triage_confirm_answer=row.triage_confirm_answer,
            upgraded_at=row.upgraded_at,
            upgraded_by=row.upgraded_by,
            speech_admission=row.speech_admission,
        )


TRIAGE_LEVELS: Final = ("emergency", "urgent", "routine")
CONFIRM_ANSWERS: Final = ("key", "speech", "declined", "no_input")
SPEECH_ADMISSIONS: Final = ("admitted", "refused")
_AGENT_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. ``Session.execute`` is typed as returning the generic ``Result``; for a DML
    statement it is a ``CursorResult``, which has the count: one cast here rather than an ignore at every caller."""
    return int(cast("CursorResult[Any]", result).rowcount)


def _same_instant(stored: datetime, given: datetime) -> bool:
    """SQLite hands timestamps back naive (UTC), PostgreSQL aware: compare them as UTC instants."""
    if (stored.tzinfo is None) != (given.tzinfo is None):
        stored, given = stored.replace(tzinfo=None), given.astimezone(UTC).replace(tzinfo=None)
    return stored == given


def _check_final(outcome: str) -> None:
    if outcome not in CALL_OUTCOMES or outcome == "in_progress":
        raise ValueError(f"{outcome!r} is not a final call outcome")


class Repository:
    """Base of every repository (calls, accounts, agents, patients …): each public method is one short
    transaction of its own, and SQLAlchemy errors leave it as :class:`DatabaseError` naming the database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._where = mask_url(bind.url) if isinstance(bind, Engine) else "(unbound)"

    @classmethod
    def for_engine(cls, engine: Engine) -> Self:
        return cls(sessionmaker(engine, expire_on_commit=False))

    @contextmanager
    def _transaction(self, doing: str, sessions: sessionmaker[Session] | None = None) -> Iterator[Session]:
        """One transaction on this repository's sessions, or on ``sessions`` (another engine, same database)."""
        with self._errors(doing), (sessions or self._sessions).begin() as session:
            yield session

    @contextmanager
    def _core_transaction(self, doing: str, sessions: sessionmaker[Session] | None = None) -> Iterator[Connection]:
        """One transaction on a plain connection of the same engine, for Core statements on a hot path (the
        routing reservation): no ORM session is built for it."""
        bind = (sessions or self._sessions).kw.get("bind")
        if not isinstance(bind, Engine):
            raise DatabaseError(f"database at {self._where}: {doing} failed: the sessions are bound to no engine")
        with self._errors(doing), bind.begin() as connection:
            yield connection

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """SQLAlchemy's errors as :class:`DatabaseError` (:class:`DatabaseUnavailable`, :class:`WouldWait`) naming
        the database."""
        try:
            yield
        except DatabaseError:
            raise
        except IntegrityError as exc:
            # A duplicate call id or a value the schema's constraints refuse.
            raise DatabaseError(f"database at {self._where}: {doing} refused: {_reason(exc)}") from None
        except SQLAlchemyError as exc:
            raise _error_kind(exc)(f"database at {self._where}: {doing} failed: {_reason(exc)}") from None


class CallRepository(Repository):
    """Reads and writes ``calls`` and ``call_steps``."""

    def start(
        self,
        *,
        call_id: str,
        node: str,
        transport: Transport,
        channel_id: str,
        channel_name: str,
        flow: str,
        flow_version: str | None,
        started_at: datetime,
    ) -> None:
        """Record a new call, in progress.

        Idempotent for the same call on the same channel: a write retried after its COMMIT was cut off by a
        failover (and had in fact been stored) finds its row and is done; any other duplicate id is refused.
        """
        row = Call(
            id=call_id,
            node=node,
            transport=transport,
            channel_id=channel_id,
            channel_name=channel_name,
            flow=flow,
            flow_version=flow_version,
            started_at=started_at,
            outcome="in_progress",
        )
        try:
            with self._transaction(f"recording call {call_id}") as session:
                session.add(row)
        except DatabaseUnavailable:
            raise
        except DatabaseError:
            stored = self.get(call_id)
            if stored is None or (stored.node, stored.channel_id) != (node, channel_id):
                raise

    def _load(self, session: Session, call_id: str) -> Call:
        row = session.get(Call, call_id)
        if row is None:
            raise CallNotFound(f"no call {call_id} recorded")
        return row

    def mark_answered(self, call_id: str, at: datetime) -> None:
        """Record when the call was answered; the first answer wins if reported twice."""
        with self._transaction(f"marking call {call_id} answered") as session:
            row = self._load(session, call_id)
            if row.answered_at is None:
                row.answered_at = at

    def finish(
        self,
        call_id: str,
        *,
        outcome: CallOutcome,
        ended_at: datetime,
        last_step: str | None = None,
        error: str | None = None,
        route_category: str | None = None,
        route_priority: str | None = None,
        transfer_to: str | None = None,
    ) -> bool:
        """Record how the call ended; returns False (and changes nothing) if it had already ended.

        The first end wins: a hang-up event racing with a lost connection must not overwrite the outcome.
        """
        _check_final(outcome)
        with self._transaction(f"finishing call {call_id}") as session:
            row = self._load(session, call_id)
            if row.outcome != "in_progress":
                return False
            row.outcome = outcome
            row.ended_at = ended_at
            if last_step is not None:
                row.last_step = last_step
            row.error = error
            row.route_category = route_category
            # An agent's upgrade during the conversation stands: the end of the call never makes it normal again.
            row.route_priority = "emergency" if row.upgraded_at is not None else route_priority
            row.transfer_to = transfer_to
            return True

    def close_left_behind(self, node: str, *, started_before: datetime, at: datetime, reason: str) -> int:
        """Close ``node``'s calls still in progress that started before ``started_before`` (an earlier process
        under this node's name died with them): outcome ``node_lost``, ended ``at``, ``reason`` as the error.
        Calls already closed (by a lease takeover, or their own end) are left as they are; returns how many."""
        statement = (
            update(Call)
            .where(Call.node == node, Call.outcome == "in_progress", Call.started_at < started_before)
            .values(outcome="node_lost", ended_at=at, error=reason)
        )
        with self._transaction(f"closing the calls node {node} left in progress") as session:
            return rowcount(session.execute(statement))

    def record_triage(
        self,
        call_id: str,
        *,
        level: str,
        confidence: float,
        discriminator: str,
        confirm_answer: str | None = None,
    ) -> None:
        """What the IVR's classifier made of the caller's words (never the words) and, when the caller was asked
        "是否需要急救", the answer. Written once the IVR is done, before the call waits for an agent."""
        if level not in TRIAGE_LEVELS:
            raise ValueError(f"triage level {level!r} is not one of {', '.join(TRIAGE_LEVELS)}")
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"triage confidence {confidence!r} is outside 0..1")
        if confirm_answer is not None and confirm_answer not in CONFIRM_ANSWERS:
            raise ValueError(f"confirmation answer {confirm_answer!r} is not one of {', '.join(CONFIRM_ANSWERS)}")
        with self._transaction(f"recording the triage of call {call_id}") as session:
            row = self._load(session, call_id)
            row.triage_level = level
            row.triage_confidence = confidence
            row.triage_discriminator = discriminator[:64] or None
            row.triage_confirm_asked = confirm_answer is not None
            row.triage_confirm_answer = confirm_answer

    def record_speech_admission(self, call_id: str, admission: str) -> None:
        """Whether the IVR listened to the caller ("admitted") or, with no recognizer free, gave the key menu at
        once ("refused"). Written once the IVR is done, like the triage."""
        if admission not in SPEECH_ADMISSIONS:
            raise ValueError(f"speech admission {admission!r} is not one of {', '.join(SPEECH_ADMISSIONS)}")
        with self._transaction(f"recording the speech admission of call {call_id}") as session:
            self._load(session, call_id).speech_admission = admission

    def upgrade_to_emergency(self, call_id: str, *, by: str, at: datetime) -> bool:
        """An agent upgraded the call to emergency: the record says so, with who and when, from now on (also
        after the call ends). The classifier's own level is kept beside it: the difference is what evaluating
        triage needs. False (and nothing changed) when the call was upgraded before; the first upgrade stands."""
        if not _AGENT_ID.match(by):
            raise ValueError("the upgrading agent must be an account id (letters, digits, _ . @ -; at most 64)")
        with self._transaction(f"upgrading call {call_id} to emergency") as session:
            row = self._load(session, call_id)
            if row.upgraded_at is not None:
                return False
            row.upgraded_at = at
            row.upgraded_by = by
            row.route_priority = "emergency"
            return True

    def add_step(
        self,
        call_id: str,
        *,
        flow: str,
        node: str,
        node_type: str,
        edge: str | None,
        input: str | None,
        at: datetime,
        moves_last_step: bool = True,
    ) -> None:
        """Append one visited node; the sequence number is the next free one for the call.

        ``moves_last_step`` False for milestones after the IVR (the queue's): ``last_step`` stays the last IVR
        node, where a caller who hung up was in the flow.
        """
        with self._transaction(f"recording a step of call {call_id}") as session:
            # Load the call first: an unknown call is CallNotFound, not a foreign-key failure on the insert.
            row = self._load(session, call_id)
            last = session.scalars(
                select(CallStep).where(CallStep.call_id == call_id).order_by(CallStep.seq.desc()).limit(1)
            ).first()
            same = last is not None and (last.node, last.node_type, last.edge, last.input) == (
                node,
                node_type,
                edge,
                input,
            )
            if same and last is not None and _same_instant(last.at, at):
                return  # this very step, stored by an attempt whose COMMIT a failover cut off: not twice
            if moves_last_step:
                row.last_step = node
            session.add(
                CallStep(
                    call_id=call_id,
                    seq=(last.seq if last is not None else 0) + 1,
                    flow=flow,
                    node=node,
                    node_type=node_type,
                    edge=edge,
                    input=input,
                    at=at,
                )
            )

    def steps(self, call_id: str) -> list[CallStepRecord]:
        with self._transaction(f"reading the path of call {call_id}") as session:
            rows = session.scalars(select(CallStep).where(CallStep.call_id == call_id).order_by(CallStep.seq))
            return [CallStepRecord(r.seq, r.flow, r.node, r.node_type, r.edge, r.input, r.at) for r in rows]

    def refine_routed(
        self, call_id: str, *, outcome: CallOutcome, ended_at: datetime, transfer_to: str | None = None
    ) -> bool:
        """How a call handed to the queue by another session ended (FastAGI IVR, then the ARI queue).

        Only a call whose recorded end is the hand-over itself ("routed") is refined; any other end stands.
        """
        _check_final(outcome)
        with self._transaction(f"refining the end of call {call_id}") as session:
            row = self._load(session, call_id)
            if row.outcome != "routed":
                return False
            row.outcome = outcome
            row.ended_at = ended_at
            if transfer_to is not None:
                row.transfer_to = transfer_to
            return True

    def call_priority(self, call_id: str) -> str | None:
        """How the call was routed (``emergency`` or ``normal``), None if it never reached routing."""
        with self._transaction(f"reading the priority of call {call_id}") as session:
            row = session.get(Call, call_id)
            return row.route_priority if row is not None else None

    def get(self, call_id: str) -> CallRecord | None:
        with self._transaction(f"reading call {call_id}") as session:
            row = session.get(Call, call_id)
            return None if row is None else CallRecord.from_row(row)

    def list_recent(self, limit: int = 50) -> list[CallRecord]:
        """The most recently started calls first."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._transaction("listing recent calls") as session:
            rows = session.scalars(select(Call).order_by(Call.started_at.desc(), Call.id.desc()).limit(limit))
            return [CallRecord.from_row(row) for row in rows]


@contextmanager
def scratch_postgres_database(admin_url: str, prefix: str = "medhotline_scratch") -> Iterator[str]:
    """A new, empty, uniquely named database on the server of ``admin_url``, dropped afterwards (even while
    connections are still open): for tests and benchmarks, never for data anyone keeps."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
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
