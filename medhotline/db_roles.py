"""Least-privilege PostgreSQL roles: the owner migrates, the service can only append to the audit trail.

Two roles share a PostgreSQL database:

- the **owner** (the migration role, ``[database] url`` of the administrators' configuration) owns the schema's
  tables, sequences and triggers. It runs ``medhotline db upgrade`` and ``medhotline db grant-service-role``.
- the **service** role (``[database] url`` of the service nodes) owns nothing. It may SELECT and INSERT on the
  audit store (``audit_entries``, ``audit_heads``: :data:`compliance.audit.AUDIT_METADATA`), SELECT, INSERT,
  UPDATE and DELETE on the business tables, read ``alembic_version``, and use the business tables' sequences.

The triggers of migration ``0003_audit`` refuse UPDATE, DELETE and TRUNCATE on the audit store, but an owner or a
superuser can disable or drop triggers and tables. The privilege system is what makes the audit store
append-only to the service: without UPDATE, DELETE, TRUNCATE or TRIGGER on the audit tables, without ownership
(ALTER TABLE … DISABLE TRIGGER, DROP TABLE and DROP TRIGGER are the owner's alone) and without CREATE on the
schema, a compromised service can add entries, which the hash chain then covers, and do nothing else to them.

``grant-service-role`` makes the role's privileges exactly that: it refuses roles that could get around them
(the owner or a member of it, a superuser or a member of one, a role with CREATEROLE), revokes everything the role
holds on the schema's tables and sequences, grants what the service needs and then checks the result as
PostgreSQL computes it (``has_table_privilege`` and friends, so privileges held through PUBLIC, a role membership
or a predefined role such as ``pg_write_all_data`` count too). It is idempotent, and must be run again after
every ``medhotline db upgrade``: tables are enumerated from the database, not hard-coded, and a new table has no
grants until then (``check-service-role`` says so). SQLite has no roles: there the file's permissions are the
boundary.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from compliance.audit import AUDIT_METADATA
from ground import db

if TYPE_CHECKING:
    from ground.config import Config

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

GRANT_ACTION: Final = "grant-service-role"
CHECK_ACTION: Final = "check-service-role"
ACTIONS: Final = (GRANT_ACTION, CHECK_ACTION)

SCHEMA: Final = "public"
VERSION_TABLE: Final = "alembic_version"
# Lower-case only, so the quoted identifier is the name the operator typed (PostgreSQL folds unquoted names).
ROLE_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# "public" is the PUBLIC pseudo-role (every role); "pg_" names are PostgreSQL's predefined roles.
_RESERVED_ROLES: Final = frozenset({"public", "none", "current_user", "current_role", "session_user"})

TABLE_PRIVILEGES: Final = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
# Privileges PostgreSQL also grants per column: a column-level UPDATE on one audit column is still an UPDATE.
_COLUMN_PRIVILEGES: Final = frozenset({"SELECT", "INSERT", "UPDATE", "REFERENCES"})
SEQUENCE_PRIVILEGES: Final = ("USAGE", "SELECT", "UPDATE")
AUDIT_TABLE_GRANT: Final = ("SELECT", "INSERT")
BUSINESS_TABLE_GRANT: Final = ("SELECT", "INSERT", "UPDATE", "DELETE")
VERSION_TABLE_GRANT: Final = ("SELECT",)
AUDIT_SEQUENCE_GRANT: Final = ("USAGE",)
BUSINESS_SEQUENCE_GRANT: Final = ("USAGE", "SELECT")

_NOT_ON_SQLITE: Final = (
    "database roles do not exist in SQLite: there the file's permissions are the boundary (the database file and "
    "its directory, created 0700, belong to the service's OS user); {action} is for PostgreSQL deployments"
)


class ServiceRoleError(db.DatabaseError):
    """The role cannot be made the service's least-privilege role; the message says which role and why."""


# --- the sans-I/O core: which privileges each relation should give the service ----------------------------------

RelationKind = Literal["table", "sequence"]
Category = Literal["audit", "business", "version", "other"]
_ORDER: Final[tuple[Category, ...]] = ("audit", "business", "version", "other")


@dataclass(frozen=True, slots=True)
class Relation:
    """A table or sequence of the schema, as the catalog lists it."""

    name: str
    kind: RelationKind
    owner: str
    # For a sequence: the table whose column it feeds (SERIAL or IDENTITY), if any.
    table: str | None = None
    oid: int = 0  # the catalog's object id, for the privilege functions


