"""Legal hold and removal of recordings' audio, each step audited: the operations behind ``medhotline recordings
hold/release/delete/purge``.

The reason is checked before anything is read or written (it goes into the audit trail, so it must carry no
patient identifier). A removal's audit entry comes first: a deletion the audit log can't record does not happen
(the audit error propagates, nothing changed). Then the row is marked purged (the database refuses that before
the retention date or under hold), then the file goes; a crash between the two leaves a file the next purge
removes. If the row changed between the entry and the mark, a second entry (outcome ``error``) says the
deletion did not happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from compliance.access import check_reason
from recordings.retention import check_removal

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime
    from pathlib import Path

    from compliance.audit import AuditLog, JsonValue
    from recordings.store import RecordingRow, RecordingStore

OPERATOR_ROLE: Final = "operator"
# Files of purged rows are swept in one pass; more than this many purged rows are swept by the next purge.
_SWEEP_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What ``purge_expired`` found (``expired``) and removed (``purged``; the rest was refused, each audited)."""

    expired: list[RecordingRow]
    purged: int

    @property
    def skipped(self) -> int:
        return len(self.expired) - self.purged


class RecordingRemoval:
    """Hold, release and removal of recordings by one actor, audited in ``audit``.

    ``store_dir`` is the encrypted store (``config.recordings_store``) the rows' paths are relative to."""

    def __init__(self, store: RecordingStore, audit: AuditLog, store_dir: Path, *, actor: str) -> None:
        self._store, self._audit, self._dir, self._actor = store, audit, store_dir, actor

    def set_hold(self, recording_ids: Sequence[str], *, on: bool, reason: str, at: datetime) -> int:
        """Place (``on``) or lift a legal hold; returns how many rows changed (0: already so, or no such id).

        The audit entry is written only when something changed."""
        reason = check_reason(reason)
        changed = self._store.set_hold(recording_ids, on=on, reason=reason, by=self._actor, at=at)
        if changed:
            self._audit.append(
                actor=self._actor,
                role=OPERATOR_ROLE,
                action="legal_hold",
                outcome="success",
                reason=reason,
                details={"recordings": list(recording_ids), "hold": on},
            )
        return changed

    def remove(self, recording_id: str, *, reason: str, at: datetime) -> tuple[RecordingRow, str | None]:
        """Purge one recording's audio if retention allows: the row and the refusal (audited), or None if removed."""
        reason = check_reason(reason)
        row = self._store.get(recording_id)
        return row, self._remove(row, reason=reason, now=at)

    def purge_expired(self, *, reason: str, at: datetime, dry_run: bool = False) -> PurgeResult:
        """Remove every recording past retention and not on hold, then the leftover files of purged rows whose
        deletion a crash interrupted. ``dry_run``: only say what is expired (the reason is still checked)."""
        reason = check_reason(reason)
        rows = self._store.expired(at)
        if dry_run:
            return PurgeResult(expired=rows, purged=0)
        purged = sum(1 for row in rows if self._remove(row, reason=reason, now=at) is None)
        for row in self._store.recent(state="purged", limit=_SWEEP_LIMIT):
            if row.path is not None:
                (self._dir / row.path).unlink(missing_ok=True)
        return PurgeResult(expired=rows, purged=purged)

    def _remove(self, row: RecordingRow, *, reason: str, now: datetime) -> str | None:
        verdict = check_removal(state=row.state, retain_until=row.retain_until, legal_hold=row.legal_hold, now=now)
        details: dict[str, JsonValue] = {"recording": row.id, "call": row.call_id, "operation": "purge"}
        if not verdict.allowed:
            self._audit.append(
                actor=self._actor,
                role=OPERATOR_ROLE,
                action="denied",
                outcome="denied",
                reason=reason,
                # The refusal's code, not its text: the audit log takes no dates (they look like birth dates).
                details={**details, "why": verdict.refusal},
            )
            return verdict.explanation
        self._audit.append(
            actor=self._actor, role=OPERATOR_ROLE, action="delete", outcome="success", reason=reason, details=details
        )
        if not self._store.mark_purged(row.id, by=self._actor, at=now):
            self._audit.append(
                actor=self._actor,
                role=OPERATOR_ROLE,
                action="delete",
                outcome="error",
                reason=reason,
                details={**details, "why": "changed_meanwhile"},
            )
            return "changed meanwhile (held, or purged by someone else)"
        if row.path is not None:
            (self._dir / row.path).unlink(missing_ok=True)
        return None
