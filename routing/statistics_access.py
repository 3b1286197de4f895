"""Reading the queue and agent statistics behind the access policy: allowed, audited, then read.

``medhotline stats`` only parses, calls :meth:`StatisticsDesk.read` and prints. The desk asks the one access
policy (``compliance.access``, record kind ``statistics``; a refusal is audited by the policy), appends the read's
own entry with the window in the hospital's local time, the grouping and the form of the output, and only then
reads the records (:class:`routing.statistics_store.StatsStore`). Nothing is read when either step fails. The call
notes' times come from recordings through the :data:`NoteTimes` reader the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from compliance.access import Resource
from compliance.access_records import AccessDenied
from compliance.access_store import AccessControl
from compliance.audit import AuditError, AuditLog, SqlAuditStore
from ground.clock import HOSPITAL_TZ, HOSPITAL_TZ_NAME
from ground.errors import CommandError
from routing.statistics_store import StatsStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

    from compliance.audit import JsonValue
    from routing.statistics import StatsRecords
    from routing.statistics_store import NoteTimes

__all__ = ["StatisticsDesk", "StatsRequest"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _moment(at: datetime) -> list[JsonValue]:
    """A local time for the audit log, as [year, month, day, hour, minute]: the log refuses date-like text."""
    local = at.astimezone(HOSPITAL_TZ)
    return [local.year, local.month, local.day, local.hour, local.minute]


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Who asks for which window, grouped how, in which form; ``export`` when it leaves as CSV or a file."""

    account: str
    start: datetime
    end: datetime
    by: str
    format: str
    chart: bool
    export: bool
    reason: str | None


@dataclass
class StatisticsDesk:
    """The statistics' records for an allowed, audited request."""

    access: AccessControl
    audit: AuditLog
    store: StatsStore
    clock: Callable[[], datetime] = field(default=_utc_now)

    @classmethod
    def for_engine(cls, engine: Engine) -> StatisticsDesk:
        audit = AuditLog(SqlAuditStore(engine))
        return cls(AccessControl.for_engine(engine, audit), audit, StatsStore.for_engine(engine))

    def read(self, request: StatsRequest, notes: NoteTimes) -> StatsRecords:
        """The records of the window; CommandError (nothing read) when refused or when the log can't record it."""
        self.authorize(request)
        return self.store.records(request.start, request.end, notes)

    def authorize(self, request: StatsRequest) -> None:
        """The access policy, then the read's own audit entry (window, grouping, format)."""
        action: Literal["read", "export"] = "export" if request.export else "read"
        try:
            decision = self.access.authorize(request.account, action, Resource("statistics"), self.clock(),
                                             reason=request.reason, record_allowed=False)  # fmt: skip
        except AccessDenied as exc:
            raise CommandError(str(exc)) from None
        details: dict[str, JsonValue] = {
            "kind": "statistics", "by": request.by, "format": request.format, "chart": request.chart,
            "window": {"from": _moment(request.start), "to": _moment(request.end), "zone": HOSPITAL_TZ_NAME},
        }  # fmt: skip
        try:
            self.audit.append(actor=request.account, role=decision.role or "unknown", action=action,
                              outcome="success", reason=(request.reason or "").strip(), details=details)  # fmt: skip
        except AuditError as exc:
            raise CommandError(f"statistics not shown: the audit log could not record the read: {exc}") from None
