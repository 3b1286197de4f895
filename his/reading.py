"""Reading one patient's record on behalf of staff, behind the one access policy.

``medhotline patients show`` only parses, calls :func:`read_patient` and prints the record. The acting role is
the one given, or the account's only role; the access policy (``compliance.access_store.AccessControl``, told by
the patient store whose record it is) decides from the database at this moment and audits a refusal; the
registry decrypts and audits the read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from compliance.access_store import AccessControl, registry_authorizer
from compliance.accounts import AccountStore
from ground.errors import CommandError
from his.registry import PatientRegistry
from his.tables import PatientStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.audit import AuditLog
    from compliance.data_keys import DataKeyRing
    from compliance.fields import BlindIndexer
    from his.registry import PatientRecord

__all__ = ["read_patient"]


async def read_patient(
    engine: Engine,
    ring: DataKeyRing,
    indexer: BlindIndexer,
    audit: AuditLog,
    patient_id: str,
    *,
    account: str,
    role: str | None,
    reason: str,
) -> PatientRecord:
    """The decrypted record; CommandError when the account holds several roles and none is given, AccessDenied
    (audited) when the policy refuses."""
    found = await asyncio.to_thread(AccountStore.for_engine(engine).find, account)
    if role is None and found is not None and len(found.roles) == 1:
        (role,) = found.roles
    if role is None:
        raise CommandError(f"account {account} has several roles: say which one with --role")
    patients = PatientStore.for_engine(engine)
    access = AccessControl.for_engine(engine, audit, patients=patients)
    registry = PatientRegistry(
        patients, ring, indexer, audit=audit, authorize=registry_authorizer(access, reason=reason)
    )
    return await registry.get(patient_id, accessor=account, role=role, reason=reason)
