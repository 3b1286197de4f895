"""Agents, credentials, skills, reservations and ring history in the database: the persistent side of routing.

The dispatcher (``routing.router``) decides in memory from a :meth:`AgentStore.routing_snapshot` that each node
refreshes every half second or so. Because a snapshot can be stale by then (a licence revoked, an account
frozen, another node faster), the decision is confirmed by :meth:`AgentStore.reserve`: one conditional UPDATE
that takes the agent only if nobody holds them, they are not paused, their account is not frozen and every
required credential group is met *now* by an active, verified, valid credential. Whoever's UPDATE changes the
row wins; the others get False and pick again. On PostgreSQL under READ COMMITTED this is safe because an
UPDATE that waited for a row lock re-checks its WHERE against the row as committed; on SQLite the database write
lock serialises the writers.

Every public method is one short transaction (``ground.db.Repository``). Bad input raises
:class:`AgentError` naming the agent, credential or field and why, before anything is written.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final, Literal

from sqlalchemy import Update, bindparam, exists, false, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.accounts import Account, new_account_row
from ground.db import DatabaseError, Repository, WouldWait, rowcount
from ground.db_at_once import AtOnceWriter
from ground.models import UTCDateTime
from routing.model import Agent, Credential, CredentialStatus
from routing.tables import RING_OUTCOMES, AgentRing, AgentRow, AgentSkill, CredentialRow, RingOutcome

__all__ = [
    "CALL_ID",
    "ENDPOINT",
    "NAME",
    "NODE",
    "AgentAvailability",
    "AgentError",
    "AgentStore",
    "AgentView",
    "CredentialRecord",
    "RingRecord",
    "check_skills",
]

ENDPOINT: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Skill names and credential kinds (the names routing rules refer to).
NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Node names, as ``service.node_name`` allows.
NODE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Call ids are the service's UUIDs; Asterisk channel ids (digits and a dot) fit too.
CALL_ID: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,36}$")
LANGUAGE: Final = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")
# A SIP URI with parameters; no space, comma, ampersand or quote, which would break out of an Asterisk dial string.
CONTACT: Final = re.compile(r"^sips?:[A-Za-z0-9_.~!*+%=;:@\[\]-]{1,250}$")
SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")
# Seven or more digits (with separators): a phone, record or ID number. Reasons are stored in clear, so one that
# might carry a patient's number is refused, as the audit log refuses it (compliance.audit).
NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")

AgentAvailability = Literal["frozen", "paused", "reserved", "ready"]


class AgentError(DatabaseError):
    """An agent, credential or ring operation that cannot be done; the message names which one and why."""


# --- values ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentView:
    """An agent as routing sees it: the sans-I/O :class:`Agent` plus what the telephony side needs to dial."""

    agent: Agent
    contact: str | None
    languages: tuple[str, ...]
    departments: frozenset[str]
    display_name: str
    paused_reason: str | None
    reserved_call_id: str | None
    reserved_by: str | None

    @property
    def id(self) -> str:
        return self.agent.id

    @property
    def state(self) -> AgentAvailability:
        """The database's view (not the phone's): frozen, else paused, else reserved, else ready."""
        if self.agent.frozen:
            return "frozen"
        if self.paused_reason is not None:
            return "paused"
        if self.reserved_call_id is not None:
            return "reserved"
        return "ready"


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """One row of ``credentials``; :attr:`credential` is the value the router checks."""

    id: int
    account_id: str
    kind: str
    number: str
    issuer: str
    valid_from: datetime
    valid_until: datetime
    verified_at: datetime | None
    verified_by: str | None
    certificate_sha256: str | None
    status: CredentialStatus
    revoked_at: datetime | None
    revoked_reason: str | None
    created_at: datetime

    @property
    def credential(self) -> Credential:
        return Credential(self.kind, self.number, self.valid_from, self.valid_until, self.verified_at, self.status)

    def is_valid(self, at: datetime) -> bool:
        return self.credential.is_valid(at)


@dataclass(frozen=True, slots=True)
class RingRecord:
    id: int
    call_id: str
    account_id: str
    node: str
    rung_at: datetime
    ended_at: datetime | None
    outcome: RingOutcome | None


# --- input checks ----------------------------------------------------------------------------------------------


def _aware(at: datetime, what: str = "at") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise AgentError(f"{what} {at.isoformat()}: pass a timezone-aware datetime")
    return at


def _text(value: str, what: str, limit: int) -> str:
    """Free text (a reason, a licence number, an issuer): stripped, 1..limit characters, no control characters."""
    stripped = value.strip()
    if not stripped:
        raise AgentError(f"{what} must not be empty")
    if len(stripped) > limit:
        raise AgentError(f"{what} is longer than {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in stripped):
        raise AgentError(f"{what} contains control characters")
    return stripped


def _reason(value: str, what: str) -> str:
    text = _text(value, what, 256)
    if NUMBER_LIKE.search(text):
        raise AgentError(
            f"{what} contains a number that looks like a phone, record or ID number; reasons are stored in clear, "
            "so leave patients' numbers out"
        )
    return text


def _check_endpoint(endpoint: str) -> str:
    if not ENDPOINT.match(endpoint):
        raise AgentError(f"endpoint {endpoint!r}: use 1-64 of A-Z a-z 0-9 _ . - (a PJSIP endpoint name)")
    return endpoint


def _check_contact(contact: str | None) -> str | None:
    if contact is not None and not CONTACT.match(contact):
        raise AgentError(f"contact {contact!r}: expected a SIP URI such as sip:phys1@127.0.0.1:5071")
    return contact


def _check_languages(languages: Sequence[str]) -> tuple[str, ...]:
    items = (languages,) if isinstance(languages, str) else tuple(languages)
    chosen = tuple(dict.fromkeys(items))  # keep the order of preference, drop repeats
    if not chosen:
        raise AgentError("an agent needs at least one language")
    bad = [lang for lang in chosen if not LANGUAGE.match(lang)]
    if bad:
        raise AgentError(f"language(s) {', '.join(map(repr, bad))}: use tags such as zh, en, zh-yue")
    return chosen


def _check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise AgentError(f"{what} {name!r}: use 1-64 of a-z 0-9 _ starting with a letter")
    return name


def check_skills(skills: Mapping[str, int]) -> dict[str, int]:
    """Skill name → proficiency 1 to 5; :class:`AgentError` names the first bad one."""
    checked: dict[str, int] = {}
    for name, level in skills.items():
        _check_name(name, "skill")
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 5:
            raise AgentError(f"skill {name!r}: proficiency {level!r} is not a whole number from 1 to 5")
        checked[name] = level
    return checked


def _check_node(node: str) -> str:
    if not NODE.match(node):
        raise AgentError(f"node name {node!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return node


def _check_call_id(call_id: str) -> str:
    if not CALL_ID.match(call_id):
        raise AgentError(f"call id {call_id!r}: expected 1-36 of A-Z a-z 0-9 _ . : -")
    return call_id


def _check_sha256(digest: str | None) -> str | None:
    if digest is None:
        return None
    lowered = digest.lower()
    if not SHA256_HEX.match(lowered):
        raise AgentError("certificate_sha256: expected 64 hexadecimal digits (the SHA-256 of the certificate copy)")
    return lowered


@dataclass(frozen=True, slots=True)
class _AgentFields:
    """An agent's checked attributes, validated before any transaction starts."""

    endpoint: str
    contact: str | None
    languages: tuple[str, ...]
    skills: dict[str, int]

    @classmethod
    def check(
        cls,
        endpoint: str,
        at: datetime,
        contact: str | None,
        languages: Sequence[str],
        skills: Mapping[str, int] | None,
    ) -> _AgentFields:
        _aware(at)
        return cls(
            _check_endpoint(endpoint), _check_contact(contact), _check_languages(languages), check_skills(skills or {})
        )


