"""Caller identification by the HIS (IHE PDQ, QBP^Q22 / RSP^K22) within a budget, the local registry behind it.

``HisPatientDirectory`` implements ``telephony.ports.PatientDirectory`` for the flows' ``lookup_patient`` node.
It asks the HIS for the patients with the caller's number and waits at most ``budget`` seconds (``his.pdq_budget``,
0.8 s by default) for the answer. When the HIS names exactly one patient, that patient is written into the
encrypted registry (matched by record number's blind index, so the registry is the HIS's cache) and is the
answer. In every other case, the HIS down, slow, refusing, not knowing the number, or naming several patients,
the local registry answers as it did before the HIS was connected. A call therefore waits for the HIS no longer
than the budget, plus the local lookup it always had.

Each query is audited (``hl7_send``, type QBP^Q22, outcome, patient by blind id when one was found); the number
itself goes only into the message on the (TLS) link, never into a log line, an audit entry or an exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from compliance.audit import AuditOutcome
from ground.errors import MedhotlineError
from ground.logs import get_logger
from his.audit import Hl7Audit
from his.directory import RegistryPatientDirectory
from his.hl7 import Hl7Error, Party
from his.messages import PdqAnswer, PdqPatient, build_pdq_query, new_control_id, read_pdq_answer
from his.outbox import Requester
from his.registry import PatientInput, PatientRegistry
from his.transport import HisError
from telephony.channel import CallChannel
from telephony.ports import PatientMatch

log = get_logger("medhotline.his.pdq")

HIS_ACCESSOR: Final = "his"
HIS_ROLE: Final = "system"
CACHE_REASON: Final = "HIS patient demographics"


class HisPatientDirectory:
    """``PatientDirectory``: the HIS by PDQ within ``budget`` seconds, else the local registry."""

    def __init__(
        self,
        client: Requester,
        registry: PatientRegistry,
        *,
        audit: Hl7Audit,
        sender: Party,
        receiver: Party,
        budget: float = 0.8,
        fallback: RegistryPatientDirectory | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._client = client
        self._registry = registry
        self._audit = audit
        self._sender = sender
        self._receiver = receiver
        self._budget = budget
        self._fallback = fallback or RegistryPatientDirectory(registry)
        self._clock = clock or (lambda: datetime.now(UTC))

    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None:
        number = channel.info.caller.reveal()
        if number:
            patients = await self._ask_his(number)
            if len(patients) == 1:
                match = await self._cache(patients[0])
                if match is not None:
                    return match
            elif len(patients) > 1:
                # A family sharing a phone: remember them all, let the registry's rule (no guessing) decide.
                for patient in patients:
                    await self._cache(patient)
        return await self._fallback.lookup_caller(channel)

    async def _ask_his(self, number: str) -> Sequence[PdqPatient]:
        control_id = new_control_id()
        at = self._clock()
        query = build_pdq_query(number, sender=self._sender, receiver=self._receiver, at=at, control_id=control_id)
        outcome: AuditOutcome = "error"
        status = ""
        answer: PdqAnswer | None = None
        try:
            async with asyncio.timeout(self._budget):
                reply = await self._client.request(query)
            answer = read_pdq_answer(reply, control_id)
            status = answer.status
            outcome = "success" if status in ("OK", "NF") else "error"
        except TimeoutError:
            status = "timeout"
            log.warning("his.pdq_over_budget", budget=self._budget, control_id=control_id)
        except (HisError, Hl7Error) as exc:
            status = type(exc).__name__
            log.warning("his.pdq_failed", error=status, detail=str(exc), control_id=control_id)
        try:
            await self._audit.record(
                "send", "QBP^Q22", control_id, outcome=outcome, ack=status[:16], reason="caller identification"
            )
        except MedhotlineError:
            return ()  # no unaudited identification: the registry answers instead
        if answer is None or answer.status != "OK":
            return ()
        log.info("his.pdq_answered", candidates=len(answer.patients), control_id=control_id)
        return answer.patients

    async def _cache(self, patient: PdqPatient) -> PatientMatch | None:
        """Write the HIS's patient into the registry (by record number); its id, or None if it can't be stored."""
        birth_year = patient.birth_date.year if patient.birth_date else None
        entry = PatientInput(patient.name, patient.phone, record_number=patient.record_number, birth_year=birth_year)
        try:
            patient_id = await self._registry.upsert(entry, accessor=HIS_ACCESSOR, role=HIS_ROLE, reason=CACHE_REASON)
        except MedhotlineError as exc:
            # A value the registry refuses (its message names the field, not the value) or the database is down.
            log.warning("his.pdq_cache_failed", error=type(exc).__name__, detail=str(exc))
            return None
        return PatientMatch(patient_ref=patient_id)
