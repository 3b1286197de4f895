"""Access control's tables, values, errors and ports (see :mod:`compliance.access_store`): shared by its parts."""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Protocol

from sqlalchemy import CheckConstraint, ColumnElement, ForeignKey, Index, Integer, String, or_
from sqlalchemy.orm import Mapped, mapped_column

from compliance.access import (
    AccessError,
    Action,
    Decision,
    Grant,
)
from compliance.accounts import (
    AccountError,
    AccountRecord,
    check_account_id,
)
from compliance.audit import AuditAction, JsonValue
from ground.errors import MedhotlineError
from ground.models import Base, UTCDateTime
from ground.operator import operator_id

GRANT_ID: Final = re.compile(r"bg-[a-z]{12}")
SESSION_ID: Final = re.compile(r"s-[a-z]{32}")
DEFAULT_SESSION_HOURS: Final = 12
SYSTEM_ACTOR: Final = "medhotline"
# Closing, freezing and unfreezing reasons may be short ("left the hospital"); access reasons may not.
MIN_SHORT_REASON: Final = 3
_AUDITED: Final[Mapping[Action, AuditAction]] = {
    "read": "read",
    "export": "export",
    "change": "change",
    "delete": "change",
}


class AccessDenied(MedhotlineError):
    """Refused by policy. The message names who, what and why, never a patient identifier; audited already."""

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class BreakGlassError(AccessError):
    """A break-glass operation that cannot be done (unknown grant, already closed or reviewed, bad scope)."""


class AccessAuditFailed(AccessError):
    """The audit log refused or failed to record an access decision or change: the access is refused."""


def _letters(n: int) -> str:
    # Letters only: ids go into audit details, whose validation refuses long digit runs (phone-number-like).
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


class PatientRef(Protocol):
    """What access control needs to know of a patient: how the audit log names them, and their department."""

    @property
    def blind_id(self) -> str: ...

    @property
    def department(self) -> str | None: ...


class PatientDirectory(Protocol):
    """The port to the patient registry (``his.PatientStore`` satisfies it): a patient's blind id and department,
    by opaque id, without decrypting anything. Raises (a MedhotlineError) for an unknown patient."""

    def ref(self, patient_id: str) -> PatientRef: ...


# --- tables ----------------------------------------------------------------------------------------------------


class PatientAssignment(Base):
    """The account is responsible for the patient (``responsible``), or on a call with them (``call``)."""

    __tablename__ = "patient_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    # The registry's opaque patient id (hex), never a name, phone or record number.
    patient_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    call_id: Mapped[str | None] = mapped_column(String(64))
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assigned_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        CheckConstraint("kind IN ('responsible', 'call')", name="kind"),
        CheckConstraint("kind <> 'call' OR call_id IS NOT NULL", name="call_has_id"),
        CheckConstraint("ends_at IS NULL OR ends_at >= starts_at", name="period"),
        Index("ix_patient_assignments_account_patient", "account_id", "patient_id"),
        Index("ix_patient_assignments_call_id", "call_id"),
    )


class BreakGlassRow(Base):
    __tablename__ = "break_glass_grants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    # The account's session epoch when opened: a grant from before a freeze never counts again.
    account_epoch: Mapped[int] = mapped_column(Integer)
    patient_id: Mapped[str | None] = mapped_column(String(128))
    # The patient's blind id as the audit log names them, kept so the grant's end is audited alike.
    patient_ref: Mapped[str | None] = mapped_column(String(128))
    department: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(500))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(String(500))
    closed_by: Mapped[str | None] = mapped_column(String(128))
    reviewed_by: Mapped[str | None] = mapped_column(String(64), ForeignKey("accounts.id"))
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    review_verdict: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint(
            "(patient_id IS NOT NULL AND department IS NULL) OR (patient_id IS NULL AND department IS NOT NULL)",
            name="one_scope",
        ),
        CheckConstraint("expires_at > opened_at", name="period"),
        CheckConstraint(
            "(closed_at IS NULL AND close_reason IS NULL) OR (closed_at IS NOT NULL AND close_reason IS NOT NULL)",
            name="closed",
        ),
        CheckConstraint(
            "(reviewed_by IS NULL AND reviewed_at IS NULL AND review_verdict IS NULL) OR "
            "(reviewed_by IS NOT NULL AND reviewed_at IS NOT NULL AND review_verdict IN ('justified', 'unjustified'))",
            name="review",
        ),
        Index("ix_break_glass_grants_account_id", "account_id"),
        Index("ix_break_glass_grants_reviewed_at", "reviewed_at"),
    )