def _credential_record(row: CredentialRow) -> CredentialRecord:
    status: CredentialStatus = "revoked" if row.status == "revoked" else "active"
    return CredentialRecord(
        id=row.id,
        account_id=row.account_id,
        kind=row.kind,
        number=row.number,
        issuer=row.issuer,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        verified_at=row.verified_at,
        verified_by=row.verified_by,
        certificate_sha256=row.certificate_sha256,
        status=status,
        revoked_at=row.revoked_at,
        revoked_reason=row.revoked_reason,
        created_at=row.created_at,
    )


def _ring_record(row: AgentRing) -> RingRecord:
    outcome = next((o for o in RING_OUTCOMES if o == row.outcome), None)
    return RingRecord(row.id, row.call_id, row.account_id, row.node, row.rung_at, row.ended_at, outcome)


# --- the reservation statements ---------------------------------------------------------------------------------


def _reserve_statement(groups: int, *, excluding: bool = False) -> Update:
    """The conditional UPDATE of :meth:`AgentStore.reserve` for ``groups`` credential groups.

    Built once with bound parameters (``agent``, ``call``, ``node``, ``at``, ``kinds0`` …; not column names, which
    an UPDATE reserves for itself), so a reservation costs the round trip rather than building the expression.
    """
    at = bindparam("at", type_=UTCDateTime())
    conditions = [
        AgentRow.account_id == bindparam("agent"),
        AgentRow.reserved_call_id.is_(None),
        AgentRow.paused_reason.is_(None),
        exists().where(Account.id == AgentRow.account_id, Account.frozen == false()),
    ]
    for index in range(groups):
        conditions.append(
            exists().where(
                CredentialRow.account_id == AgentRow.account_id,
                CredentialRow.kind.in_(bindparam(f"kinds{index}", expanding=True)),
                CredentialRow.status == "active",
                CredentialRow.verified_at.is_not(None),
                CredentialRow.verified_at <= at,
                CredentialRow.valid_from <= at,
                CredentialRow.valid_until > at,
            )
        )
    if excluding:
        # Surge mode's overflow agents: the agent holds no valid credential of the excluded kinds.
        conditions.append(
            ~exists().where(
                CredentialRow.account_id == AgentRow.account_id,
                CredentialRow.kind.in_(bindparam("excluded", expanding=True)),
                CredentialRow.status == "active",
                CredentialRow.verified_at.is_not(None),
                CredentialRow.verified_at <= at,
                CredentialRow.valid_from <= at,
                CredentialRow.valid_until > at,
            )
        )
    return (
        update(AgentRow)
        .where(*conditions)
        .values(reserved_call_id=bindparam("call"), reserved_by=bindparam("node"), reserved_at=at)
    )


