"""The credential validity report: what is expired, expiring soon, unverified or revoked, per agent.

Sans I/O: :func:`validity_report` works on :class:`~routing.store.CredentialRecord` values or
:class:`~routing.store.AgentView` snapshots (or anything with a ``credentials()`` method that returns records,
such as an ``AgentStore``), at a given moment. The service runs it daily and logs :meth:`ValidityReport.summary`;
``medhotline credentials check`` prints it and exits non-zero when something needs a person's attention.

Routing does not wait for this report: every reservation checks validity in the database at that moment
(``AgentStore.reserve``). The report is there so that people renew licences *before* they lapse.

A credential that a renewal of the same kind takes over from is not reported: once a newer verified credential
of that kind is valid from no later than the old one's end (or than now, if it already ended), the old one is
"superseded". Otherwise an expired credential stays in the report until it is renewed or revoked, so an alert
cannot silently stop while the agent is still unqualified.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final, Literal, Protocol, runtime_checkable

from routing.model import Credential
from routing.store import AgentView, CredentialRecord

__all__ = [
    "CredentialIssue",
    "CredentialSource",
    "Problem",
    "ValidityReport",
    "credential_state",
    "validity_report",
]

Problem = Literal["expired", "expiring", "unverified", "revoked", "not_yet_valid"]
# Problems that need a person to act (renew, verify); revoked and not-yet-valid credentials are listed only.
ACTIONABLE: Final[frozenset[Problem]] = frozenset({"expired", "expiring", "unverified"})
_DAY: Final = timedelta(days=1)


@runtime_checkable
class CredentialSource(Protocol):
    """Anything that lists credential records, e.g. ``routing.store.AgentStore``."""

    def credentials(self, account_id: str | None = None) -> list[CredentialRecord]: ...


@dataclass(frozen=True, slots=True)
class CredentialIssue:
    account_id: str
    credential_id: int | None  # None when the report was built from AgentViews (which carry no row ids)
    kind: str
    number: str
    problem: Problem
    valid_from: datetime
    valid_until: datetime
    days_left: int  # whole days until valid_until (negative once expired)

    def describe(self, tz: tzinfo = UTC) -> str:
        """One line; dates are shown in ``tz`` (the CLI shows China Standard Time)."""
        ident = f"#{self.credential_id} " if self.credential_id is not None else ""
        what = {
            "expired": f"expired {-self.days_left} day(s) ago",
            "expiring": f"expires in {self.days_left} day(s)",
            "unverified": "not verified",
            "revoked": "revoked",
            "not_yet_valid": "not valid yet",
        }[self.problem]
        until = self.valid_until.astimezone(tz)
        return f"{self.account_id}: {ident}{self.kind} {self.number} {what} (valid until {until:%Y-%m-%d})"


@dataclass(frozen=True, slots=True)
class ValidityReport:
    at: datetime
    within_days: int
    agents: int
    credentials: int
    issues: tuple[CredentialIssue, ...] = field(default_factory=tuple)

    def of(self, problem: Problem) -> tuple[CredentialIssue, ...]:
        return tuple(i for i in self.issues if i.problem == problem)

    @property
    def expired(self) -> tuple[CredentialIssue, ...]:
        return self.of("expired")

    @property
    def expiring(self) -> tuple[CredentialIssue, ...]:
        return self.of("expiring")

    @property
    def unverified(self) -> tuple[CredentialIssue, ...]:
        return self.of("unverified")

    @property
    def revoked(self) -> tuple[CredentialIssue, ...]:
        return self.of("revoked")

    @property
    def not_yet_valid(self) -> tuple[CredentialIssue, ...]:
        return self.of("not_yet_valid")

    @property
    def needs_attention(self) -> bool:
        """Something is expired, expires within ``within_days`` or waits for verification."""
        return any(i.problem in ACTIONABLE for i in self.issues)

    def by_agent(self) -> dict[str, list[CredentialIssue]]:
        grouped: dict[str, list[CredentialIssue]] = defaultdict(list)
        for issue in self.issues:
            grouped[issue.account_id].append(issue)
        return dict(sorted(grouped.items()))

    def summary(self, tz: tzinfo = UTC) -> str:
        """One line, for a log or a cron mail subject (no licence numbers)."""
        return (
            f"credentials at {self.at.astimezone(tz):%Y-%m-%d %H:%M %Z}: {len(self.expired)} expired, "
            f"{len(self.expiring)} expiring within {self.within_days} days, {len(self.unverified)} unverified, "
            f"{len(self.revoked)} revoked, {len(self.not_yet_valid)} not valid yet "
            f"(of {self.credentials} credential(s) of {self.agents} account(s))"
        )

    def lines(self, tz: tzinfo = UTC) -> list[str]:
        """One line per issue, grouped by agent, actionable problems first within each agent."""
        order: dict[Problem, int] = {"expired": 0, "expiring": 1, "unverified": 2, "not_yet_valid": 3, "revoked": 4}
        out: list[str] = []
        for issues in self.by_agent().values():
            out.extend(i.describe(tz) for i in sorted(issues, key=lambda i: (order[i.problem], i.valid_until)))
        return out


def credential_state(credential: Credential, at: datetime, within_days: int = 30) -> str:
    """A short human state of one credential at ``at``: valid, expiring in N days, expired, unverified, …"""
    if credential.status == "revoked":
        return "revoked"
    if credential.valid_until <= at:
        return "expired"
    if credential.verified_at is None or credential.verified_at > at:
        return "unverified"
    if at < credential.valid_from:
        return "not valid yet"
    left = _days_left(credential.valid_until, at)
    if credential.valid_until <= at + timedelta(days=within_days):
        return f"valid, expires in {left} day(s)"
    return "valid"


def validity_report(
    store_or_views: CredentialSource | Iterable[CredentialRecord] | Iterable[AgentView],
    at: datetime,
    within_days: int = 30,
) -> ValidityReport:
    """Classify every credential at ``at``; see the module docstring for what "superseded" means."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("validity_report needs a timezone-aware `at`")
    if within_days < 0:
        raise ValueError(f"within_days must not be negative, got {within_days}")
    entries = _entries(store_or_views)
    by_kind: dict[tuple[str, str], list[tuple[int | None, Credential]]] = defaultdict(list)
    accounts: set[str] = set()
    for account_id, credential_id, credential in entries:
        accounts.add(account_id)
        by_kind[(account_id, credential.kind)].append((credential_id, credential))
    horizon = at + timedelta(days=within_days)
    issues: list[CredentialIssue] = []
    for (account_id, _kind), group in sorted(by_kind.items()):
        for credential_id, credential in group:
            problem = _problem(credential, [c for _, c in group if c is not credential], at, horizon)
            if problem is not None:
                issues.append(
                    CredentialIssue(
                        account_id=account_id,
                        credential_id=credential_id,
                        kind=credential.kind,
                        number=credential.number,
                        problem=problem,
                        valid_from=credential.valid_from,
                        valid_until=credential.valid_until,
                        days_left=_days_left(credential.valid_until, at),
                    )
                )
    return ValidityReport(at, within_days, len(accounts), len(entries), tuple(issues))


