"""Staff accounts: one per person (no shared accounts), with roles, department scope and a frozen flag.

Everything that decides who may do what reads this table at the moment of the decision: the router (a frozen
agent rings no more), the access policy (a frozen account reads nothing more). Freezing is therefore effective
on the very next request, on every node, without any cache to invalidate. ``session_epoch`` goes up on every
freeze, so a session or grant issued before it is recognisably stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

from sqlalchemy import Boolean, CheckConstraint, Integer, String, false, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ground.db import DatabaseError, Repository
from ground.models import Base, UTCDateTime

Role = Literal["agent", "nurse", "pharmacist", "physician", "supervisor", "admin", "auditor"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ACCOUNT_ID = re.compile(r"^[a-z][a-z0-9_.-]{1,63}$")
DEPARTMENT = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Account ids and department names are written into audit entries, whose validation refuses anything that looks
# like a phone or record number (seven digits, possibly separated); refuse such names here, when they are chosen,
# rather than have every later audit entry about them fail.
_NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")
# Separation of duties. An administrator manages agents, flows and keys and must never see patient data; an auditor
# checks everyone and must change nothing. Either combined with another role would defeat that, so each is the
# only role of its account (a person who really holds two duties gets them one at a time, each change audited).
EXCLUSIVE_ROLES: Final[frozenset[Role]] = frozenset({"admin", "auditor"})


class AccountError(DatabaseError):
    """An account operation that cannot be done (unknown id, duplicate, bad role); the message says which."""


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(128))
    # Comma-separated, sorted; validated against ROLES / DEPARTMENT on the way in.
    roles: Mapped[str] = mapped_column(String(256))
    departments: Mapped[str] = mapped_column(String(512), default="", server_default="")
    frozen: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    frozen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    frozen_reason: Mapped[str | None] = mapped_column(String(256))
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (CheckConstraint("roles <> ''", name="has_role"),)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    id: str
    display_name: str
    roles: frozenset[Role]
    departments: frozenset[str]
    frozen: bool
    frozen_at: datetime | None
    frozen_reason: str | None
    session_epoch: int


def check_account_id(account_id: str) -> str:
    if not ACCOUNT_ID.match(account_id):
        raise AccountError(f"account id {account_id!r}: use 2-64 of a-z 0-9 _ . - starting with a letter")
    if _NUMBER_LIKE.search(account_id):
        raise AccountError(
            f"account id {account_id!r}: seven or more digits in a row look like a phone or record number and are "
            "refused by the audit log; use a name-based id (e.g. zhang.wei2)"
        )
    return account_id


def check_roles(roles: Iterable[str]) -> frozenset[Role]:
    chosen = frozenset(roles)
    unknown = sorted(chosen - set(ROLES))
    if unknown:
        raise AccountError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
    if not chosen:
        raise AccountError("an account needs at least one role")
    return frozenset(r for r in ROLES if r in chosen)


def check_departments(departments: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(departments)
    bad = sorted(d for d in chosen if not DEPARTMENT.match(d) or _NUMBER_LIKE.search(d))
    if bad:
        raise AccountError(
            f"department name(s) {', '.join(map(repr, bad))}: use a-z 0-9 _ - starting with a letter, "
            "without seven digits in a row"
        )
    return chosen


def check_separation(roles: Iterable[str]) -> frozenset[Role]:
    """The roles, validated, if they respect separation of duties (admin and auditor stand alone)."""
    chosen = check_roles(roles)
    for exclusive in sorted(EXCLUSIVE_ROLES & chosen):
        if len(chosen) > 1:
            others = ", ".join(sorted(chosen - {exclusive}))
            why = "administrators never see patient data" if exclusive == "admin" else "auditors change nothing"
            raise AccountError(
                f"role {exclusive} cannot be combined with {others}: {why} (separation of duties); "
                f"{exclusive} must be the account's only role"
            )
    return chosen


def new_account_row(
    account_id: str, display_name: str, roles: Iterable[str], at: datetime, departments: Iterable[str] = ()
) -> Account:
    """A new account, validated (id, roles with separation of duties, departments, name), not yet stored: the
    one way accounts are made, whether on their own or together with an agent."""
    check_account_id(account_id)
    chosen = check_separation(roles)
    depts = check_departments(departments)
    if not display_name.strip() or len(display_name) > 128:
        raise AccountError(f"account {account_id}: display name must be 1-128 characters")
    return Account(
        id=account_id,
        display_name=display_name.strip(),
        roles=",".join(sorted(chosen)),
        departments=",".join(sorted(depts)),
        frozen=False,
        session_epoch=0,
        created_at=at,
        updated_at=at,
    )


def _record(row: Account) -> AccountRecord:
    return AccountRecord(
        id=row.id,
        display_name=row.display_name,
        roles=check_roles(row.roles.split(",")),
        departments=frozenset(d for d in row.departments.split(",") if d),
        frozen=row.frozen,
        frozen_at=row.frozen_at,
        frozen_reason=row.frozen_reason,
        session_epoch=row.session_epoch,
    )


class AccountStore(Repository):
    def add(
        self,
        account_id: str,
        display_name: str,
        roles: Iterable[str],
        at: datetime,
        departments: Iterable[str] = (),
    ) -> AccountRecord:
        row = new_account_row(account_id, display_name, roles, at, departments)
        with self._transaction(f"adding account {account_id}") as session:
            if session.get(Account, account_id) is not None:
                raise AccountError(f"account {account_id} already exists (ids are never reused)")
            session.add(row)
            session.flush()
            return _record(row)

    def get(self, account_id: str) -> AccountRecord:
        with self._transaction(f"reading account {account_id}") as session:
            row = session.get(Account, account_id)
            if row is None:
                raise AccountError(f"no account {account_id!r}")
            return _record(row)

    def find(self, account_id: str) -> AccountRecord | None:
        with self._transaction(f"reading account {account_id}") as session:
            row = session.get(Account, account_id)
            return None if row is None else _record(row)

    def list(self) -> list[AccountRecord]:
        with self._transaction("listing accounts") as session:
            return [_record(row) for row in session.scalars(select(Account).order_by(Account.id))]

    def set_roles(self, account_id: str, roles: Iterable[str], at: datetime) -> AccountRecord:
        chosen = check_separation(roles)
        with self._transaction(f"changing roles of {account_id}") as session:
            row = self._row(session, account_id)
            row.roles = ",".join(sorted(chosen))
            row.updated_at = at
            return _record(row)

    def set_departments(self, account_id: str, departments: Iterable[str], at: datetime) -> AccountRecord:
        depts = check_departments(departments)
        with self._transaction(f"changing departments of {account_id}") as session:
            row = self._row(session, account_id)
            row.departments = ",".join(sorted(depts))
            row.updated_at = at
            return _record(row)

    def freeze(self, account_id: str, reason: str, at: datetime) -> AccountRecord:
        """Frozen at once: no routing, no data access, and every earlier session is stale (epoch + 1).

        This only flips the account; :func:`compliance.access_store.freeze_account` also closes the person's
        break-glass grants and sessions and writes the audit entries, and is what commands should call.
        """
        with self._transaction(f"freezing account {account_id}") as session:
            return _record(freeze_row(session, account_id, reason, at))

    def unfreeze(self, account_id: str, at: datetime) -> AccountRecord:
        with self._transaction(f"unfreezing account {account_id}") as session:
            row = self._row(session, account_id)
            row.frozen = False
            row.frozen_reason = None
            row.updated_at = at
            return _record(row)

    @staticmethod
    def _row(session: Session, account_id: str) -> Account:
        return locked_row(session, account_id)


def locked_row(session: Session, account_id: str) -> Account:
    """The account's row, locked for update (PostgreSQL) until the transaction ends; AccountError if unknown."""
    row = session.get(Account, account_id, with_for_update=True)
    if row is None:
        raise AccountError(f"no account {account_id!r}")
    return row


def freeze_row(session: Session, account_id: str, reason: str, at: datetime) -> Account:
    """Freeze inside the caller's transaction (so closing grants and sessions can commit with it)."""
    if not reason.strip():
        raise AccountError(f"freezing account {account_id} needs a reason")
    row = locked_row(session, account_id)
    row.frozen = True
    row.frozen_at = at
    row.frozen_reason = reason.strip()[:256]
    # Bumped even if already frozen: a second freeze (e.g. after a suspected leak) invalidates again.
    row.session_epoch += 1
    row.updated_at = at
    return row


def record_of(row: Account) -> AccountRecord:
    """A detached snapshot of an account row."""
    return _record(row)
