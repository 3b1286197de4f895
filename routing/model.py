"""Plain values the router works on: credentials, agents and call requests (no I/O, no clock)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from telephony.consult import RouteCategory

CallPriority = Literal["emergency", "normal"]
CredentialStatus = Literal["active", "revoked"]


@dataclass(frozen=True, slots=True)
class Credential:
    """A professional credential (licence) of an agent, e.g. ``physician_license``."""

    kind: str
    number: str
    valid_from: datetime
    valid_until: datetime
    verified_at: datetime | None
    status: CredentialStatus = "active"

    def is_valid(self, at: datetime) -> bool:
        """Verified (no later than ``at``), active, and ``valid_from <= at < valid_until``."""
        return (
            self.status == "active"
            and self.verified_at is not None
            and self.verified_at <= at
            and self.valid_from <= at < self.valid_until
        )


@dataclass(frozen=True, slots=True)
class Agent:
    """Someone who answers calls. ``skills`` maps a skill name to a proficiency from 1 to 5."""

    id: str
    endpoint: str
    roles: frozenset[str] = frozenset()
    credentials: tuple[Credential, ...] = ()
    skills: Mapping[str, int] = field(default_factory=dict)
    frozen: bool = False

    def __post_init__(self) -> None:
        for name, level in self.skills.items():
            if not 1 <= level <= 5:
                raise ValueError(f"agent {self.id}: skill {name!r} has proficiency {level}, expected 1 to 5")

    def valid_credential_kinds(self, at: datetime) -> frozenset[str]:
        return frozenset(c.kind for c in self.credentials if c.is_valid(at))


@dataclass(frozen=True, slots=True)
class CallRequest:
    """A call (or a callback request) waiting for an agent; ``enqueued_at`` is its place in the queue."""

    call_id: str
    category: RouteCategory
    priority: CallPriority
    enqueued_at: datetime
    callback: bool = False
