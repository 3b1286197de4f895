"""What outreach needs of the patient registry, as a port: the application passes ``his``'s services in.

Defined here, by the consumer, so ``scheduler`` does not import ``his`` (sibling features stay independent);
``his.directory.PatientServices`` satisfies it structurally.
"""

from __future__ import annotations

from typing import Any, Protocol

from compliance.audit import AuditLog
from compliance.data_keys import DataKeyRing


class PatientRecords(Protocol):
    """Reads from the patient registry, each checked and audited by the registry itself."""

    async def get(self, patient_id: str, *, accessor: str, role: str, reason: str) -> Any: ...

    async def phone_index(self, phone: str) -> str: ...


class OutreachPatients(Protocol):
    """The registry, the data-key ring that decrypts outreach texts and the audit log, once connected."""

    @property
    def registry(self) -> PatientRecords: ...

    @property
    def ring(self) -> DataKeyRing: ...

    @property
    def audit(self) -> AuditLog: ...
