"""The parts outreach is made of share one core: configuration, sessions, policy, clock, stores and the patient
registry once it is connected (see :mod:`scheduler.outreach`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from compliance.audit import AuditLog
from ground.config import Config
from scheduler.policy import DialPolicy
from scheduler.ports import OutreachPatients
from scheduler.store import AttemptStore, PlanStore
from scheduler.tasks import TaskStore
from telephony.ports import HisMessages, OutreachUnavailable

SYSTEM_ACTOR: Final = "scheduler"
SYSTEM_ROLE: Final = "system"


@dataclass
class OutreachCore:
    """What every part of outreach reads: one per service node, shared by the dialer, the call actions and the
    notifications, so a registry connected once is seen by all of them."""

    config: Config
    sessions: sessionmaker[Session]
    policy: DialPolicy
    clock: Callable[[], datetime]
    plans: PlanStore
    attempts: AttemptStore
    tasks: TaskStore
    patients: OutreachPatients | None = None
    # The HIS (his.producer.HisOutbound) when ``his.enabled``: bookings, readings and reported vaccinations go
    # to it through its outbox; None: the hotline's own records are the only ones.
    his: HisMessages | None = None


class OutreachPart:
    """Base of the parts: the core's fields under the names the parts' methods use."""

    def __init__(self, core: OutreachCore) -> None:
        self.core = core
        self._config = core.config
        self._sessions = core.sessions
        self.policy = core.policy
        self._clock = core.clock
        self.plans = core.plans
        self.attempts = core.attempts
        self.tasks = core.tasks

    @property
    def _patients(self) -> OutreachPatients | None:
        return self.core.patients

    def _services(self) -> OutreachPatients:
        if self.core.patients is None:
            raise OutreachUnavailable("the patient registry is not connected yet (key service)")
        return self.core.patients

    def _audit(self) -> AuditLog:
        return self._services().audit

    async def patient_record(self, patient_id: str, reason: str) -> Any:
        return await self._services().registry.get(patient_id, accessor=SYSTEM_ACTOR, role=SYSTEM_ROLE, reason=reason)
