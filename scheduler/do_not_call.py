"""The do-not-call list: numbers outreach must never dial, kept as the registry's keyed blind index only.

``medhotline dnc add|remove|list`` only parse, call one :class:`DoNotCallList` method and print. The list turns
the number into its blind index through the :class:`PhoneIndex` port (``his.registry.PatientRegistry`` satisfies
it; ``scheduler`` does not import ``his``), changes the row, and appends one ``change`` audit entry per add or
remove, whether or not the row changed: the request itself is what the trail records. The dialer reads the same
table before each outreach call (``scheduler.dialer``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal, Protocol

from sqlalchemy import func, select

from compliance.audit import AuditLog
from ground.db import Repository
from scheduler.tables import DoNotCall

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine

STAFF_ROLE: Final = "operator"


class PhoneIndex(Protocol):
    """The keyed blind index of a phone number (the registry's, so the dialer finds the same value)."""

    async def phone_index(self, phone: str) -> str: ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DoNotCallStore(Repository):
    """The ``do_not_call`` rows by blind index; each method one transaction."""

    def count(self) -> int:
        with self._transaction("counting the do-not-call list") as session:
            return session.scalar(select(func.count()).select_from(DoNotCall)) or 0

    def add(self, index: str, at: datetime, by: str, reason: str) -> bool:
        """True if the number was not on the list before."""
        with self._transaction("adding to the do-not-call list") as session:
            if session.get(DoNotCall, index) is not None:
                return False
            session.add(DoNotCall(phone_index=index, added_at=at, added_by=by, reason=reason))
            return True

    def remove(self, index: str) -> bool:
        """True if the number was on the list."""
        with self._transaction("removing from the do-not-call list") as session:
            row = session.get(DoNotCall, index)
            if row is None:
                return False
            session.delete(row)
            return True


@dataclass
class DoNotCallList:
    """Add, remove and count numbers, each add and remove audited for ``actor``."""

    store: DoNotCallStore
    phones: PhoneIndex
    audit: AuditLog
    role: str = STAFF_ROLE
    clock: Callable[[], datetime] = field(default=_utc_now)

    @classmethod
    def for_engine(cls, engine: Engine, phones: PhoneIndex, audit: AuditLog) -> DoNotCallList:
        return cls(DoNotCallStore.for_engine(engine), phones, audit)

    async def count(self) -> int:
        return await asyncio.to_thread(self.store.count)

    async def add(self, phone: str, *, actor: str, reason: str) -> bool:
        """Put the number on the list; True if it was not on it already."""
        index = await self.phones.phone_index(phone)
        added = await asyncio.to_thread(self.store.add, index, self.clock(), actor, reason)
        await self._audit("add", actor, reason)
        return added

    async def remove(self, phone: str, *, actor: str, reason: str) -> bool:
        """Take the number off the list; True if it was on it."""
        index = await self.phones.phone_index(phone)
        removed = await asyncio.to_thread(self.store.remove, index)
        await self._audit("remove", actor, reason)
        return removed

    async def _audit(self, operation: Literal["add", "remove"], actor: str, reason: str) -> None:
        await asyncio.to_thread(
            self.audit.append, actor=actor, role=self.role, action="change", outcome="success",
            reason=reason, details={"operation": f"dnc_{operation}"},
        )  # fmt: skip
