"""Callbacks and the hotline's mode in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from compliance.data_keys import DataKeyStore
from ground.models import Base
from routing.callback_store import CallbackError, CallbackStore, ModeStore, SwitchConflict

T0 = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
OUR_TABLES = {"callbacks", "hotline_modes"}


def data_key(engine: Engine) -> int:
    return DataKeyStore.for_engine(engine).add("callbacks", bytes([1]) + b"n" * 12 + b"c" * 52, T0, version=1).id


def add(store: CallbackStore, key: int, bidx: str, *, minutes: int = 0, node: str = "node1") -> tuple[str, bool]:
    callback_id = str(uuid.uuid4())
    stored = store.create(
        callback_id=callback_id,
        call_id=str(uuid.uuid4()),
        node=node,
        category="general",
        priority="normal",
        requested_at=T0 + timedelta(minutes=minutes),
        phone_enc="token-" + callback_id,
        phone_bidx=bidx,
        data_key_id=key,
        patient_id=None,
        at=T0 + timedelta(minutes=minutes, seconds=30),
    )
    return callback_id, stored


def test_migration_matches_the_models(engine: Engine) -> None:
    import routing.callback_tables  # noqa: F401 - the tables on Base.metadata

    def ours(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table in OUR_TABLES

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": ours})
        assert compare_metadata(context, Base.metadata) == []
    indexes = {index["name"]: index for index in inspect(engine).get_indexes("callbacks")}
    assert indexes["uq_callbacks_open_phone"]["unique"]


def test_one_open_callback_per_number_and_a_new_one_once_it_is_done(engine: Engine) -> None:
    store = CallbackStore.for_engine(engine)
    key = data_key(engine)
    first, stored = add(store, key, "a" * 64)
    assert stored
    assert not add(store, key, "a" * 64, minutes=1)[1], "a second callback for the number while one is open"
    assert [c.id for c in store.listing()] == [first]
    # Another number is independent.
    assert add(store, key, "b" * 64, minutes=1)[1]
    # Done (connected): the number may ask again.
    assert store.claim(first, str(uuid.uuid4()), "nurse1", T0)
    assert store.connected(first, T0)
    assert add(store, key, "a" * 64, minutes=5)[1]


def test_the_schema_itself_refuses_a_second_open_callback(engine: Engine) -> None:
    store = CallbackStore.for_engine(engine)
    key = data_key(engine)
    add(store, key, "c" * 64)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO callbacks (id, call_id, node, category, priority, requested_at, phone_enc, phone_bidx, "
                "data_key_id, state, attempts, next_attempt_at, created_at, updated_at) VALUES ('x', 'y', 'n', "
                "'general', 'normal', :t, 'tok', :b, :k, 'dialling', 0, :t, :t, :t)"
            ),
            {"t": T0, "b": "c" * 64, "k": key},
        )


def test_claim_retry_and_give_up(engine: Engine) -> None:
    store = CallbackStore.for_engine(engine)
    key = data_key(engine)
    cb, _ = add(store, key, "d" * 64)
    assert [c.id for c in store.pending("node1")] == [cb]
    assert store.pending("node2") == []
    assert store.claim(cb, "attempt-1", "nurse1", T0)
    assert not store.claim(cb, "attempt-2", "nurse2", T0), "a callback being dialled is not claimed twice"
    assert store.pending("node1") == []
    retry = T0 + timedelta(minutes=2)
    assert store.attempt_failed(cb, "no_answer", retry, T0)
    record = store.get(cb)
    assert (record.state, record.attempts, record.next_attempt_at, record.agent_id) == ("pending", 1, retry, None)
    assert store.claim(cb, "attempt-2", "nurse1", T0)
    assert store.attempt_failed(cb, "busy", None, T0)
    record = store.get(cb)
    assert (record.state, record.attempts, record.last_outcome) == ("failed", 2, "busy")
    assert store.open_for("d" * 64) is None


def test_recover_puts_interrupted_dials_back(engine: Engine) -> None:
    store = CallbackStore.for_engine(engine)
    key = data_key(engine)
    cb, _ = add(store, key, "e" * 64)
    store.claim(cb, "attempt-1", "nurse1", T0)
    assert store.recover("node2", T0) == []
    assert store.recover("node1", T0) == [cb]
    assert store.get(cb).state == "pending"


def test_surge_on_off_restores_exactly_what_was_in_force(engine: Engine) -> None:
    modes = ModeStore.for_engine(engine)
    assert modes.current() is None
    assert modes.current_id() == 0
    with pytest.raises(CallbackError, match="not on"):
        modes.surge_off(actor="ops1", reason="drill over", at=T0)
    on = modes.surge_on(
        profile_name="resp", profile_text="name: resp\n", entry_flow="flow: x\n", actor="ops1", reason="疫情", at=T0
    )
    assert modes.current() == on
    assert on.surge
    assert modes.current_id() == on.id
    with pytest.raises(CallbackError, match="already on"):
        modes.surge_on(profile_name="b", profile_text="t", entry_flow="f", actor="ops1", reason="again", at=T0)
    off = modes.surge_off(actor="ops2", reason="event over", at=T0 + timedelta(hours=1))
    assert off.configuration() == ("normal", None, None, None)
    assert (off.actor, off.reason) == ("ops2", "event over")
    # A second surge after a normal row: switching off restores that normal row's configuration exactly.
    again = modes.surge_on(profile_name="r2", profile_text="p", entry_flow="f", actor="ops1", reason="r", at=T0)
    assert again.previous_id == off.id
    back = modes.surge_off(actor="ops1", reason="over", at=T0)
    assert back.configuration() == off.configuration()
    assert [m.mode for m in modes.history()] == ["surge", "normal", "surge", "normal"]


def test_surge_needs_a_reason_and_nothing_is_written_without_one(engine: Engine) -> None:
    modes = ModeStore.for_engine(engine)
    with pytest.raises(CallbackError, match="reason"):
        modes.surge_on(profile_name="p", profile_text="t", entry_flow="f", actor="ops1", reason="  ", at=T0)
    assert modes.history() == []


def test_two_switches_from_one_state_cannot_both_win(engine: Engine) -> None:
    modes = ModeStore.for_engine(engine)
    on = modes.surge_on(profile_name="p", profile_text="t", entry_flow="f", actor="ops1", reason="r", at=T0)
    # The same transition again, as a second operator racing the first would make it (it read the same state).
    from routing.callback_tables import HotlineModeRow

    with pytest.raises(SwitchConflict):
        modes._insert(HotlineModeRow(mode="normal", replaces=on.previous_id or 0, actor="ops2", reason="r", at=T0))