class AccessSession(Base):
    """A signed-in session; valid while open, unexpired and at the account's current epoch."""

    __tablename__ = "access_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    account_epoch: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_access_sessions_account_id", "account_id"),)


# --- values ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: a staff account (its role is read from the database and checked), the operator at
    the host's shell (``os:<user>``: whoever runs the CLI has database access anyway), or the service itself."""

    id: str
    kind: Literal["account", "operator", "system"] = "account"

    @classmethod
    def account(cls, account_id: str) -> Actor:
        return cls(check_account_id(account_id), "account")

    @classmethod
    def operator(cls, user: str | None = None) -> Actor:
        return cls(operator_id(user), "operator")

    @classmethod
    def system(cls) -> Actor:
        return cls(SYSTEM_ACTOR, "system")


def cli_actor(by: str | None) -> Actor:
    """The actor of a CLI change: ``--by ACCOUNT`` when given, else the OS user at the shell. An empty ``--by``
    is an account id that fails its check, not the operator (as :func:`ground.operator.actor_id`)."""
    return Actor.account(by) if by is not None else Actor.operator()


@dataclass(frozen=True, slots=True)
class BreakGlassGrant:
    id: str
    account_id: str
    account_epoch: int
    patient_id: str | None
    patient_ref: str | None
    department: str | None
    reason: str
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    close_reason: str | None
    closed_by: str | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_verdict: str | None

    @classmethod
    def from_row(cls, row: BreakGlassRow) -> BreakGlassGrant:
        return cls(
            row.id, row.account_id, row.account_epoch, row.patient_id, row.patient_ref, row.department, row.reason,
            row.opened_at,
            row.expires_at, row.closed_at, row.close_reason, row.closed_by, row.reviewed_by, row.reviewed_at,
            row.review_verdict,
        )  # fmt: skip

    def policy_grant(self) -> Grant:
        return Grant(
            self.id, self.opened_at, self.expires_at, self.patient_id, self.department, self.closed_at,
            self.account_epoch,
        )  # fmt: skip

    def is_open(self, at: datetime) -> bool:
        return self.closed_at is None and at < self.expires_at

    def scope_text(self) -> str:
        """The scope for listings: a patient grant shows only that it is one, never the patient's id."""
        return f"department {self.department}" if self.department is not None else "one patient"


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    id: int
    account_id: str
    patient_id: str
    kind: str
    call_id: str | None
    starts_at: datetime
    ends_at: datetime | None
    assigned_by: str | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    account_id: str
    account_epoch: int
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None


@dataclass(frozen=True, slots=True)
class FreezeResult:
    account: AccountRecord
    grants_closed: tuple[str, ...]
    sessions_closed: int
    calls_ended: int


def _assignment(row: PatientAssignment) -> AssignmentRecord:
    return AssignmentRecord(
        row.id, row.account_id, row.patient_id, row.kind, row.call_id, row.starts_at, row.ends_at, row.assigned_by
    )


def _active_assignment(at: datetime) -> tuple[ColumnElement[bool], ...]:
    return PatientAssignment.starts_at <= at, or_(PatientAssignment.ends_at.is_(None), PatientAssignment.ends_at > at)


def _open_grant(at: datetime) -> tuple[ColumnElement[bool], ...]:
    return BreakGlassRow.closed_at.is_(None), BreakGlassRow.expires_at > at


def _valid_account_id(account_id: str) -> bool:
    try:
        check_account_id(account_id)
    except AccountError:
        return False
    return True


def _safe_id(account_id: str) -> str:
    """The account id for messages and audit entries; a malformed one (maybe a phone number) is not repeated."""
    return account_id if _valid_account_id(account_id) else "unknown-account"


def _names(values: Iterable[str]) -> JsonValue:
    names: list[JsonValue] = [*sorted(values)]
    return names


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