@dataclass(frozen=True, slots=True)
class Held:
    """What a role effectively holds on one relation, as PostgreSQL computes it (PUBLIC and memberships too)."""

    relation: Relation
    whole: frozenset[str]  # on the whole relation
    any_column: frozenset[str]  # on the relation or on at least one of its columns
    grantable: frozenset[str]  # with grant option


def category(relation: Relation, audit_tables: Collection[str]) -> Category:
    name = relation.name if relation.kind == "table" else relation.table
    if name is None:
        return "other"
    if name in audit_tables:
        return "audit"
    if name == VERSION_TABLE:
        return "version"
    return "business"


def expected_privileges(relation: Relation, audit_tables: Collection[str]) -> tuple[str, ...]:
    """Exactly what the service role should hold on ``relation``."""
    kind = category(relation, audit_tables)
    if relation.kind == "table":
        return {"audit": AUDIT_TABLE_GRANT, "version": VERSION_TABLE_GRANT}.get(kind, BUSINESS_TABLE_GRANT)
    if kind == "audit":
        return AUDIT_SEQUENCE_GRANT
    if kind == "business":
        return BUSINESS_SEQUENCE_GRANT
    # The version table has no sequence; a sequence no table uses is nothing the service needs.
    return ()


def privilege_problems(held: Held, expected: Sequence[str], audit_tables: Collection[str]) -> list[str]:
    """What is missing from, or beyond, ``expected`` in ``held``; empty when the role holds exactly that."""
    relation = held.relation
    what = f"{relation.kind} {relation.name}"
    problems = []
    missing = [p for p in expected if p not in held.whole]
    if missing:
        problems.append(f"lacks {', '.join(missing)} on {what}: the service needs {', '.join(expected)}")
    extra = [p for p in (TABLE_PRIVILEGES if relation.kind == "table" else SEQUENCE_PRIVILEGES)
             if p not in expected and p in held.any_column]  # fmt: skip
    if extra:
        where = what if all(p in held.whole for p in extra) else f"{what} (or some of its columns)"
        why = (
            "the audit store must be append-only to the service"
            if category(relation, audit_tables) == "audit"
            else f"the service needs only {', '.join(expected) or 'nothing'}"
        )
        problems.append(f"holds {', '.join(extra)} on {where}: {why}")
    if held.grantable:
        problems.append(
            f"may grant {', '.join(sorted(held.grantable))} on {what} to others (WITH GRANT OPTION): "
            "the service must not hand out privileges"
        )
    return problems


@dataclass(frozen=True, slots=True)
class GrantPlan:
    """The statements that give ``role`` exactly the service's privileges, and a summary of them."""

    statements: tuple[str, ...]
    summary: tuple[str, ...]


def grant_plan(
    relations: Sequence[Relation], audit_tables: Collection[str], role_sql: str, qualify: Mapping[str, str]
) -> GrantPlan:
    """REVOKE everything on every relation, then GRANT per category.

    ``role_sql`` is the quoted role; ``qualify`` maps each relation name to its quoted, schema-qualified form.
    Every identifier in the statements comes from those two, never from unquoted text.
    """
    statements = []
    tables = [r for r in relations if r.kind == "table"]
    sequences = [r for r in relations if r.kind == "sequence"]
    for kind, group in (("TABLE", tables), ("SEQUENCE", sequences)):
        if group:
            statements.append(f"REVOKE ALL ON {kind} {', '.join(qualify[r.name] for r in group)} FROM {role_sql}")
    statements.append(f"REVOKE CREATE ON SCHEMA {qualify[SCHEMA]} FROM {role_sql}")
    statements.append(f"GRANT USAGE ON SCHEMA {qualify[SCHEMA]} TO {role_sql}")
    summary = []
    labels = {"audit": "audit store, append-only", "business": "business", "version": "schema version"}
    for kind, group in (("TABLE", tables), ("SEQUENCE", sequences)):
        by_grant: dict[tuple[str, ...], list[Relation]] = {}
        # Audit store first: it is what this is about.
        for relation in sorted(group, key=lambda r: (_ORDER.index(category(r, audit_tables)), r.name)):
            by_grant.setdefault(expected_privileges(relation, audit_tables), []).append(relation)
        for privileges, members in by_grant.items():
            if not privileges:
                continue
            names = ", ".join(qualify[r.name] for r in members)
            statements.append(f"GRANT {', '.join(privileges)} ON {kind} {names} TO {role_sql}")
            label = labels.get(category(members[0], audit_tables), "other")
            plain = ", ".join(r.name for r in members)
            noun = kind.lower() + ("s" if len(members) > 1 else "")
            summary.append(f"{', '.join(privileges)} on {noun} {plain} ({label})")
    summary.append(f"USAGE on schema {SCHEMA}; CREATE on schema {SCHEMA} revoked")
    return GrantPlan(tuple(statements), tuple(summary))


