"""Switching surge mode on and off: the audit entry validated, the switch stored, then the entry appended.

``medhotline surge on|off`` only check the profile (with the flows), call :class:`SurgeSwitch` and print. The
switch validates its ``surge_on``/``surge_off`` entry first (:class:`compliance.audited_change.AuditedChange`: a
reason the log would refuse stops it with nothing changed), stores the switch in the mode history
(:class:`routing.callback_store.ModeStore`; every node picks it up on its next poll), and appends the entry with
the profile's name for whoever switched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compliance.audit import AuditLog, SqlAuditStore
from compliance.audited_change import AuditedChange
from ground.errors import CommandError
from routing.callback_store import ModeStore

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy import Engine

    from compliance.audit import AuditAction
    from routing.callback_store import ModeRecord
    from routing.surge import SurgeProfile

__all__ = ["SurgeSwitch"]


@dataclass
class SurgeSwitch:
    """Surge mode on with a checked profile, or off back to what was in force before; each audited."""

    modes: ModeStore
    audit: AuditLog

    @classmethod
    def for_engine(cls, engine: Engine) -> SurgeSwitch:
        return cls(ModeStore.for_engine(engine), AuditLog(SqlAuditStore(engine)))

    def on(self, profile: SurgeProfile, text: str, entry: str, *, actor: str, reason: str, at: datetime) -> ModeRecord:
        """Surge mode with ``profile`` (its YAML ``text`` and the ``entry`` flow made from it, both checked)."""
        audited = self._audited(actor, "surge_on", reason, profile.name)
        record = self.modes.surge_on(profile_name=profile.name, profile_text=text, entry_flow=entry, actor=actor,
                                     reason=reason, at=at)  # fmt: skip
        audited.done()
        return record

    def off(self, *, actor: str, reason: str, at: datetime) -> ModeRecord:
        """Back to exactly what was in force before; CommandError when surge mode is not on."""
        current = self.modes.current()
        if current is None or not current.surge:
            raise CommandError("surge mode is not on")
        audited = self._audited(actor, "surge_off", reason, current.profile_name or "")
        record = self.modes.surge_off(actor=actor, reason=reason, at=at)
        audited.done()
        return record

    def _audited(self, actor: str, action: AuditAction, reason: str, profile: str) -> AuditedChange:
        return AuditedChange(self.audit, actor=actor, action=action, reason=reason, details={"profile": profile})
