"""The IVR's patient directory over the registry, and the factory that opens both from the configuration.

``RegistryPatientDirectory`` implements ``telephony.ports.PatientDirectory``: the flows' ``lookup_patient`` node asks it
who is calling. The caller's number is revealed from its ``CallerId`` wrapper here and nowhere else, turned into
its blind index by the key service, and matched against ``patients.phone_bidx``. Exactly one match gives the flow
an opaque ``patient_ref`` (the patient id); none or several (a family sharing a phone) give "not found", because
guessing between relatives would open the wrong record. Every lookup is audited as a system read
(``ivr``/``system``, reason "caller identification").

A lookup never fails the call: an unusable number (withheld, too short), an unreachable key service or database
all end as "not found" with a log line that says which, and never the number.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from sqlalchemy import Engine

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore, key_service_for
from compliance.keyservice_client import KeyServiceClient
from ground import db
from ground.config import Config
from ground.errors import MedhotlineError
from ground.logs import get_logger
from his.registry import Authorize, PatientInputError, PatientRegistry
from his.tables import PatientStore
from telephony.channel import CallChannel
from telephony.ports import PatientMatch

log = get_logger("medhotline.his.directory")

IVR_ACTOR: Final = "ivr"
IVR_ROLE: Final = "system"
IVR_REASON: Final = "caller identification"


class RegistryPatientDirectory:
    """``PatientDirectory`` backed by the encrypted registry: caller number → blind index → one patient or none."""

    def __init__(
        self,
        registry: PatientRegistry,
        *,
        actor: str = IVR_ACTOR,
        role: str = IVR_ROLE,
        reason: str = IVR_REASON,
    ) -> None:
        self._registry = registry
        self._actor = actor
        self._role = role
        self._reason = reason

    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None:
        number = channel.info.caller.reveal()
        if not number:
            log.info("patient.lookup_no_caller_id")
            return None
        try:
            ids = await self._registry.lookup_by_phone(
                number, accessor=self._actor, role=self._role, reason=self._reason
            )
        except PatientInputError:
            log.info("patient.lookup_unusable_number")
            return None
        except MedhotlineError as exc:
            # Key service or database down: the caller goes on as unknown rather than being dropped.
            log.error("patient.lookup_failed", error=type(exc).__name__, detail=str(exc))
            return None
        if len(ids) == 1:
            log.info("patient.identified")  # which patient is in the audit trail (by blind id), not the log
            return PatientMatch(patient_ref=ids[0])
        if not ids:
            log.info("patient.lookup_not_found")
        else:
            log.warning("patient.lookup_ambiguous", matches=len(ids))
        return None


@dataclass
class PatientServices:
    """The registry, its directory and the connections they hold; close with ``aclose`` (or ``async with``)."""

    registry: PatientRegistry
    directory: RegistryPatientDirectory
    ring: DataKeyRing
    keys: KeyServiceClient
    audit: AuditLog
    engine: Engine

    async def aclose(self) -> None:
        await self.keys.close()
        await asyncio.to_thread(self.engine.dispose)

    async def __aenter__(self) -> PatientServices:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def open_patient_directory(
    config: Config, *, authorize: Authorize | None = None, audit: AuditLog | None = None
) -> PatientServices:
    """Connect to the key service and the database of ``config`` and build the registry and its IVR directory.

    Fails at once (``KeyServiceUnavailable``/``KeyServiceRefused``, ``DatabaseError``) if the key service does
    not answer or the schema is not current, so a node never starts with a directory that can't look anyone up.
    ``audit`` defaults to the audit log in the same database; ``authorize`` is the access policy's check.
    """

    await asyncio.to_thread(db.ensure_current, config.database_url)
    keys = key_service_for(config)
    engine = db.make_engine(config.database_url)
    try:
        await keys.status()  # reachable and the token accepted, or an error that says which
        audit_log = audit or AuditLog(SqlAuditStore(engine))
        ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit_log)
        registry = PatientRegistry(PatientStore.for_engine(engine), ring, keys, audit=audit_log, authorize=authorize)
    except BaseException:
        await keys.close()
        engine.dispose()
        raise
    return PatientServices(registry, RegistryPatientDirectory(registry), ring, keys, audit_log, engine)