def check_role_name(role: str) -> str:
    """``role`` if it is a plain lower-case PostgreSQL role name the service may use, else ServiceRoleError."""
    if not ROLE_NAME.fullmatch(role):
        raise ServiceRoleError(
            f"invalid role name {role!r}: use lower-case letters, digits and underscores, starting with a letter "
            "or underscore, at most 63 characters (e.g. medhotline_service)"
        )
    if role in _RESERVED_ROLES or role.startswith("pg_"):
        raise ServiceRoleError(
            f"invalid role name {role!r}: it is reserved by PostgreSQL (PUBLIC, special or predefined roles)"
        )
    return role


# --- the PostgreSQL edge ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoleReport:
    """Outcome of a grant or a check: ``problems`` is empty when the role holds exactly the service's privileges."""

    role: str
    where: str
    problems: tuple[str, ...]
    granted: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _audit_tables() -> frozenset[str]:

    return frozenset(AUDIT_METADATA.tables)


def _relations(connection: Connection) -> list[Relation]:
    rows = connection.execute(
        text(
            "SELECT c.oid, c.relname, c.relkind, pg_get_userbyid(c.relowner) AS owner, "
            "  (SELECT t.relname FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid "
            "   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid "
            "     AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1) AS owned_by "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relkind IN ('r', 'p', 'S') ORDER BY c.relname"
        ),
        {"schema": SCHEMA},
    )
    return [
        Relation(row.relname, "sequence" if row.relkind == "S" else "table", row.owner, row.owned_by, int(row.oid))
        for row in rows
    ]


def _held(connection: Connection, role: str, relations: Iterable[Relation]) -> list[Held]:
    """The role's effective privileges on each relation (PUBLIC, memberships and predefined roles included)."""
    result = []
    for relation in relations:
        table = relation.kind == "table"
        privileges = TABLE_PRIVILEGES if table else SEQUENCE_PRIVILEGES
        function = "has_table_privilege" if table else "has_sequence_privilege"
        on = "CAST(:role AS name), CAST(:oid AS oid)"
        columns = []
        # The only text formatted into this SQL is this module's privilege constants; role and oid are bound.
        for p in privileges:
            columns.append(f"{function}({on}, '{p}') AS whole_{p.lower()}")
            columns.append(f"{function}({on}, '{p} WITH GRANT OPTION') AS grant_{p.lower()}")
            if table and p in _COLUMN_PRIVILEGES:
                columns.append(f"has_any_column_privilege({on}, '{p}') AS col_{p.lower()}")
        row = connection.execute(text(f"SELECT {', '.join(columns)}"), {"role": role, "oid": relation.oid}).one()
        held = row._mapping
        whole = frozenset(p for p in privileges if held[f"whole_{p.lower()}"])
        any_column = whole | frozenset(p for p in privileges if held.get(f"col_{p.lower()}"))
        grantable = frozenset(p for p in privileges if held[f"grant_{p.lower()}"])
        result.append(Held(relation, whole, any_column, grantable))
    return result


def _role_attributes(connection: Connection, role: str, where: str) -> tuple[bool, bool]:
    """(superuser, createrole) of an existing role; ServiceRoleError naming how to create it if it is missing."""
    row = connection.execute(
        text("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = :role"), {"role": role}
    ).first()
    if row is None:
        raise ServiceRoleError(
            f"role {role} does not exist in the PostgreSQL cluster of {where}; create it first: "
            f"CREATE ROLE {role} LOGIN PASSWORD '…'; then run `medhotline db {GRANT_ACTION} {role}` again"
        )
    return bool(row.rolsuper), bool(row.rolcreaterole)


