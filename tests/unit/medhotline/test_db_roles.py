"""``medhotline db grant-service-role`` / ``check-service-role`` on a real PostgreSQL, through the real CLI.

The owner migrates and grants; the tests then connect *as the service role* and prove what it can and cannot do:
it appends to the audit trail and writes the business tables, and PostgreSQL's privilege system (not the audit
triggers) refuses UPDATE, DELETE and TRUNCATE on the audit store, disabling or dropping its triggers, dropping its
tables and creating tables. Roles are cluster-wide: every role a test creates is dropped at its end, and the
fixture fails the test if one is left behind.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from compliance.audit import AuditLog, Ed25519Signer, SqlAuditStore, verify
from ground import db
from medhotline.cli import main
from medhotline.db_roles import (
    AUDIT_TABLE_GRANT,
    BUSINESS_TABLE_GRANT,
    Held,
    Relation,
    check_role_name,
    expected_privileges,
    grant_plan,
    privilege_problems,
)
from routing.store import AgentStore

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
AUDIT = frozenset({"audit_entries", "audit_heads"})
PATIENT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
INSUFFICIENT_PRIVILEGE = "42501"


pytestmark = pytest.mark.usefixtures("reset_logging")


def _write_config(tmp_path: Path, url: str | None, name: str = "medhotline.toml") -> Path:
    path = tmp_path / name
    database = f'[database]\nurl = "{url}"\n' if url else ""
    path.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n{database}', encoding="utf-8")
    return path


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> Result:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


# --- roles: created per test, always dropped --------------------------------------------------------------------


@dataclass
class Roles:
    """Creates uniquely named roles for one test; :meth:`drop_all` removes every one (roles are cluster-wide)."""

    database_url: str  # the superuser on this test's database
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    created: list[str] = field(default_factory=list)

    def sql(self, statement: str) -> None:
        """Run one statement as the superuser on this test's database ("someone" changing privileges)."""
        engine = create_engine(self.database_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()

    def create(self, purpose: str, attributes: str = "LOGIN") -> str:
        name = check_role_name(f"mh_test_{purpose}_{uuid.uuid4().hex[:10]}")
        # Registered before it exists: if CREATE half-succeeds, the drop still runs.
        self.created.append(name)
        self.sql(f"CREATE ROLE \"{name}\" {attributes} PASSWORD '{self.password}'")
        return name

    def url_as(self, role: str) -> str:
        url = make_url(self.database_url).set(username=role, password=self.password)
        return url.render_as_string(hide_password=False)

    def direct_grants(self, role: str) -> set[tuple[str, str]]:
        """The privileges on this database's tables and sequences held by ``role`` itself (relation, privilege)."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT c.relname, a.privilege_type FROM pg_class c, aclexplode(c.relacl) a "
                        "WHERE a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :role)"
                    ),
                    {"role": role},
                )
                return {(row.relname, row.privilege_type) for row in rows}
        finally:
            engine.dispose()

    def drop_all(self) -> list[str]:
        """Drop every role created; returns the names still present afterwards (should be none)."""
        engine = create_engine(self.database_url, isolation_level="AUTOCOMMIT")
        errors = []
        try:
            with engine.connect() as connection:
                for name in reversed(self.created):
                    try:
                        exists = connection.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": name})
                        if exists:
                            # An owner owns this test's database and its tables: hand them back first, then drop
                            # the privileges it holds here, then the role itself.
                            connection.execute(text(f'REASSIGN OWNED BY "{name}" TO CURRENT_USER'))
                            connection.execute(text(f'DROP OWNED BY "{name}"'))
                            connection.execute(text(f'DROP ROLE "{name}"'))
                    except DBAPIError as exc:
                        errors.append(f"{name}: {exc.orig}")
                left = connection.scalars(
                    text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": self.created}
                ).all()
        finally:
            engine.dispose()
        return [*left, *errors]


@pytest.fixture
def roles(postgres_url: str) -> Iterator[Roles]:
    # Torn down before postgres_url drops the database: DROP OWNED must run inside it.
    created = Roles(postgres_url)
    try:
        yield created
    finally:
        left = created.drop_all()
    assert not left, f"roles left behind in the cluster: {left}"


@dataclass(frozen=True)
class Deployment:
    roles: Roles
    owner: str
    owner_url: str
    config: Path  # the administrators' configuration: connects as the owner


@pytest.fixture(params=["superuser_owner", "dedicated_owner"])
def deployment(request: pytest.FixtureRequest, roles: Roles, tmp_path: Path) -> Deployment:
    """A migrated database; its owner is either the cluster's superuser or a dedicated, ordinary owner role."""
    if request.param == "dedicated_owner":
        owner = roles.create("owner")
        # Since PostgreSQL 15 the database owner owns schema public (through pg_database_owner): it may create
        # the tables. This is the recommended deployment: no superuser anywhere in the service's configuration.
        roles.sql(f'ALTER DATABASE "{make_url(roles.database_url).database}" OWNER TO "{owner}"')
        owner_url = roles.url_as(owner)
    else:
        owner = str(make_url(roles.database_url).username)
        owner_url = roles.database_url
    db.upgrade(owner_url)
    return Deployment(roles, owner, owner_url, _write_config(tmp_path, owner_url))


def refused(engine: Engine, statement: str, reason: str) -> None:
    """``statement`` run as the service fails with insufficient_privilege from the privilege system."""
    with pytest.raises(DBAPIError) as caught, engine.begin() as connection:
        connection.execute(text(statement))
    orig = caught.value.orig
    assert isinstance(orig, psycopg.Error), caught.value
    message = str(orig)
    assert orig.sqlstate == INSUFFICIENT_PRIVILEGE, f"{statement}: {orig.sqlstate} {message}"
    assert reason in message, f"{statement}: {message}"
    # The audit triggers raise the same SQLSTATE; their message is not what refused it here.
    assert "append-only" not in message, f"{statement} reached the trigger: {message}"


# --- the service role in action -----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_service_role_appends_to_the_audit_trail_and_can_do_nothing_else_to_it(
    deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = deployment.roles.create("svc")
    config = deployment.config

    before = run(capsys, config, "db", "check-service-role", service)
    assert before.code == 1, before
    assert "lacks SELECT, INSERT on table audit_entries" in before.out

    granted = run(capsys, config, "db", "grant-service-role", service)
    assert granted.code == 0, granted
    assert "SELECT, INSERT on tables audit_entries, audit_heads (audit store, append-only)" in granted.out
    assert "SELECT, INSERT, UPDATE, DELETE on tables access_sessions, account_credentials, accounts," in granted.out
    assert "SELECT on table alembic_version (schema version)" in granted.out
    assert "USAGE, SELECT on sequences agent_rings_id_seq," in granted.out
    assert "CREATE on schema public revoked" in granted.out
    assert deployment.roles.password not in granted.out + granted.err

    again = run(capsys, config, "db", "grant-service-role", service)
    assert (again.code, again.out) == (0, granted.out), "granting twice changes nothing"
    checked = run(capsys, config, "db", "check-service-role", service)
    assert checked.code == 0, checked
    assert "exactly the service's privileges" in checked.out

    signer = Ed25519Signer.load_or_create(tmp_path / "keys")
    with engine_for(deployment.roles.url_as(service)) as engine:
        # What the service does: audit appends and signed heads, calls, agents (a sequence-backed table).
        log = AuditLog(SqlAuditStore(engine), clock=lambda: T0)
        for i in range(3):
            log.append(actor="nurse.li", role="nurse", action="read", outcome="success", patient=PATIENT,
                       reason=f"call {i}")  # fmt: skip
        head = log.sign_head(signer)
        assert head.size == 3
        calls = db.CallRepository.for_engine(engine)
        calls.start(call_id="call-1", node="n1", transport="ari", channel_id="ch-1", channel_name="PJSIP/1-1",
                    flow="main", flow_version="1", started_at=T0)  # fmt: skip
        calls.add_step("call-1", flow="main", node="greet", node_type="play", edge=None, input=None, at=T0)
        assert calls.finish("call-1", outcome="completed", ended_at=T0 + timedelta(minutes=2))
        record = calls.get("call-1")
        assert record is not None
        assert record.outcome == "completed"
        agents = AgentStore.for_engine(engine)
        agents.add_agent_with_account("a1", "Staff a1", ["nurse"], "desk1", T0)
        assert agents.record_ring("call-1", "a1", "n1", T0) >= 1
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM agent_rings WHERE call_id = 'call-1'"))

        denied = "permission denied for table"
        updates = {"audit_entries": "reason = 'nothing to see'", "audit_heads": "key_id = 'forged'"}
        for table, change in updates.items():
            refused(engine, f"UPDATE {table} SET {change}", f"{denied} {table}")
            refused(engine, f"DELETE FROM {table}", f"{denied} {table}")
            refused(engine, f"TRUNCATE {table}", f"{denied} {table}")
            refused(engine, f"ALTER TABLE {table} DISABLE TRIGGER ALL", f"must be owner of table {table}")
            refused(engine, f"DROP TRIGGER {table}_append_only ON {table}", f"must be owner of relation {table}")
            refused(engine, f"DROP TABLE {table}", f"must be owner of table {table}")
            refused(
                engine,
                f"CREATE TRIGGER sneaky BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()",
                f"{denied} {table}",
            )
        refused(engine, "CREATE TABLE public.shadow (id integer)", "permission denied for schema public")
        refused(engine, "DROP FUNCTION audit_refuse_change() CASCADE", "must be owner of function audit_refuse_change")
        # The classic way around triggers: replica mode skips them. Superusers only.
        refused(engine, "SET session_replication_role = replica", "permission denied to set parameter")
        refused(engine, "UPDATE alembic_version SET version_num = 'x'", f"{denied} alembic_version")

    # Nothing the service tried changed the trail.
    with engine_for(deployment.owner_url) as owner_engine:
        report = verify(SqlAuditStore(owner_engine), signer.public_key)
        assert report.ok, report.problem
        assert (report.size, report.heads_checked) == (3, 1)
    assert run(capsys, config, "db", "check-service-role", service).code == 0


# --- the check catches privileges beyond the service's; the grant repairs what is granted to the role -------------


@pytest.mark.postgres
@pytest.mark.parametrize("deployment", ["dedicated_owner"], indirect=True)
@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("GRANT UPDATE ON audit_entries TO {role}", "holds UPDATE on table audit_entries: the audit store must be"),
        ("GRANT UPDATE (reason) ON audit_entries TO {role}", "holds UPDATE on table audit_entries (or some of its"),
        ("GRANT DELETE, TRUNCATE ON audit_heads TO {role}", "holds DELETE, TRUNCATE on table audit_heads"),
        ("GRANT TRIGGER, REFERENCES ON audit_entries TO {role}", "holds REFERENCES, TRIGGER on table audit_entries"),
        ("GRANT TRUNCATE ON calls TO {role}", "holds TRUNCATE on table calls: the service needs only SELECT"),
        ("GRANT INSERT ON alembic_version TO {role}", "holds INSERT on table alembic_version"),
        ("GRANT UPDATE ON SEQUENCE agent_rings_id_seq TO {role}", "holds UPDATE on sequence agent_rings_id_seq"),
        ("GRANT SELECT ON audit_entries TO {role} WITH GRANT OPTION", "may grant SELECT on table audit_entries"),
        ("GRANT CREATE ON SCHEMA public TO {role}", "holds CREATE on schema public"),
        ("REVOKE INSERT ON audit_entries FROM {role}", "lacks INSERT on table audit_entries"),
    ],
)
def test_check_finds_a_changed_privilege_and_grant_repairs_it(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], statement: str, problem: str
) -> None:
    service = deployment.roles.create("svc")
    assert run(capsys, deployment.config, "db", "grant-service-role", service).code == 0
    assert run(capsys, deployment.config, "db", "check-service-role", service).code == 0

    deployment.roles.sql(statement.format(role=f'"{service}"'))
    checked = run(capsys, deployment.config, "db", "check-service-role", service)
    assert checked.code == 1, checked
    assert "NOT the service's least privileges" in checked.out
    assert problem in checked.out, checked.out

    assert run(capsys, deployment.config, "db", "grant-service-role", service).code == 0
    assert run(capsys, deployment.config, "db", "check-service-role", service).code == 0