def _reservation(
    account_id: str,
    call_id: str,
    node: str,
    at: datetime,
    required: Sequence[Sequence[str]],
    *,
    excluded: Sequence[str] = (),
) -> tuple[Update, dict[str, object]]:
    """The checked statement and parameters of one reservation (see :meth:`AgentStore.reserve`)."""
    _check_call_id(call_id)
    _check_node(node)
    _aware(at)
    groups = [tuple(group) for group in required]
    for group in groups:
        if not group:
            raise AgentError("a required credential group is empty: it could never be met")
        for kind in group:
            _check_name(kind, "credential kind")
    for kind in excluded:
        _check_name(kind, "excluded credential kind")
    parameters: dict[str, object] = {"agent": account_id, "call": call_id, "node": node, "at": at}
    parameters.update({f"kinds{index}": list(group) for index, group in enumerate(groups)})
    cached = _RESERVE_EXCLUDING if excluded else _RESERVE
    if excluded:
        parameters["excluded"] = list(excluded)
    statement = (
        cached[len(groups)] if len(groups) < len(cached) else _reserve_statement(len(groups), excluding=bool(excluded))
    )
    return statement, parameters


# Immutable statements, shared by every store: rules rarely need more than two credential groups.
_RESERVE: Final = tuple(_reserve_statement(groups) for groups in range(4))
_RESERVE_EXCLUDING: Final = tuple(_reserve_statement(groups, excluding=True) for groups in range(4))
_RING: Final = (
    insert(AgentRing)
    .values(
        call_id=bindparam("call"),
        account_id=bindparam("agent"),
        node=bindparam("node"),
        rung_at=bindparam("at", type_=UTCDateTime()),
    )
    .returning(AgentRing.id)
)
_RELEASE: Final = (
    update(AgentRow)
    .where(AgentRow.account_id == bindparam("agent"), AgentRow.reserved_call_id == bindparam("call"))
    .values(reserved_call_id=None, reserved_by=None, reserved_at=None)
)