def _days_left(until: datetime, at: datetime) -> int:
    return (until - at) // _DAY


def _superseded(credential: Credential, others: Sequence[Credential], at: datetime) -> bool:
    """A verified, active renewal of the same kind runs longer and starts before this one ends (or before now)."""
    starts_by = max(credential.valid_until, at)
    return any(
        other.status == "active"
        and other.verified_at is not None
        and other.verified_at <= at
        and other.valid_until > credential.valid_until
        and other.valid_from <= starts_by
        for other in others
    )


def _problem(credential: Credential, others: Sequence[Credential], at: datetime, horizon: datetime) -> Problem | None:
    if credential.status == "revoked":
        return "revoked"
    if _superseded(credential, others, at):
        return None
    if credential.valid_until <= at:
        return "expired"
    if credential.verified_at is None or credential.verified_at > at:
        return "unverified"
    if at < credential.valid_from:
        return "not_yet_valid"
    if credential.valid_until <= horizon:
        return "expiring"
    return None


def _entries(
    source: CredentialSource | Iterable[CredentialRecord] | Iterable[AgentView],
) -> list[tuple[str, int | None, Credential]]:
    """(account id, credential id or None, credential) for each credential in ``source``."""
    items: Iterable[CredentialRecord | AgentView] = (
        source.credentials() if isinstance(source, CredentialSource) else source
    )
    entries: list[tuple[str, int | None, Credential]] = []
    for item in items:
        if isinstance(item, AgentView):
            entries.extend((item.agent.id, None, c) for c in item.agent.credentials)
        elif isinstance(item, CredentialRecord):
            entries.append((item.account_id, item.id, item.credential))
        else:
            raise TypeError(f"validity_report: expected CredentialRecord or AgentView items, got {type(item).__name__}")
    return entries
