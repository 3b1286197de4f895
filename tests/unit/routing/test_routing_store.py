"""AgentStore on SQLite and PostgreSQL: agents, credentials, snapshot, reservation, ring history, errors;
and the credential validity report built on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, event, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compliance.accounts import AccountError, AccountStore
from ground import db
from ground.db_at_once import make_at_once_writer
from routing.model import Credential
from routing.store import _RING, AgentError, AgentStore, AgentView, CredentialRecord, _reservation
from routing.tables import AgentRow, AgentSkill, CredentialRow
from routing.validity import credential_state, validity_report
from tests.sql_capture import sent_by_sqlalchemy

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)
PHYSICIAN = [["physician_license"]]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        database = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    else:
        database = str(request.getfixturevalue("postgres_url"))
    db.upgrade(database)
    return database


@dataclass
class Stores:
    engine: Engine
    accounts: AccountStore
    agents: AgentStore

    def agent(
        self,
        account_id: str,
        *roles: str,
        endpoint: str | None = None,
        skills: dict[str, int] | None = None,
        languages: tuple[str, ...] = ("zh",),
    ) -> AgentView:
        self.accounts.add(account_id, f"Staff {account_id}", roles or ("agent",), T0 - YEAR)
        return self.agents.add_agent(account_id, endpoint or account_id, T0 - YEAR, skills=skills, languages=languages)

    def licence(
        self,
        account_id: str,
        kind: str = "physician_license",
        *,
        valid_from: datetime = T0 - YEAR,
        valid_until: datetime = T0 + YEAR,
        verified: datetime | None = T0 - YEAR,
    ) -> int:
        credential_id = self.agents.add_credential(
            account_id,
            kind,
            f"{kind[:3].upper()}-{account_id}",
            "Health Commission",
            valid_from,
            valid_until,
            T0 - YEAR,
        )
        if verified is not None:
            self.agents.verify_credential(credential_id, "verifier", verified)
        return credential_id


@pytest.fixture
def stores(url: str) -> Iterator[Stores]:
    engine = db.make_engine(url)
    result = Stores(engine, AccountStore.for_engine(engine), AgentStore.for_engine(engine))
    result.accounts.add("verifier", "Medical Affairs", ["admin"], T0 - 2 * YEAR)
    try:
        yield result
    finally:
        engine.dispose()


def _count_rows(engine: Engine, model: type[AgentRow] | type[AgentSkill] | type[CredentialRow]) -> int:
    with Session(engine) as session:
        return len(session.scalars(select(model)).all())


# --- schema ------------------------------------------------------------------------------------------------------


def test_migration_creates_the_routing_tables_and_downgrades_cleanly(url: str) -> None:
    engine = db.make_engine(url)
    try:
        inspector = inspect(engine)
        assert {"agents", "agent_skills", "credentials", "agent_rings"} <= set(inspector.get_table_names())
        assert {c["name"] for c in inspector.get_columns("agents")} == {
            "account_id", "endpoint", "contact", "languages", "paused_reason", "paused_at", "reserved_call_id",
            "reserved_by", "reserved_at", "offline_reason", "offline_since", "created_at", "updated_at",
        }  # fmt: skip
        assert "ix_agents_reserved_call_id" in {i["name"] for i in inspector.get_indexes("agents")}
        assert "ix_agent_rings_call_id" in {i["name"] for i in inspector.get_indexes("agent_rings")}
        assert [fk["referred_table"] for fk in inspector.get_foreign_keys("agents")] == ["accounts"]
        checks = {c["name"] for c in inspector.get_check_constraints("credentials")}
        assert {"ck_credentials_validity_order", "ck_credentials_status"} <= checks
    finally:
        engine.dispose()
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            config = db._alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0004_accounts")
    finally:
        engine.dispose()
    engine = db.make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert not tables & {"agents", "agent_skills", "credentials", "agent_rings"}
        assert "accounts" in tables
    finally:
        engine.dispose()
    db.upgrade(url)
    db.ensure_current(url)


def test_the_database_refuses_inconsistent_rows(stores: Stores) -> None:
    stores.agent("a1")
    cases = [
        "UPDATE agent_skills SET proficiency = 6",
        "UPDATE agents SET reserved_call_id = 'c1'",  # without reserved_by / reserved_at
        "UPDATE credentials SET status = 'suspended'",
        "UPDATE credentials SET valid_until = valid_from",
    ]
    stores.agents.set_skills("a1", {"triage": 3}, T0)
    stores.licence("a1")
    for statement in cases:
        with pytest.raises(IntegrityError), stores.engine.begin() as connection:
            connection.exec_driver_sql(statement)
    view = stores.agents.view("a1")
    assert dict(view.agent.skills) == {"triage": 3}
    assert view.reserved_call_id is None


# --- agents and the snapshot -------------------------------------------------------------------------------------


def test_add_agents_and_read_the_snapshot(stores: Stores) -> None:
    stores.accounts.add("phys1", "Dr Wang", ["physician"], T0, departments=["cardiology"])
    view = stores.agents.add_agent(
        "phys1",
        "phys1",
        T0,
        contact="sip:phys1@127.0.0.1:5071",
        languages=["zh", "en", "zh"],
        skills={"cardiology": 4, "emergency_triage": 3},
    )
    assert view.agent.id == "phys1"
    assert view.agent.endpoint == "phys1"
    assert view.agent.roles == frozenset({"physician"})
    assert dict(view.agent.skills) == {"cardiology": 4, "emergency_triage": 3}
    assert view.contact == "sip:phys1@127.0.0.1:5071"
    assert view.languages == ("zh", "en")
    assert view.departments == frozenset({"cardiology"})
    assert view.display_name == "Dr Wang"
    assert (view.paused_reason, view.reserved_call_id, view.reserved_by) == (None, None, None)
    assert view.state == "ready"

    stores.agent("nurse1", "nurse", languages=("zh",))
    stores.agent("gen1")
    valid = stores.licence("phys1")
    unverified = stores.licence("phys1", "vaccination_training", verified=None)
    revoked = stores.licence("nurse1", "nurse_license")
    stores.agents.revoke_credential(revoked, "licence withdrawn by the board", T0)
    stores.accounts.freeze("gen1", "left the hospital", T0)

    snapshot = {v.agent.id: v for v in stores.agents.routing_snapshot()}
    assert list(snapshot) == ["gen1", "nurse1", "phys1"]
    phys = snapshot["phys1"]
    # Every credential is in the snapshot; validity is the router's decision (Credential.is_valid).
    assert [(c.kind, c.verified_at is not None, c.status) for c in phys.agent.credentials] == [
        ("physician_license", True, "active"),
        ("vaccination_training", False, "active"),
    ]
    assert phys.agent.valid_credential_kinds(T0) == frozenset({"physician_license"})
    assert phys.agent.credentials[0].valid_until == T0 + YEAR
    assert phys.agent.credentials[0].valid_until.tzinfo is not None
    assert snapshot["nurse1"].agent.credentials[0].status == "revoked"
    assert snapshot["nurse1"].agent.valid_credential_kinds(T0) == frozenset()
    assert snapshot["gen1"].agent.frozen is True
    assert snapshot["gen1"].state == "frozen"
    assert snapshot["nurse1"].agent.skills == {}
    assert [c.id for c in stores.agents.credentials("phys1")] == [valid, unverified]
    assert stores.agents.view("phys1") == phys


def test_the_snapshot_takes_three_queries_whatever_the_number_of_agents(stores: Stores) -> None:
    for n in range(12):
        stores.agent(f"agent{n:02d}", skills={"general": 1 + n % 5})
        stores.licence(f"agent{n:02d}", "nurse_license")
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(stores.engine, "before_cursor_execute", count)
    try:
        snapshot = stores.agents.routing_snapshot()
    finally:
        event.remove(stores.engine, "before_cursor_execute", count)
    assert len(snapshot) == 12
    assert all(len(v.agent.credentials) == 1 for v in snapshot)
    assert len(statements) == 3, statements


def test_set_skills_replaces_them_and_pause_unpause(stores: Stores) -> None:
    stores.agent("a1", skills={"cardiology": 2, "pharmacology": 5})
    view = stores.agents.set_skills("a1", {"cardiology": 5, "vaccination": 1}, T0)
    assert dict(view.agent.skills) == {"cardiology": 5, "vaccination": 1}
    assert dict(stores.agents.set_skills("a1", {}, T0).agent.skills) == {}

    with pytest.raises(AgentError, match="pause reason contains a number") as refused:
        stores.agents.pause("a1", "call back 138-0013-8000", T0)
    assert "138" not in str(refused.value)
    assert stores.agents.view("a1").paused_reason is None
    stores.agents.pause("a1", "  lunch  ", T0)
    assert stores.agents.view("a1").paused_reason == "lunch"
    assert stores.agents.view("a1").state == "paused"
    stores.agents.unpause("a1", at(60))
    stores.agents.unpause("a1", at(61))  # unpausing an agent who is not paused is harmless
    assert stores.agents.view("a1").state == "ready"


# --- reservation ---------------------------------------------------------------------------------------------------


def test_reserve_and_release(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    stores.licence("phys1")
    assert stores.agents.reserve("phys1", "call-1", "node1", T0, PHYSICIAN) is True
    view = stores.agents.view("phys1")
    assert (view.reserved_call_id, view.reserved_by, view.state) == ("call-1", "node1", "reserved")
    # Held: neither another call, nor another node, nor the same call again gets the agent.
    assert stores.agents.reserve("phys1", "call-2", "node1", at(1), PHYSICIAN) is False
    assert stores.agents.reserve("phys1", "call-2", "node2", at(1)) is False
    assert stores.agents.reserve("phys1", "call-1", "node1", at(1)) is False
    # Only the holding call releases.
    assert stores.agents.release("phys1", "call-2") is False
    assert stores.agents.view("phys1").reserved_call_id == "call-1"
    assert stores.agents.release("phys1", "call-1") is True
    assert stores.agents.release("phys1", "call-1") is False
    assert stores.agents.view("phys1").state == "ready"
    assert stores.agents.reserve("phys1", "call-2", "node2", at(2), PHYSICIAN) is True
    assert stores.agents.view("phys1").reserved_by == "node2"


def test_reserve_ring_takes_the_agent_and_records_the_ring_together_or_not_at_all(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    stores.licence("phys1")
    stores.agent("gen1")
    ring_id = stores.agents.reserve_ring("phys1", "call-1", "node1", T0, PHYSICIAN)
    assert ring_id is not None
    assert stores.agents.view("phys1").reserved_call_id == "call-1"
    assert [(r.id, r.account_id, r.node, r.outcome) for r in stores.agents.rings("call-1")] == [
        (ring_id, "phys1", "node1", None)
    ]
    # Refused (held already; unqualified): no reservation and no ring row.
    assert stores.agents.reserve_ring("phys1", "call-2", "node1", at(1)) is None
    assert stores.agents.reserve_ring("gen1", "call-2", "node1", at(1), PHYSICIAN) is None
    assert stores.agents.view("gen1").reserved_call_id is None
    assert stores.agents.rings("call-2") == []
    with pytest.raises(AgentError, match="call id"):
        stores.agents.reserve_ring("gen1", "c 1", "node1", T0)


def test_reservations_skip_the_disk_wait_on_sqlite_only_and_the_other_writes_stay_durable(url: str) -> None:
    """On SQLite the reservation's sessions commit with synchronous=NORMAL (1), every other write with FULL (2);
    on PostgreSQL the reservation keeps the durable sessions (docs/decisions.md, "Reservation commits")."""
    durable = db.make_sessionmaker(url)
    reservations = db.make_reservation_sessionmaker(url, durable)
    store = AgentStore(durable, reservations=reservations)
    try:
        if url.startswith("sqlite"):
            assert reservations is not durable
            with durable() as session:
                assert session.execute(text("PRAGMA synchronous")).scalar_one() == 2
            with reservations() as session:
                assert session.execute(text("PRAGMA synchronous")).scalar_one() == 1
                assert session.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
                assert session.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        else:
            assert reservations is durable
        AccountStore(durable).add("phys1", "Staff phys1", ["physician"], T0 - YEAR)
        store.add_agent("phys1", "phys1", T0 - YEAR)
        ring_id = store.reserve_ring("phys1", "call-1", "node1", T0)
        assert ring_id is not None
        # Written through the reservation's sessions, read through the durable ones: the same database.
        assert store.view("phys1").reserved_call_id == "call-1"
        assert [r.id for r in store.rings("call-1")] == [ring_id]
    finally:
        for sessions in {id(durable): durable, id(reservations): reservations}.values():
            bind = sessions.kw["bind"]
            assert isinstance(bind, Engine)
            bind.dispose()


def test_a_reservation_asked_not_to_wait_never_waits_and_writes_nothing_when_it_would(url: str) -> None:
    """``wait=False`` is for the routing engine's event loop: on SQLite it commits at once (no disk, no lock
    wait, no WAL checkpoint); while another writer holds the lock it raises WouldWait having written nothing; on
    PostgreSQL (over the network) it always raises WouldWait, and the engine reserves in a thread instead."""
    durable = db.make_sessionmaker(url)
    at_once = make_at_once_writer(url)
    store = AgentStore(durable, at_once=at_once)
    try:
        AccountStore(durable).add("phys1", "Staff phys1", ["physician"], T0 - YEAR)
        store.add_agent("phys1", "phys1", T0 - YEAR)
        if at_once is None:
            assert not url.startswith("sqlite")
            with pytest.raises(db.WouldWait, match="not a local file"):
                store.reserve_ring("phys1", "call-1", "node1", T0, wait=False)
            assert store.view("phys1").reserved_call_id is None
            return
        # (The writer's own settings: tests/unit/ground/test_db_at_once.py.)
        # Another writer holds the lock (an open write transaction on the durable sessions).
        with durable.begin() as holder:
            holder.execute(text("UPDATE agents SET paused_reason = NULL WHERE account_id = 'nobody'"))
            with pytest.raises(db.WouldWait, match="database is locked"):
                store.reserve_ring("phys1", "call-1", "node1", T0, wait=False)
        assert store.view("phys1").reserved_call_id is None
        assert store.rings("call-1") == []
        ring_id = store.reserve_ring("phys1", "call-1", "node1", T0, wait=False)
        assert ring_id is not None
        assert store.view("phys1").reserved_call_id == "call-1"
        assert [r.id for r in store.rings("call-1")] == [ring_id]
        # The same checks as the waiting reservation: held already, so refused.
        assert store.reserve_ring("phys1", "call-2", "node1", T0, wait=False) is None
    finally:
        bind = durable.kw["bind"]
        assert isinstance(bind, Engine)
        bind.dispose()
        if at_once is not None:
            at_once.close()


@pytest.mark.parametrize(
    ("required", "excluded"),
    [
        ((), ()),
        ([["physician_license"]], ()),
        ([["physician_license", "nurse_license"], ["vaccine_training"]], ()),
        ([["nurse_license"]], ["surge_volunteer", "student"]),
    ],
)
def test_the_reservation_on_the_loop_sends_the_driver_what_sqlalchemy_would(
    tmp_path: Path, required: list[list[str]], excluded: list[str]
) -> None:
    """One definition of what a reservation checks: the statements the at-once writer runs through the driver
    are exactly those SQLAlchemy sends for the waiting reservation (SQL and arguments)."""
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    db.upgrade(url)
    writer = make_at_once_writer(url)
    assert writer is not None
    try:
        statement, parameters = _reservation("phys1", "call-1", "node1", T0, required, excluded=excluded)
        ring = {"agent": "phys1", "call": "call-1", "node": "node1", "at": T0}
        for stmt, params in ((statement, parameters), (_RING, ring)):
            driver = writer.driver_statement(stmt, params)
            assert (driver.sql, driver.bind(params)) == sent_by_sqlalchemy(writer.engine, stmt, params)
    finally:
        writer.close()


def test_release_node_drops_only_that_nodes_reservations(stores: Stores) -> None:
    for name in ("a1", "a2", "a3"):
        stores.agent(name)
    assert stores.agents.reserve("a1", "c1", "node1", T0)
    assert stores.agents.reserve("a2", "c2", "node1", T0)
    assert stores.agents.reserve("a3", "c3", "node2", T0)
    assert stores.agents.release_node("node1") == 2
    assert stores.agents.release_node("node1") == 0
    assert [(v.agent.id, v.reserved_call_id) for v in stores.agents.routing_snapshot()] == [
        ("a1", None),
        ("a2", None),
        ("a3", "c3"),
    ]


def test_each_disqualification_refuses_the_reservation(stores: Stores) -> None:
    stores.agent("frozen", "physician")
    stores.licence("frozen")
    stores.accounts.freeze("frozen", "left the hospital", T0 - DAY)

    stores.agent("paused", "physician")
    stores.licence("paused")
    stores.agents.pause("paused", "no answer", T0 - DAY)

    stores.agent("expired", "physician")
    stores.licence("expired", valid_from=T0 - 2 * YEAR, valid_until=T0 - DAY)

    stores.agent("unverified", "physician")
    stores.licence("unverified", verified=None)

    stores.agent("verified_later", "physician")
    stores.licence("verified_later", verified=T0 + DAY)

    stores.agent("revoked", "physician")
    stores.agents.revoke_credential(stores.licence("revoked"), "suspended by the board", T0 - DAY)

    stores.agent("not_yet", "physician")
    stores.licence("not_yet", valid_from=T0 + DAY, valid_until=T0 + YEAR)

    stores.agent("nurse", "nurse")
    stores.licence("nurse", "nurse_license")

    stores.agent("qualified", "physician")
    stores.licence("qualified")

    refused = ["frozen", "paused", "expired", "unverified", "verified_later", "revoked", "not_yet", "nurse"]
    for name in refused:
        assert stores.agents.reserve(name, f"call-{name}", "node1", T0, PHYSICIAN) is False, name
    assert stores.agents.reserve("qualified", "call-q", "node1", T0, PHYSICIAN) is True
    # A refusal changes nothing.
    assert all(v.reserved_call_id is None for v in stores.agents.routing_snapshot() if v.agent.id != "qualified")
    # No requirement: only frozen and paused agents are refused.
    assert stores.agents.reserve("frozen", "g1", "node1", T0) is False
    assert stores.agents.reserve("paused", "g2", "node1", T0) is False
    assert stores.agents.reserve("expired", "g3", "node1", T0) is True
    # An alternative within a group, and every group must be met.
    assert stores.agents.reserve("nurse", "ar1", "node1", T0, [["physician_license", "nurse_license"]]) is True
    stores.agents.release("nurse", "ar1")
    assert stores.agents.reserve("nurse", "x1", "node1", T0, [["nurse_license"], ["vaccination_training"]]) is False
    stores.licence("nurse", "vaccination_training")
    assert stores.agents.reserve("nurse", "x1", "node1", T0, [["nurse_license"], ["vaccination_training"]]) is True
    assert stores.agents.release("nurse", "x1")
    # Many groups (a statement built on demand rather than prepared): still every group must be met.
    many = [["nurse_license"], ["vaccination_training"], ["nurse_license"], ["vaccination_training"]]
    assert stores.agents.reserve("nurse", "x2", "node1", T0, [*many, ["pharmacist_license"]]) is False
    assert stores.agents.reserve("nurse", "x2", "node1", T0, many) is True
    # An unknown agent is simply not reservable.
    assert stores.agents.reserve("nobody", "c9", "node1", T0) is False


def test_validity_boundaries_are_checked_at_the_given_moment(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    stores.licence("phys1", valid_from=T0, valid_until=T0 + DAY, verified=T0)
    assert stores.agents.reserve("phys1", "c1", "node1", T0, PHYSICIAN) is True  # valid_from <= at
    assert stores.agents.release("phys1", "c1")
    assert stores.agents.reserve("phys1", "c2", "node1", T0 - timedelta(microseconds=1), PHYSICIAN) is False
    assert stores.agents.reserve("phys1", "c3", "node1", T0 + DAY - timedelta(microseconds=1), PHYSICIAN) is True
    assert stores.agents.release("phys1", "c3")
    assert stores.agents.reserve("phys1", "c4", "node1", T0 + DAY, PHYSICIAN) is False  # at < valid_until
    # The same instant given in another time zone is the same instant.
    beijing = timezone(timedelta(hours=8))
    assert stores.agents.reserve("phys1", "c5", "node1", (T0 + DAY).astimezone(beijing), PHYSICIAN) is False


def test_revocation_freeze_and_pause_take_effect_at_the_next_reservation(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    credential = stores.licence("phys1")
    assert stores.agents.reserve("phys1", "c1", "node1", T0, PHYSICIAN)
    assert stores.agents.release("phys1", "c1")
    stores.agents.revoke_credential(credential, "licence suspended", at(1))
    assert stores.agents.reserve("phys1", "c2", "node1", at(2), PHYSICIAN) is False
    stores.licence("phys1")  # renewed and verified
    assert stores.agents.reserve("phys1", "c3", "node1", at(3), PHYSICIAN) is True
    assert stores.agents.release("phys1", "c3")
    stores.accounts.freeze("phys1", "investigation", at(4))
    assert stores.agents.reserve("phys1", "c4", "node1", at(5), PHYSICIAN) is False
    stores.accounts.unfreeze("phys1", at(6))
    assert stores.agents.reserve("phys1", "c5", "node1", at(7), PHYSICIAN) is True


# --- ring history --------------------------------------------------------------------------------------------------


def test_ring_history(stores: Stores) -> None:
    stores.agent("a1")
    stores.agent("a2")
    first = stores.agents.record_ring("call-1", "a1", "node1", at(1))
    second = stores.agents.record_ring("call-1", "a2", "node1", at(20))
    stores.agents.record_ring("call-2", "a2", "node2", at(30))
    stores.agents.finish_ring(first, "no_answer", at(16))
    stores.agents.finish_ring(second, "answered", at(25))
    stores.agents.finish_ring(second, "caller_gone", at(26))  # the first end wins
    rings = stores.agents.rings("call-1")
    assert [(r.id, r.account_id, r.node, r.outcome) for r in rings] == [
        (first, "a1", "node1", "no_answer"),
        (second, "a2", "node1", "answered"),
    ]
    assert rings[1].rung_at == at(20)
    assert rings[1].ended_at == at(25)
    assert stores.agents.rings("no-such-call") == []
    assert stores.agents.ring_counts("a2") == {"answered": 1, "ringing": 1}
    assert stores.agents.abandon_rings("node2", at(40)) == 1
    assert stores.agents.rings("call-2")[0].outcome == "failed"
    assert stores.agents.ring_counts("a2") == {"answered": 1, "failed": 1}


def test_ring_errors(stores: Stores) -> None:
    stores.agent("a1")
    ring = stores.agents.record_ring("call-1", "a1", "node1", at(10))
    with pytest.raises(AgentError, match="no agent 'ghost'"):
        stores.agents.record_ring("call-1", "ghost", "node1", at(10))
    with pytest.raises(AgentError, match="no ring 999"):
        stores.agents.finish_ring(999, "answered", at(11))
    with pytest.raises(AgentError, match="before it rang"):
        stores.agents.finish_ring(ring, "answered", at(5))
    with pytest.raises(AgentError, match="ring outcome 'hung_up'"):
        stores.agents.finish_ring(ring, "hung_up", at(11))  # type: ignore[arg-type]
    with pytest.raises(AgentError, match="call id"):
        stores.agents.record_ring("x" * 37, "a1", "node1", at(10))
    with pytest.raises(AgentError, match="node name"):
        stores.agents.record_ring("call-2", "a1", "node 1", at(10))
    assert [r.outcome for r in stores.agents.rings("call-1")] == [None]


# --- errors: clear, and nothing half-written ------------------------------------------------------------------------


def test_an_agent_needs_an_existing_account(stores: Stores) -> None:
    with pytest.raises(AgentError, match=r"no account 'ghost': create the account first"):
        stores.agents.add_agent("ghost", "ghost", T0)
    assert _count_rows(stores.engine, AgentRow) == 0
    with pytest.raises(AgentError, match="no agent 'ghost'"):
        stores.agents.view("ghost")
    for call in (
        lambda: stores.agents.pause("ghost", "x", T0),
        lambda: stores.agents.unpause("ghost", T0),
        lambda: stores.agents.set_skills("ghost", {"a": 1}, T0),
        lambda: stores.agents.ring_counts("ghost"),
    ):
        with pytest.raises(AgentError, match="no agent 'ghost'"):
            call()
    with pytest.raises(AgentError, match="no account 'ghost'"):
        stores.agents.add_credential("ghost", "physician_license", "N", "I", T0, T0 + YEAR, T0)
    with pytest.raises(AgentError, match="no account 'ghost'"):
        stores.agents.credentials("ghost")


def test_duplicate_endpoint_and_agent_are_refused(stores: Stores) -> None:
    stores.agent("a1", endpoint="desk1", skills={"triage": 2})
    stores.accounts.add("a2", "Staff a2", ["agent"], T0)
    with pytest.raises(AgentError, match="endpoint 'desk1' is already used by agent a1"):
        stores.agents.add_agent("a2", "desk1", T0, skills={"triage": 5})
    with pytest.raises(AgentError, match="agent a1 already exists"):
        stores.agents.add_agent("a1", "desk9", T0)
    assert [v.agent.id for v in stores.agents.routing_snapshot()] == ["a1"]
    assert dict(stores.agents.view("a1").agent.skills) == {"triage": 2}
    assert _count_rows(stores.engine, AgentSkill) == 1
    # Creating account and agent together: a refused agent leaves no account behind.
    with pytest.raises(AgentError, match="endpoint 'desk1' is already used"):
        stores.agents.add_agent_with_account("a3", "Staff a3", ["nurse"], "desk1", T0)
    assert stores.accounts.find("a3") is None
    view = stores.agents.add_agent_with_account("a3", "Staff a3", ["nurse"], "desk3", T0, departments=["er"])
    assert (view.agent.roles, view.departments) == (frozenset({"nurse"}), frozenset({"er"}))
    with pytest.raises(AgentError, match="account a3 already exists"):
        stores.agents.add_agent_with_account("a3", "Staff a3", ["nurse"], "desk4", T0)


@pytest.mark.parametrize(
    ("skills", "message"),
    [
        ({"cardiology": 0}, "skill 'cardiology': proficiency 0 is not a whole number from 1 to 5"),
        ({"cardiology": 6}, "proficiency 6"),
        ({"cardiology": True}, "proficiency True"),
        ({"cardiology": "3"}, "proficiency '3'"),
        ({"Cardiology": 3}, "skill 'Cardiology': use 1-64 of a-z 0-9 _"),
    ],
)
def test_bad_skills_are_refused_and_nothing_is_written(stores: Stores, skills: dict[str, int], message: str) -> None:
    stores.agent("a1", skills={"triage": 2})
    stores.accounts.add("a2", "Staff a2", ["agent"], T0)
    with pytest.raises(AgentError, match=message):
        stores.agents.add_agent("a2", "a2", T0, skills=skills)
    with pytest.raises(AgentError, match=message):
        stores.agents.set_skills("a1", skills, T0)
    assert [v.agent.id for v in stores.agents.routing_snapshot()] == ["a1"]
    assert dict(stores.agents.view("a1").agent.skills) == {"triage": 2}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": "desk 1"}, "endpoint 'desk 1'"),
        ({"endpoint": ""}, "endpoint ''"),
        ({"contact": "http://x"}, "contact 'http://x': expected a SIP URI"),
        ({"contact": "sip:a@10.0.0.5&PJSIP/other"}, "expected a SIP URI"),
        ({"languages": []}, "at least one language"),
        ({"languages": ["Chinese"]}, "language"),
    ],
)
def test_bad_agent_fields_are_refused(stores: Stores, kwargs: dict[str, object], message: str) -> None:
    stores.accounts.add("a1", "Staff a1", ["agent"], T0)
    arguments: dict[str, object] = {"endpoint": "a1", **kwargs}
    endpoint = str(arguments.pop("endpoint"))
    with pytest.raises(AgentError, match=message):
        stores.agents.add_agent("a1", endpoint, T0, **arguments)  # type: ignore[arg-type]
    assert _count_rows(stores.engine, AgentRow) == 0


def test_credential_errors(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    with pytest.raises(AgentError, match=r"valid until .* is not after valid from"):
        stores.agents.add_credential("phys1", "physician_license", "N1", "Board", T0, T0 - DAY, T0)
    with pytest.raises(AgentError, match="is not after"):
        stores.agents.add_credential("phys1", "physician_license", "N1", "Board", T0, T0, T0)
    with pytest.raises(AgentError, match="credential kind 'Physician'"):
        stores.agents.add_credential("phys1", "Physician", "N1", "Board", T0, T0 + YEAR, T0)
    with pytest.raises(AgentError, match="credential number must not be empty"):
        stores.agents.add_credential("phys1", "physician_license", "  ", "Board", T0, T0 + YEAR, T0)
    with pytest.raises(AgentError, match="certificate_sha256"):
        stores.agents.add_credential(
            "phys1", "physician_license", "N1", "Board", T0, T0 + YEAR, T0, certificate_sha256="abc"
        )
    with pytest.raises(AgentError, match="timezone-aware"):
        stores.agents.add_credential("phys1", "physician_license", "N1", "Board", datetime(2026, 1, 1), T0, T0)
    assert _count_rows(stores.engine, CredentialRow) == 0

    digest = "AB" * 32
    credential = stores.agents.add_credential(
        "phys1", "physician_license", "N1", "Board", T0, T0 + YEAR, T0, certificate_sha256=digest
    )
    assert stores.agents.credential(credential).certificate_sha256 == digest.lower()
    with pytest.raises(AgentError, match="cannot verify their own credential"):
        stores.agents.verify_credential(credential, "phys1", T0)
    with pytest.raises(AgentError, match="verifier 'nobody' is not an account"):
        stores.agents.verify_credential(credential, "nobody", T0)
    stores.accounts.add("frozen_admin", "Old admin", ["admin"], T0)
    stores.accounts.freeze("frozen_admin", "left", T0)
    with pytest.raises(AgentError, match="verifier frozen_admin is frozen"):
        stores.agents.verify_credential(credential, "frozen_admin", T0)
    with pytest.raises(AgentError, match="no credential 404"):
        stores.agents.verify_credential(404, "verifier", T0)
    assert stores.agents.credential(credential).verified_at is None

    stores.agents.verify_credential(credential, "verifier", at(10))
    stores.agents.verify_credential(credential, "verifier", at(20))  # re-verification records the new time
    record = stores.agents.credential(credential)
    assert (record.verified_at, record.verified_by) == (at(20), "verifier")

    with pytest.raises(AgentError, match="revocation reason must not be empty"):
        stores.agents.revoke_credential(credential, " ", T0)
    with pytest.raises(AgentError, match="revocation reason contains a number"):
        stores.agents.revoke_credential(credential, "complaint by 13800138000", T0)
    assert stores.agents.credential(credential).status == "active"
    stores.agents.revoke_credential(credential, "board decision", at(30))
    with pytest.raises(AgentError, match="already revoked"):
        stores.agents.revoke_credential(credential, "again", at(31))
    with pytest.raises(AgentError, match="is revoked"):
        stores.agents.verify_credential(credential, "verifier", at(32))
    record = stores.agents.credential(credential)
    assert (record.status, record.revoked_at, record.revoked_reason) == ("revoked", at(30), "board decision")


def test_reserve_input_errors(stores: Stores) -> None:
    stores.agent("a1")
    with pytest.raises(AgentError, match="timezone-aware"):
        stores.agents.reserve("a1", "c1", "node1", datetime(2026, 3, 2, 9))
    with pytest.raises(AgentError, match="empty"):
        stores.agents.reserve("a1", "c1", "node1", T0, [[]])
    with pytest.raises(AgentError, match="node name"):
        stores.agents.reserve("a1", "c1", "", T0)
    with pytest.raises(AgentError, match="call id"):
        stores.agents.reserve("a1", "c 1", "node1", T0)
    assert stores.agents.view("a1").reserved_call_id is None


# --- the validity report -------------------------------------------------------------------------------------------


def test_validity_report_from_the_store_and_from_snapshots(stores: Stores) -> None:
    stores.agent("phys1", "physician")
    stores.agent("nurse1", "nurse")
    stores.agent("pharm1", "pharmacist")
    stores.agent("renewed", "physician")
    ok = stores.licence("phys1")
    expiring = stores.licence("nurse1", "nurse_license", valid_until=T0 + 10 * DAY)
    expired = stores.licence("pharm1", "pharmacist_license", valid_from=T0 - 2 * YEAR, valid_until=T0 - 3 * DAY)
    unverified = stores.licence("phys1", "vaccination_training", verified=None)
    revoked = stores.licence("nurse1", "vaccination_training")
    stores.agents.revoke_credential(revoked, "training withdrawn", T0)
    pending = stores.licence("pharm1", "vaccination_training", valid_from=T0 + 5 * DAY)
    # An expired licence taken over by a verified renewal is not reported.
    stores.licence("renewed", valid_from=T0 - 2 * YEAR, valid_until=T0 - YEAR)
    stores.licence("renewed", valid_from=T0 - YEAR - DAY, valid_until=T0 + 400 * DAY)

    report = validity_report(stores.agents, T0, within_days=30)
    assert [i.credential_id for i in report.expired] == [expired]
    assert [i.credential_id for i in report.expiring] == [expiring]
    assert report.expiring[0].days_left == 10
    assert [i.credential_id for i in report.unverified] == [unverified]
    assert [i.credential_id for i in report.revoked] == [revoked]
    assert [i.credential_id for i in report.not_yet_valid] == [pending]
    assert ok not in {i.credential_id for i in report.issues}
    assert "renewed" not in report.by_agent()
    assert report.needs_attention
    assert (report.agents, report.credentials) == (4, 8)
    assert report.summary().startswith("credentials at 2026-03-02 09:00 UTC: 1 expired, 1 expiring within 30 days")
    assert any("nurse1: #" in line and "expires in 10 day(s)" in line for line in report.lines())

    from_views = validity_report(stores.agents.routing_snapshot(), T0, within_days=30)
    assert [(i.account_id, i.kind, i.problem) for i in from_views.issues] == [
        (i.account_id, i.kind, i.problem) for i in report.issues
    ]
    assert all(i.credential_id is None for i in from_views.issues)
    # With a shorter horizon the nurse's licence is not "expiring" yet.
    assert validity_report(stores.agents.credentials(), T0, within_days=5).expiring == ()


def _record(
    kind: str, valid_from: datetime, valid_until: datetime, verified: datetime | None, n: int
) -> CredentialRecord:
    return CredentialRecord(
        n, "a1", kind, f"N{n}", "Board", valid_from, valid_until, verified, "verifier" if verified else None,
        None, "active", None, None, T0 - YEAR,
    )  # fmt: skip


def test_validity_report_edge_cases() -> None:
    clean = validity_report([_record("nurse_license", T0 - YEAR, T0 + YEAR, T0 - YEAR, 1)], T0)
    assert not clean.needs_attention
    assert clean.issues == ()
    # A renewal that is not verified yet does not hide the expiring licence, and is reported itself.
    report = validity_report(
        [
            _record("nurse_license", T0 - YEAR, T0 + 3 * DAY, T0 - YEAR, 1),
            _record("nurse_license", T0 + 3 * DAY, T0 + 3 * YEAR, None, 2),
        ],
        T0,
    )
    assert [(i.credential_id, i.problem) for i in report.issues] == [(1, "expiring"), (2, "unverified")]
    # A renewal with a gap does not supersede either.
    gap = validity_report(
        [
            _record("nurse_license", T0 - YEAR, T0 + 3 * DAY, T0 - YEAR, 1),
            _record("nurse_license", T0 + 10 * DAY, T0 + 3 * YEAR, T0, 2),
        ],
        T0,
    )
    assert [(i.credential_id, i.problem) for i in gap.issues] == [(1, "expiring"), (2, "not_yet_valid")]
    with pytest.raises(ValueError, match="timezone-aware"):
        validity_report([], datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="negative"):
        validity_report([], T0, within_days=-1)


def test_credential_state_words() -> None:
    def state(**kw: object) -> str:
        values: dict[str, object] = {
            "kind": "k", "number": "n", "valid_from": T0 - YEAR, "valid_until": T0 + YEAR, "verified_at": T0 - YEAR,
            "status": "active", **kw,
        }  # fmt: skip
        return credential_state(Credential(**values), T0)  # type: ignore[arg-type]

    assert state() == "valid"
    assert state(valid_until=T0 + 2 * DAY) == "valid, expires in 2 day(s)"
    assert state(valid_until=T0) == "expired"
    assert state(verified_at=None) == "unverified"
    assert state(status="revoked") == "revoked"
    assert state(valid_from=T0 + DAY) == "not valid yet"


def test_set_contact_moves_the_phone_and_checks_the_uri(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        store = AgentStore.for_engine(engine)
        now = datetime.now(UTC)
        store.add_agent_with_account("desk1", "Desk", ["agent"], "desk1", now, contact="sip:desk1@127.0.0.1:5071")
        assert store.set_contact("desk1", "sip:desk1@127.0.0.1:5099", now).contact == "sip:desk1@127.0.0.1:5099"
        assert store.set_contact("desk1", None, now).contact is None
        with pytest.raises(AgentError, match="expected a SIP URI"):
            store.set_contact("desk1", "sip:x@h;x=1,PJSIP/other", now)
        assert store.view("desk1").contact is None  # nothing half-written
    finally:
        engine.dispose()


def test_an_agent_account_respects_separation_of_duties(tmp_path: Path) -> None:
    """Agents are made through the same account rules as any account: admin never combines with a clinical role."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        store = AgentStore.for_engine(engine)
        with pytest.raises(AccountError, match="role admin cannot be combined with physician"):
            store.add_agent_with_account("doc9", "Doc", ["admin", "physician"], "doc9", datetime.now(UTC))
        assert store.routing_snapshot() == []  # nothing half-written
    finally:
        engine.dispose()