# --- the repository --------------------------------------------------------------------------------------------


class AgentStore(Repository):
    """Reads and writes ``agents``, ``agent_skills``, ``credentials`` and ``agent_rings``.

    ``reservations``: the sessions :meth:`reserve_ring` commits on, when they differ from the others
    (``ground.db.make_reservation_sessionmaker``: on SQLite a commit that does not wait for the disk);
    ``at_once``: the writer of ``reserve_ring(..., wait=False)`` (``ground.db_at_once.make_at_once_writer``:
    on SQLite, waiting neither for the disk nor for a lock; None: every such call raises WouldWait).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        reservations: sessionmaker[Session] | None = None,
        at_once: AtOnceWriter | None = None,
    ) -> None:
        super().__init__(sessions)
        self._reservations = reservations
        self._at_once = at_once

    # -- agents -----------------------------------------------------------------------------------------------
    def add_agent(
        self,
        account_id: str,
        endpoint: str,
        at: datetime,
        *,
        contact: str | None = None,
        languages: Sequence[str] = ("zh",),
        skills: Mapping[str, int] | None = None,
    ) -> AgentView:
        """Make an existing account an agent (create it first with ``compliance.accounts.AccountStore.add``)."""
        fields = _AgentFields.check(endpoint, at, contact, languages, skills)
        with self._transaction(f"adding agent {account_id}") as session:
            if session.get(Account, account_id) is None:
                raise AgentError(f"no account {account_id!r}: create the account first (`medhotline agents add`)")
            return self._insert_agent(session, account_id, at, fields)

    def add_agent_with_account(
        self,
        account_id: str,
        display_name: str,
        roles: Iterable[str],
        endpoint: str,
        at: datetime,
        *,
        departments: Iterable[str] = (),
        contact: str | None = None,
        languages: Sequence[str] = ("zh",),
        skills: Mapping[str, int] | None = None,
    ) -> AgentView:
        """Create the account and the agent in one transaction: either both exist afterwards or neither does."""
        account = new_account_row(account_id, display_name, roles, at, departments)
        fields = _AgentFields.check(endpoint, at, contact, languages, skills)
        with self._transaction(f"adding account and agent {account_id}") as session:
            if session.get(Account, account_id) is not None:
                raise AgentError(f"account {account_id} already exists (ids are never reused)")
            session.add(account)
            session.flush()
            return self._insert_agent(session, account_id, at, fields)

    def set_contact(self, account_id: str, contact: str | None, at: datetime) -> AgentView:
        """Where the agent's phone is reached without registering (None: it registers with the PBX)."""
        checked = _check_contact(contact)
        _aware(at)
        with self._transaction(f"setting the contact of agent {account_id}") as session:
            row = self._agent_row(session, account_id, lock=True)
            row.contact = checked
            row.updated_at = at
            session.flush()
            return self._views(session, account_id)[0]

    def set_skills(self, account_id: str, skills: Mapping[str, int], at: datetime) -> AgentView:
        """Replace the agent's skills with ``skills`` (an empty mapping removes them all)."""
        checked = check_skills(skills)
        _aware(at)
        with self._transaction(f"setting the skills of agent {account_id}") as session:
            row = self._agent_row(session, account_id)
            for skill in session.scalars(select(AgentSkill).where(AgentSkill.account_id == account_id)):
                session.delete(skill)
            session.flush()
            session.add_all(AgentSkill(account_id=account_id, skill=s, proficiency=p) for s, p in checked.items())
            row.updated_at = at
            session.flush()
            return self._views(session, account_id)[0]

    def view(self, account_id: str) -> AgentView:
        with self._transaction(f"reading agent {account_id}") as session:
            views = self._views(session, account_id)
            if not views:
                raise AgentError(f"no agent {account_id!r}")
            return views[0]

    def routing_snapshot(self) -> list[AgentView]:
        """Every agent, ordered by id, in three queries (agents with accounts, skills, credentials)."""
        with self._transaction("reading the routing snapshot") as session:
            return self._views(session, None)

    def pause(self, account_id: str, reason: str, at: datetime) -> None:
        """No new call until :meth:`unpause`; a reservation already held is left to its call to release."""
        text = _reason(reason, "pause reason")
        _aware(at)
        with self._transaction(f"pausing agent {account_id}") as session:
            row = self._agent_row(session, account_id, lock=True)
            row.paused_reason = text
            row.paused_at = at
            row.updated_at = at

    def unpause(self, account_id: str, at: datetime) -> None:
        _aware(at)
        with self._transaction(f"unpausing agent {account_id}") as session:
            row = self._agent_row(session, account_id, lock=True)
            if row.paused_reason is not None:
                row.paused_reason = None
                row.paused_at = None
                row.updated_at = at

    def set_presence(self, endpoint: str, reason: str | None, at: datetime) -> bool:
        """Record why the phone of the agent on ``endpoint`` cannot be rung (None: it can), for the wallboard.

        One conditional UPDATE: nothing is written when the stored reason is already ``reason``, so nodes that
        report the same change do not fight; ``offline_since`` keeps the first report. True: a row changed.
        """
        _aware(at)
        if reason is not None:
            reason = _reason(reason, "offline reason")
        statement = (
            update(AgentRow)
            .where(AgentRow.endpoint == endpoint, AgentRow.offline_reason.is_distinct_from(reason))
            .values(offline_reason=reason, offline_since=None if reason is None else at)
        )
        with self._transaction(f"recording the presence of endpoint {endpoint}") as session:
            return rowcount(session.execute(statement)) > 0

    # -- reservation ------------------------------------------------------------------------------------------
    def reserve(
        self,
        account_id: str,
        call_id: str,
        node: str,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
    ) -> bool:
        """Take the agent for ``call_id`` if, at ``at``, nobody holds them, they are not paused, their account is
        not frozen and every group in ``required`` is met by one of their credentials that is active, verified
        (``verified_at <= at``) and valid (``valid_from <= at < valid_until``), and none of their valid
        credentials is of a kind in ``excluded`` (surge mode's overflow agents, for calls they may not take).

        All of it is the WHERE of one UPDATE, so the check and the take cannot be separated by another node:
        True means this call holds the agent; False means it does not (already held, even by this very call;
        paused; frozen; unqualified; or no such agent) and nothing was changed.
        """
        statement, parameters = _reservation(account_id, call_id, node, at, required, excluded=excluded)
        return self._update(statement, f"reserving agent {account_id} for call {call_id}", parameters) == 1

    def reserve_ring(
        self,
        account_id: str,
        call_id: str,
        node: str,
        at: datetime,
        required: Sequence[Sequence[str]] = (),
        *,
        excluded: Sequence[str] = (),
        wait: bool = True,
    ) -> int | None:
        """:meth:`reserve` and :meth:`record_ring` in one transaction: the ring's id, or None when the agent could
        not be reserved (and nothing was written).

        One commit instead of two on the way to the agent's phone; and a ring row exists exactly when its
        reservation was taken. ``wait=False``: for the routing engine's event loop, through the ``at_once`` writer;
        WouldWait (nothing written) if that would mean waiting for another writer or a database over the network.
        """
        doing = f"reserving agent {account_id} for call {call_id}"
        at_once = self._at_once
        if not wait and at_once is None:
            raise WouldWait(f"database at {self._where}: {doing} would wait: the database is not a local file")
        statement, parameters = _reservation(account_id, call_id, node, at, required, excluded=excluded)
        # A prepared Core insert: this is on the way to the agent's phone; neither the ORM's unit of work nor
        # building and compiling a statement per ring is needed.
        ring = {"agent": account_id, "call": call_id, "node": node, "at": at}
        if not wait and at_once is not None:
            # Straight through the driver (ground.db_at_once): the same statements, without SQLAlchemy's execution
            # path, which was most of a reservation's time on the event loop.
            with at_once.transaction(doing) as writes:
                if writes.execute(statement, parameters).rowcount != 1:
                    return None
                return int(writes.execute(_RING, ring).fetchone()[0])
        with self._core_transaction(doing, self._reservations) as connection:
            if rowcount(connection.execute(statement, parameters)) != 1:
                return None
            return int(connection.execute(_RING, ring).scalar_one())

    def release(self, account_id: str, call_id: str) -> bool:
        """Drop the reservation if (and only if) it is held for ``call_id``; True if it was."""
        _check_call_id(call_id)
        parameters = {"agent": account_id, "call": call_id}
        return self._update(_RELEASE, f"releasing agent {account_id} from call {call_id}", parameters) == 1

    def release_node(self, node: str) -> int:
        """Drop every reservation ``node`` holds (at its start, after a crash); returns how many there were."""
        _check_node(node)
        statement = (
            update(AgentRow)
            .where(AgentRow.reserved_by == node)
            .values(reserved_call_id=None, reserved_by=None, reserved_at=None)
        )
        return self._update(statement, f"releasing the reservations of node {node}")

    # -- credentials ------------------------------------------------------------------------------------------
    def add_credential(  # noqa: PLR0917 (the interface the telephony side codes against)
        self,
        account_id: str,
        kind: str,
        number: str,
        issuer: str,
        valid_from: datetime,
        valid_until: datetime,
        at: datetime,
        *,
        certificate_sha256: str | None = None,
    ) -> int:
        """Record a credential, unverified (it counts for routing only once :meth:`verify_credential` ran)."""
        _check_name(kind, "credential kind")
        number = _text(number, "credential number", 64)
        issuer = _text(issuer, "credential issuer", 128)
        _aware(valid_from, "valid_from")
        _aware(valid_until, "valid_until")
        _aware(at)
        if valid_from >= valid_until:
            raise AgentError(
                f"credential {kind} of {account_id}: valid until {valid_until.isoformat()} is not after "
                f"valid from {valid_from.isoformat()}"
            )
        digest = _check_sha256(certificate_sha256)
        with self._transaction(f"adding a {kind} credential to {account_id}") as session:
            if session.get(Account, account_id) is None:
                raise AgentError(f"no account {account_id!r}")
            row = CredentialRow(
                account_id=account_id,
                kind=kind,
                number=number,
                issuer=issuer,
                valid_from=valid_from,
                valid_until=valid_until,
                certificate_sha256=digest,
                status="active",
                created_at=at,
            )
            session.add(row)
            session.flush()
            return row.id

    def verify_credential(self, credential_id: int, verified_by: str, at: datetime) -> None:
        """Mark a credential checked against its certificate, by an account other than its holder.

        The verifier must be an existing account that is not frozen; nobody verifies their own licence.
        Verifying again (re-verification) records the new time and verifier.
        """
        _aware(at)
        with self._transaction(f"verifying credential {credential_id}") as session:
            row = self._credential_row(session, credential_id)
            if row.status == "revoked":
                raise AgentError(f"credential {credential_id} is revoked; record the renewed credential instead")
            if verified_by == row.account_id:
                raise AgentError(f"credential {credential_id}: {verified_by} cannot verify their own credential")
            verifier = session.get(Account, verified_by)
            if verifier is None:
                raise AgentError(f"credential {credential_id}: verifier {verified_by!r} is not an account")
            if verifier.frozen:
                raise AgentError(f"credential {credential_id}: verifier {verified_by} is frozen")
            row.verified_at = at
            row.verified_by = verified_by

    def revoke_credential(self, credential_id: int, reason: str, at: datetime) -> None:
        """Revoked at once: the next :meth:`reserve` that needs it fails. The row is kept as evidence."""
        text = _reason(reason, "revocation reason")
        _aware(at)
        with self._transaction(f"revoking credential {credential_id}") as session:
            row = self._credential_row(session, credential_id)
            if row.status == "revoked":
                raise AgentError(f"credential {credential_id} is already revoked")
            row.status = "revoked"
            row.revoked_at = at
            row.revoked_reason = text

    def credential(self, credential_id: int) -> CredentialRecord:
        with self._transaction(f"reading credential {credential_id}") as session:
            return _credential_record(self._credential_row(session, credential_id, lock=False))

    def credentials(self, account_id: str | None = None) -> list[CredentialRecord]:
        """Every credential (of one account), by account and then in the order they were added."""
        with self._transaction("listing credentials") as session:
            query = select(CredentialRow).order_by(CredentialRow.account_id, CredentialRow.id)
            if account_id is not None:
                if session.get(Account, account_id) is None:
                    raise AgentError(f"no account {account_id!r}")
                query = query.where(CredentialRow.account_id == account_id)
            return [_credential_record(row) for row in session.scalars(query)]

    # -- ring history -----------------------------------------------------------------------------------------
    def record_ring(self, call_id: str, account_id: str, node: str, at: datetime) -> int:
        _check_call_id(call_id)
        _check_node(node)
        _aware(at)
        with self._transaction(f"recording a ring of agent {account_id} for call {call_id}") as session:
            self._agent_row(session, account_id)
            row = AgentRing(call_id=call_id, account_id=account_id, node=node, rung_at=at)
            session.add(row)
            session.flush()
            return row.id

    def finish_ring(self, ring_id: int, outcome: RingOutcome, at: datetime) -> None:
        """How the ring ended; the first report wins (a hang-up racing an answer must not overwrite it)."""
        if outcome not in RING_OUTCOMES:
            raise AgentError(f"ring outcome {outcome!r}: expected one of {', '.join(RING_OUTCOMES)}")
        _aware(at)
        with self._transaction(f"finishing ring {ring_id}") as session:
            row = session.get(AgentRing, ring_id, with_for_update=True)
            if row is None:
                raise AgentError(f"no ring {ring_id}")
            if row.ended_at is not None:
                return
            if at < row.rung_at:
                raise AgentError(
                    f"ring {ring_id}: ended at {at.isoformat()} is before it rang ({row.rung_at.isoformat()})"
                )
            row.ended_at = at
            row.outcome = outcome

    def abandon_rings(self, node: str, at: datetime) -> int:
        """Close ``node``'s rings that never ended (outcome "failed"); with :meth:`release_node` after a crash."""
        _check_node(node)
        _aware(at)
        statement = (
            update(AgentRing)
            .where(AgentRing.node == node, AgentRing.ended_at.is_(None))
            .values(ended_at=at, outcome="failed")
        )
        return self._update(statement, f"closing the open rings of node {node}")

    def rings(self, call_id: str) -> list[RingRecord]:
        """Every ring for the call, in the order they happened."""
        with self._transaction(f"reading the rings of call {call_id}") as session:
            query = select(AgentRing).where(AgentRing.call_id == call_id).order_by(AgentRing.rung_at, AgentRing.id)
            return [_ring_record(row) for row in session.scalars(query)]

    def ring_counts(self, account_id: str) -> dict[str, int]:
        """Rings of one agent by outcome ("ringing" for rings not ended yet)."""
        with self._transaction(f"counting the rings of agent {account_id}") as session:
            self._agent_row(session, account_id)
            query = (
                select(AgentRing.outcome, func.count())
                .where(AgentRing.account_id == account_id)
                .group_by(AgentRing.outcome)
            )
            return {outcome or "ringing": int(count) for outcome, count in session.execute(query)}

    # -- internals --------------------------------------------------------------------------------------------
    def _insert_agent(self, session: Session, account_id: str, at: datetime, fields: _AgentFields) -> AgentView:
        endpoint = fields.endpoint
        if session.get(AgentRow, account_id) is not None:
            raise AgentError(f"agent {account_id} already exists")
        holder = session.scalar(select(AgentRow.account_id).where(AgentRow.endpoint == endpoint))
        if holder is not None:
            raise AgentError(f"endpoint {endpoint!r} is already used by agent {holder}")
        session.add(
            AgentRow(
                account_id=account_id,
                endpoint=endpoint,
                contact=fields.contact,
                languages=",".join(fields.languages),
                created_at=at,
                updated_at=at,
            )
        )
        session.flush()
        session.add_all(AgentSkill(account_id=account_id, skill=s, proficiency=p) for s, p in fields.skills.items())
        session.flush()
        return self._views(session, account_id)[0]

    @staticmethod
    def _agent_row(session: Session, account_id: str, *, lock: bool = False) -> AgentRow:
        row = session.get(AgentRow, account_id, with_for_update=lock)
        if row is None:
            raise AgentError(f"no agent {account_id!r}")
        return row

    @staticmethod
    def _credential_row(session: Session, credential_id: int, *, lock: bool = True) -> CredentialRow:
        row = session.get(CredentialRow, credential_id, with_for_update=lock)
        if row is None:
            raise AgentError(f"no credential {credential_id}")
        return row

    def _update(self, statement: Update, doing: str, parameters: Mapping[str, object] | None = None) -> int:
        with self._transaction(doing) as session:
            return rowcount(session.connection().execute(statement, parameters))

    @staticmethod
    def _views(session: Session, account_id: str | None) -> list[AgentView]:
        """Agents with their accounts, skills and credentials: three queries whatever the number of agents.

        Plain column tuples rather than ORM objects: the snapshot runs on every node twice a second.
        """
        agents = (
            select(
                AgentRow.account_id,
                AgentRow.endpoint,
                AgentRow.contact,
                AgentRow.languages,
                AgentRow.paused_reason,
                AgentRow.reserved_call_id,
                AgentRow.reserved_by,
                Account.display_name,
                Account.roles,
                Account.departments,
                Account.frozen,
            )
            .join(Account, Account.id == AgentRow.account_id)
            .order_by(AgentRow.account_id)
        )
        skills = select(AgentSkill.account_id, AgentSkill.skill, AgentSkill.proficiency)
        credentials = (
            select(
                CredentialRow.account_id,
                CredentialRow.kind,
                CredentialRow.number,
                CredentialRow.valid_from,
                CredentialRow.valid_until,
                CredentialRow.verified_at,
                CredentialRow.status,
            )
            .join(AgentRow, AgentRow.account_id == CredentialRow.account_id)
            .order_by(CredentialRow.id)
        )
        if account_id is not None:
            agents = agents.where(AgentRow.account_id == account_id)
            skills = skills.where(AgentSkill.account_id == account_id)
            credentials = credentials.where(CredentialRow.account_id == account_id)
        connection = session.connection()  # Core rows: no ORM loading layer for plain columns
        agent_rows = connection.execute(agents).all()
        if not agent_rows:
            return []
        skills_of: dict[str, dict[str, int]] = defaultdict(dict)
        for owner, skill, level in connection.execute(skills).all():
            skills_of[owner][skill] = level
        credentials_of: dict[str, list[Credential]] = defaultdict(list)
        for owner, kind, number, valid_from, valid_until, verified_at, status in connection.execute(credentials).all():
            state: CredentialStatus = "revoked" if status == "revoked" else "active"
            credentials_of[owner].append(Credential(kind, number, valid_from, valid_until, verified_at, state))
        views = []
        for row in agent_rows:
            agent = Agent(
                id=row.account_id,
                endpoint=row.endpoint,
                roles=frozenset(r for r in row.roles.split(",") if r),
                credentials=tuple(credentials_of.get(row.account_id, ())),
                skills=MappingProxyType(skills_of.get(row.account_id, {})),
                frozen=bool(row.frozen),
            )
            views.append(
                AgentView(
                    agent=agent,
                    contact=row.contact,
                    languages=tuple(lang for lang in row.languages.split(",") if lang),
                    departments=frozenset(d for d in row.departments.split(",") if d),
                    display_name=row.display_name,
                    paused_reason=row.paused_reason,
                    reserved_call_id=row.reserved_call_id,
                    reserved_by=row.reserved_by,
                )
            )
        return views
