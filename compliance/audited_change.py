"""A change and its audit entry: the entry is validated before the change is made and appended after it succeeded.

Used for permission changes (accounts, credentials) and mode switches (surge): an entry the audit log would
refuse stops the operation with nothing changed; a log that fails after the change says so plainly, because the
change can't be undone silently.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from sqlalchemy.exc import SQLAlchemyError

from compliance.audit import AuditEntry, AuditError

if TYPE_CHECKING:
    from compliance.audit import AuditAction, AuditLog, JsonValue

ADMIN_ROLE: Final = "admin"


class AuditedChange:
    """Validate the entry now (AuditError, nothing changed); ``done()`` appends it once the change is stored."""

    def __init__(
        self,
        log: AuditLog,
        *,
        actor: str,
        action: AuditAction,
        reason: str,
        details: dict[str, JsonValue],
        role: str = ADMIN_ROLE,
    ) -> None:

        self._log, self._actor, self._action, self._reason, self._details = log, actor, action, reason, details
        self._role = role
        try:
            AuditEntry(0, datetime.now(UTC), actor, role, action, "success", None, reason, details)
        except AuditError as exc:
            raise AuditError(f"the audit log would refuse this change's entry, so nothing was changed: {exc}") from None

    def done(self) -> None:
        """Append the entry; AuditError if the log fails (the change stands)."""
        try:
            self._log.append(
                actor=self._actor,
                role=self._role,
                action=self._action,
                outcome="success",
                reason=self._reason,
                details=self._details,
            )
        except (AuditError, SQLAlchemyError) as exc:
            # First line only: SQLAlchemy appends the statement and its parameters.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AuditError(f"the change was made but its audit entry could not be written: {reason}") from None
