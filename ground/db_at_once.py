"""Writes made on the event loop, on SQLite, straight through the driver: the agent reservation on a caller's way
to an agent's phone.

The statements stay SQLAlchemy Core (one definition of what a reservation checks, shared with PostgreSQL and the
thread path); each is compiled once for the driver and run on one connection this writer keeps. SQLAlchemy's
execution path (pool checkout, begin, cache lookup, parameter processing, commit, reset on return) cost 0.9 ms of a
reservation made after an idle moment, the driver alone 0.26 ms (docs/performance.md, "Ring latency").

Anything this writer can't do exactly as SQLAlchemy would (a statement it can't compile for the driver, an empty
``IN`` list) raises :class:`~ground.db.WouldWait`: the caller then makes the write in a thread through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from ground.db import WouldWait, make_engine, mapped_errors

# How SQLAlchemy marks an expanding parameter (``IN`` with a list) in a compiled statement, to be rendered with one
# placeholder per item at execution. Not public API: tests/unit/ground/test_db_at_once.py checks that the rendered
# SQL and arguments are exactly what SQLAlchemy sends the driver, so a change in this marker fails there first.
_EXPANDING: Final = "__[POSTCOMPILE_{}]"

Processor = Callable[[Any], Any] | None
_Key = tuple[int, tuple[tuple[str, int], ...]]


@dataclass(frozen=True, slots=True)
class _DriverStatement:
    """A statement as the driver runs it: its SQL (expanding lists rendered for given lengths) and, per
    placeholder, the parameter it takes, how the parameter's type converts it, and whether it is a list."""

    sql: str
    arguments: tuple[tuple[str, Processor, bool], ...]
    fixed: Mapping[str, Any]  # values the statement carries itself (``status = 'active'``)

    def bind(self, parameters: Mapping[str, Any]) -> list[Any]:
        values: list[Any] = []
        for name, processor, expanding in self.arguments:
            value = parameters[name] if name in parameters else self.fixed[name]
            if expanding:
                values.extend(value if processor is None else [processor(item) for item in value])
            else:
                values.append(value if processor is None else processor(value))
        return values


def _compile(statement: ClauseElement, engine: Engine, lengths: Mapping[str, int]) -> _DriverStatement:
    """``statement`` for the driver, with each expanding parameter rendered for ``lengths[name]`` items."""
    dialect = engine.dialect
    compiled = statement.compile(dialect=dialect)
    positions = getattr(compiled, "positiontup", None)
    if not isinstance(compiled, SQLCompiler) or not dialect.positional or positions is None:
        raise WouldWait(f"the {dialect.name} driver's parameters are not positional")
    if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
        # Column defaults SQLAlchemy computes in Python at each execution (``default=...``): not replicated here.
        raise WouldWait("the statement has column defaults computed at execution")
    sql = str(compiled)
    converted: dict[str, tuple[Processor, bool]] = {}  # per parameter: its type's conversion, whether a list
    fixed: dict[str, Any] = {}
    for name in dict.fromkeys(positions):
        bind = compiled.binds[name]
        converted[name] = (bind.type.dialect_impl(dialect).bind_processor(dialect), bool(bind.expanding))
        if bind.callable is not None:
            raise WouldWait(f"parameter {name} takes its value at execution")
        if bind.value is not None:
            fixed[name] = bind.value
        if bind.expanding:
            length = lengths.get(name, 0)
            marker = _EXPANDING.format(name)
            if length < 1 or marker not in sql:
                raise WouldWait(f"list parameter {name} can't be rendered for the driver ({length} items)")
            sql = sql.replace(marker, ", ".join(["?"] * length))
    if "__[POSTCOMPILE_" in sql:
        raise WouldWait("the statement has a parameter rendered at execution that this writer does not know")
    return _DriverStatement(sql, tuple((name, *converted[name]) for name in positions), fixed)


class DriverWrites:
    """The statements of one transaction (``AtOnceWriter.transaction``)."""

    def __init__(self, writer: AtOnceWriter, connection: sqlite3.Connection) -> None:
        self._writer = writer
        self._connection = connection

    def execute(self, statement: ClauseElement, parameters: Mapping[str, Any]) -> sqlite3.Cursor:
        """Run a Core statement with ``parameters`` (by bind name, lists for expanding ones)."""
        driver = self._writer.driver_statement(statement, parameters)
        return self._connection.execute(driver.sql, driver.bind(parameters))


class AtOnceWriter:
    """Transactions that wait neither for the disk nor for another writer's lock, on SQLite, for the event loop.

    One connection (``synchronous=NORMAL``, ``busy_timeout=0``, no WAL checkpoint: ``ground.db.make_engine`` with
    ``at_once=True``) kept open; a transaction meeting another writer's lock raises WouldWait having written
    nothing. Not thread-safe: one event loop uses it.
    """

    def __init__(self, url: str, engine: Engine) -> None:
        self._url = url
        self._engine = engine
        self._held: sqlite3.Connection | None = None
        # Per statement and list lengths: the driver's statement, or why there is none (not tried again).
        self._compiled: dict[_Key, tuple[ClauseElement, _DriverStatement | WouldWait]] = {}

    @property
    def engine(self) -> Engine:
        """The engine whose connection this writer keeps (its settings are the at-once ones)."""
        return self._engine

    def driver_statement(self, statement: ClauseElement, parameters: Mapping[str, Any]) -> _DriverStatement:
        """``statement`` compiled for the driver, once per statement and length of its list parameters."""
        lengths = tuple(
            sorted((name, len(value)) for name, value in parameters.items() if isinstance(value, list | tuple))
        )
        key = (id(statement), lengths)
        cached = self._compiled.get(key)
        if cached is None or cached[0] is not statement:
            try:
                driver: _DriverStatement | WouldWait = _compile(statement, self._engine, dict(lengths))
            except WouldWait as exc:
                driver = exc
            cached = self._compiled[key] = (statement, driver)  # the statement is kept: its id stays its own
        if isinstance(cached[1], WouldWait):
            raise cached[1]
        return cached[1]

    @contextmanager
    def transaction(self, doing: str) -> Iterator[DriverWrites]:
        """One transaction on the kept connection: committed when the block ends, rolled back if it raises.
        The driver's errors become DatabaseError naming the database (WouldWait for another writer's lock)."""
        with mapped_errors(self._url, doing):
            connection = self._connection()
            try:
                yield DriverWrites(self, connection)
                connection.commit()
            except BaseException:
                try:
                    connection.rollback()
                except sqlite3.Error:
                    self._drop()  # a connection that can't roll back is not used again
                raise

    def close(self) -> None:
        self._drop()
        self._engine.dispose()

    def _connection(self) -> sqlite3.Connection:
        if self._held is None:
            pooled = self._engine.raw_connection()  # opened with the engine's settings (its connect event)
            driver = pooled.driver_connection
            if not isinstance(driver, sqlite3.Connection):  # pragma: no cover - make_at_once_writer checked it
                pooled.close()
                raise WouldWait("the at-once engine's connection is not SQLite's")
            pooled.detach()  # ours for good, not the pool's: closed by this writer
            self._held = driver
        return self._held

    def _drop(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()


def make_at_once_writer(url: str) -> AtOnceWriter | None:
    """The writer for writes the routing engine makes on its event loop; None on PostgreSQL, where a server over
    the network is never waited for on the loop (every such write goes to a thread)."""
    engine = make_engine(url, at_once=True)  # connects at first use
    if engine.dialect.name != "sqlite":
        engine.dispose()
        return None
    return AtOnceWriter(url, engine)