@pytest.mark.postgres
@pytest.mark.parametrize("deployment", ["dedicated_owner"], indirect=True)
@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("GRANT UPDATE ON audit_entries TO PUBLIC", "holds UPDATE on table audit_entries"),
        ("GRANT pg_write_all_data TO {role}", "holds UPDATE, DELETE on table audit_entries"),
        ("GRANT {helper} TO {role}", "holds DELETE on table audit_heads"),
    ],
)
def test_privileges_held_through_public_or_a_membership_are_reported_not_hidden(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], statement: str, problem: str
) -> None:
    service = deployment.roles.create("svc")
    helper = deployment.roles.create("helper", "NOLOGIN")
    deployment.roles.sql(f'GRANT DELETE ON audit_heads TO "{helper}"')
    deployment.roles.sql(statement.format(role=f'"{service}"', helper=f'"{helper}"'))

    granted = run(capsys, deployment.config, "db", "grant-service-role", service)
    assert granted.code == 1, granted
    assert problem in granted.out, granted.out
    assert "revoke those where they are held" in granted.out
    checked = run(capsys, deployment.config, "db", "check-service-role", service)
    assert checked.code == 1
    assert problem in checked.out


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("deployment", ["dedicated_owner"], indirect=True)
def test_roles_that_could_get_around_the_grants_are_refused(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    roles, owner = deployment.roles, deployment.owner
    superuser = roles.create("super", "LOGIN SUPERUSER")
    hidden_super = roles.create("hidden_super", "NOLOGIN SUPERUSER")
    via_super = roles.create("via_super")
    roles.sql(f'GRANT "{hidden_super}" TO "{via_super}"')
    via_owner = roles.create("via_owner")
    roles.sql(f'GRANT "{owner}" TO "{via_owner}"')
    createrole = roles.create("createrole", "LOGIN CREATEROLE")
    missing = f"mh_test_missing_{uuid.uuid4().hex[:10]}"

    cases = {
        owner: f"role {owner} owns the database, table access_sessions, table account_credentials, table accounts",
        via_owner: f"role {via_owner} is a member of {owner}, which owns the database",
        superuser: f"role {superuser} is a superuser: it bypasses every privilege check",
        via_super: f"role {via_super} is a member of superuser role {hidden_super}",
        createrole: f"role {createrole} has CREATEROLE",
        missing: f"role {missing} does not exist",
    }
    for role, reason in cases.items():
        held_before = roles.direct_grants(role)
        granted = run(capsys, deployment.config, "db", "grant-service-role", role)
        assert granted.code == 1, (role, granted)
        assert reason in granted.err, granted.err
        if role != missing:
            assert f"refusing to grant to role {role}" in granted.err
            assert roles.direct_grants(role) == held_before, f"{role}: privileges changed although refused"
        checked = run(capsys, deployment.config, "db", "check-service-role", role)
        assert checked.code == 1, (role, checked)
        assert reason in checked.out + checked.err
    missing_message = run(capsys, deployment.config, "db", "grant-service-role", missing).err
    assert f"create it first: CREATE ROLE {missing} LOGIN PASSWORD" in missing_message


@pytest.mark.postgres
@pytest.mark.parametrize("deployment", ["dedicated_owner"], indirect=True)
def test_only_the_owner_may_grant(deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = deployment.roles.create("svc")
    other = deployment.roles.create("other")
    assert run(capsys, deployment.config, "db", "grant-service-role", service).code == 0
    as_service = _write_config(tmp_path, deployment.roles.url_as(service), "service.toml")
    result = run(capsys, as_service, "db", "grant-service-role", other)
    assert result.code == 1, result
    assert "must run as the schema owner (the migration role)" in result.err
    assert f"current user {service} does not own" in result.err
    assert deployment.roles.direct_grants(other) == set()


@pytest.mark.postgres
def test_grant_refuses_a_schema_that_is_not_current(
    roles: Roles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = roles.create("svc")
    result = run(capsys, _write_config(tmp_path, roles.database_url), "db", "grant-service-role", service)
    assert result.code == 1
    assert "run `medhotline db upgrade`" in result.err
    assert roles.direct_grants(service) == set()


def test_sqlite_has_no_roles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write_config(tmp_path, None)
    for action in ("grant-service-role", "check-service-role"):
        result = run(capsys, config, "db", action, "medhotline_service")
        assert result.code == 2, result
        assert "database roles do not exist in SQLite" in result.err
        assert "file's permissions" in result.err
    assert not (tmp_path / "state").exists(), "nothing created or opened"


# A PostgreSQL URL nobody listens on: a bad name must be refused before any connection is attempted.
UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:9/nowhere"


@pytest.mark.parametrize(
    ("role", "reason"),
    [
        ("Medhotline", "invalid role name 'Medhotline': use lower-case letters"),
        ('svc"; DROP TABLE audit_entries; --', "invalid role name"),
        ("svc role", "invalid role name"),
        ("9lives", "invalid role name"),
        ("x" * 64, "at most 63 characters"),
        ("public", "reserved by PostgreSQL"),
        ("pg_write_all_data", "reserved by PostgreSQL"),
        ("current_user", "reserved by PostgreSQL"),
    ],
)
def test_a_bad_role_name_is_refused_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, reason: str
) -> None:
    config = _write_config(tmp_path, UNREACHABLE)
    for action in ("grant-service-role", "check-service-role"):
        result = run(capsys, config, "db", action, role)
        assert result.code == 2, result
        assert reason in result.err


def test_the_role_name_is_required_and_only_for_the_role_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(capsys, _write_config(tmp_path, UNREACHABLE), "db", "grant-service-role")
    assert (result.code, "needs the role name: medhotline db grant-service-role ROLE" in result.err) == (2, True)
    result = run(capsys, _write_config(tmp_path, None), "db", "upgrade", "medhotline_service")
    assert (result.code, "db upgrade takes no role name" in result.err) == (2, True)
    assert not (tmp_path / "state").exists()


# --- the sans-I/O core --------------------------------------------------------------------------------------------


def test_expected_privileges_by_kind_of_relation() -> None:
    def table(name: str) -> Relation:
        return Relation(name, "table", "owner")

    def sequence(name: str, of: str | None) -> Relation:
        return Relation(name, "sequence", "owner", of)

    assert expected_privileges(table("audit_entries"), AUDIT) == AUDIT_TABLE_GRANT == ("SELECT", "INSERT")
    assert expected_privileges(table("calls"), AUDIT) == BUSINESS_TABLE_GRANT
    assert expected_privileges(table("alembic_version"), AUDIT) == ("SELECT",)
    assert expected_privileges(sequence("calls_id_seq", "calls"), AUDIT) == ("USAGE", "SELECT")
    assert expected_privileges(sequence("audit_x_seq", "audit_heads"), AUDIT) == ("USAGE",)
    assert expected_privileges(sequence("stray_seq", None), AUDIT) == ()


def test_privilege_problems_name_missing_extra_column_level_and_grantable() -> None:
    entries = Relation("audit_entries", "table", "owner")
    exact = Held(entries, frozenset(AUDIT_TABLE_GRANT), frozenset(AUDIT_TABLE_GRANT), frozenset())
    assert privilege_problems(exact, AUDIT_TABLE_GRANT, AUDIT) == []
    column_update = Held(entries, frozenset({"SELECT"}), frozenset({"SELECT", "UPDATE"}), frozenset({"SELECT"}))
    assert privilege_problems(column_update, AUDIT_TABLE_GRANT, AUDIT) == [
        "lacks INSERT on table audit_entries: the service needs SELECT, INSERT",
        "holds UPDATE on table audit_entries (or some of its columns): the audit store must be append-only to the "
        "service",
        "may grant SELECT on table audit_entries to others (WITH GRANT OPTION): the service must not hand out "
        "privileges",
    ]


def test_grant_plan_quotes_every_identifier_and_never_grants_change_on_the_audit_store() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none")  # never connects: only its dialect
    preparer = engine.dialect.identifier_preparer
    engine.dispose()
    relations = [
        Relation("audit_entries", "table", "owner"),
        Relation("calls", "table", "owner"),
        Relation('we"ird', "table", "owner"),
        Relation("alembic_version", "table", "owner"),
        Relation("calls_id_seq", "sequence", "owner", "calls"),
    ]
    qualify = {r.name: f"{preparer.quote_identifier('public')}.{preparer.quote_identifier(r.name)}" for r in relations}
    qualify["public"] = preparer.quote_identifier("public")
    plan = grant_plan(relations, AUDIT, preparer.quote_identifier("svc"), qualify)
    assert plan.statements[0] == (
        'REVOKE ALL ON TABLE "public"."audit_entries", "public"."calls", "public"."we""ird", '
        '"public"."alembic_version" FROM "svc"'
    )
    assert 'GRANT SELECT, INSERT ON TABLE "public"."audit_entries" TO "svc"' in plan.statements
    assert 'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "public"."calls", "public"."we""ird" TO "svc"' in (
        plan.statements
    )
    assert 'GRANT USAGE, SELECT ON SEQUENCE "public"."calls_id_seq" TO "svc"' in plan.statements
    assert 'REVOKE CREATE ON SCHEMA "public" FROM "svc"' in plan.statements
    audit_grants = [s for s in plan.statements if s.startswith("GRANT") and "audit_entries" in s]
    assert audit_grants == ['GRANT SELECT, INSERT ON TABLE "public"."audit_entries" TO "svc"']