def _powers(connection: Connection, role: str, relations: Sequence[Relation], where: str) -> list[str]:
    """Why ``role`` could get around any grant: superuser, CREATEROLE, ownership (or membership of such roles)."""
    superuser, createrole = _role_attributes(connection, role, where)
    if superuser:
        # PostgreSQL counts a superuser as a member of every role: the memberships below would only repeat this.
        return [
            f"role {role} is a superuser: it bypasses every privilege check and can disable the audit triggers, "
            "so the audit store cannot be append-only to it; use a role without SUPERUSER"
        ]
    supers = connection.scalars(
        text("SELECT rolname FROM pg_roles WHERE rolsuper AND rolname <> :role "
             "AND pg_has_role(CAST(:role AS name), oid, 'MEMBER') ORDER BY rolname"),
        {"role": role},
    ).all()  # fmt: skip
    problems = [f"role {role} is a member of superuser role {name} (it can SET ROLE {name})" for name in supers]
    if createrole:
        problems.append(
            f"role {role} has CREATEROLE: it could grant itself membership in the owner role; ALTER ROLE {role} "
            "NOCREATEROLE"
        )
    owned: dict[str, list[str]] = {}
    for relation in relations:
        owned.setdefault(relation.owner, []).append(f"{relation.kind} {relation.name}")
    schema_owner = connection.scalar(
        text("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = :schema"), {"schema": SCHEMA}
    )
    database_owner = connection.scalar(
        text("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    )
    # The schema's owner may drop any table in it; the database's owner is, since PostgreSQL 15, a member of
    # pg_database_owner, which owns schema public by default.
    for owner, what in ((schema_owner, f"schema {SCHEMA}"), (database_owner, "the database")):
        if owner is not None:
            owned.setdefault(str(owner), []).insert(0, what)
    for owner, things in owned.items():
        if not connection.scalar(
            text("SELECT pg_has_role(CAST(:role AS name), CAST(:owner AS name), 'MEMBER')"),
            {"role": role, "owner": owner},
        ):
            continue
        shown = ", ".join(things[:4]) + (f" and {len(things) - 4} more" if len(things) > 4 else "")
        who = f"role {role}" if owner == role else f"role {role} is a member of {owner}, which"
        problems.append(
            f"{who} owns {shown}: an owner can disable the audit triggers, alter and drop tables, so the audit "
            "store cannot be append-only to it; the service needs a role of its own that owns nothing"
        )
    return problems


def _require_owner_running(connection: Connection, relations: Sequence[Relation], where: str) -> None:
    """GRANT and REVOKE by a non-owner only warn and do nothing: refuse instead, naming what the runner lacks."""
    runner, superuser = connection.execute(
        text("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    ).one()
    if superuser:
        return
    owners = {r.owner for r in relations} | {
        str(connection.scalar(
            text("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = :schema"), {"schema": SCHEMA}
        ))
    }  # fmt: skip
    for owner in sorted(owners):
        if not connection.scalar(
            text("SELECT pg_has_role(current_user, CAST(:owner AS name), 'USAGE')"), {"owner": owner}
        ):
            raise ServiceRoleError(
                f"{GRANT_ACTION} must run as the schema owner (the migration role) on {where}: the current user "
                f"{runner} does not own or act for {owner}'s objects"
            )


def _schema_problems(connection: Connection, role: str) -> list[str]:
    create, usage = connection.execute(
        text("SELECT has_schema_privilege(CAST(:role AS name), :schema, 'CREATE'), "
             "has_schema_privilege(CAST(:role AS name), :schema, 'USAGE')"),
        {"role": role, "schema": SCHEMA},
    ).one()  # fmt: skip
    problems = []
    if create:
        problems.append(
            f"holds CREATE on schema {SCHEMA} (directly, through PUBLIC or a membership): it could create objects "
            "in the service's schema"
        )
    if not usage:
        problems.append(f"lacks USAGE on schema {SCHEMA}: the service could not reach its tables")
    return problems


def _problems(connection: Connection, role: str, relations: Sequence[Relation], where: str) -> list[str]:
    audit_tables = _audit_tables()
    problems = _powers(connection, role, relations, where)
    names = {r.name for r in relations if r.kind == "table"}
    missing_audit = sorted(audit_tables - names)
    if missing_audit:
        problems.append(f"the audit tables {', '.join(missing_audit)} are missing from schema {SCHEMA}")
    for held in _held(connection, role, relations):
        problems += privilege_problems(held, expected_privileges(held.relation, audit_tables), audit_tables)
    return problems + _schema_problems(connection, role)


def _begin_checked(url: str, role: str) -> str:
    check_role_name(role)
    if _is_sqlite(url):
        raise ServiceRoleError(_NOT_ON_SQLITE.format(action="this command"))
    db.ensure_current(url)
    return db.mask_url(url)


def grant_service_role(url: str, role: str) -> RoleReport:
    """Give ``role`` exactly the service's privileges on the database at ``url`` (run as the schema owner).

    One transaction, under the migration lock so a concurrent ``db upgrade`` cannot add a table half-way. The
    result is checked as PostgreSQL computes it; ``problems`` lists what still exceeds the service's privileges
    (held through PUBLIC, a membership or another grantor, which a REVOKE from the role does not touch).
    """
    where = _begin_checked(url, role)
    engine = db.make_engine(url)
    try:
        with db.mapped_errors(url, f"granting the service's privileges to role {role}"), engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": db._PG_MIGRATION_LOCK})
            relations = _relations(connection)
            powers = _powers(connection, role, relations, where)
            if powers:
                raise ServiceRoleError(f"refusing to grant to role {role} on {where}: " + "; ".join(powers))
            _require_owner_running(connection, relations, where)
            preparer = connection.dialect.identifier_preparer
            qualify = {r.name: f"{preparer.quote_identifier(SCHEMA)}.{preparer.quote_identifier(r.name)}"
                       for r in relations}  # fmt: skip
            qualify[SCHEMA] = preparer.quote_identifier(SCHEMA)
            plan = grant_plan(relations, _audit_tables(), preparer.quote_identifier(role), qualify)
            for statement in plan.statements:
                connection.execute(text(statement))
            problems = _problems(connection, role, relations, where)
    finally:
        engine.dispose()
    return RoleReport(role, where, tuple(problems), plan.summary)


def check_service_role(url: str, role: str) -> RoleReport:
    """Whether ``role`` holds exactly the service's privileges on the database at ``url``; changes nothing."""
    where = _begin_checked(url, role)
    engine = db.make_engine(url)
    try:
        with db.mapped_errors(url, f"checking role {role}"), engine.connect() as connection:
            problems = _problems(connection, role, _relations(connection), where)
    finally:
        engine.dispose()
    return RoleReport(role, where, tuple(problems))


def _is_sqlite(url: str) -> bool:
    try:
        return make_url(db.normalise_url(url)).get_backend_name() == "sqlite"
    except (ArgumentError, ValueError):
        return False  # not ours to judge here: db.ensure_current reports an unparseable URL


# --- the CLI ---------------------------------------------------------------------------------------------------


def command(config: Config, args: argparse.Namespace) -> int:
    """``medhotline db grant-service-role ROLE`` and ``medhotline db check-service-role ROLE``."""
    url = config.database_url
    action = str(args.action)
    if _is_sqlite(url):
        print(f"medhotline: {_NOT_ON_SQLITE.format(action=action)}", file=sys.stderr)
        return EXIT_USAGE
    if not args.role:
        print(f"medhotline: db {action} needs the role name: medhotline db {action} ROLE", file=sys.stderr)
        return EXIT_USAGE
    try:
        role = check_role_name(args.role)
    except ServiceRoleError as exc:
        print(f"medhotline: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if action == GRANT_ACTION:
        report = grant_service_role(url, role)
        print(f"role {role} on {report.where}: revoked everything on schema {SCHEMA}, then granted")
        for line in report.granted:
            print(f"  {line}")
    else:
        report = check_service_role(url, role)
    if report.ok:
        print(
            f"role {role}: exactly the service's privileges on {report.where} (append-only on the audit store, "
            f"no ownership, no superuser, no CREATE on schema {SCHEMA})"
        )
        return EXIT_OK
    print(f"role {role}: NOT the service's least privileges on {report.where}:")
    for problem in report.problems:
        print(f"  - {problem}")
    if action == GRANT_ACTION:
        print("  revoke those where they are held (PUBLIC, a role membership, another grantor), then run again")
    return EXIT_FAILED
