"""Audit entries for HL7 messages in and out: type, control id, outcome, patient by blind id, never a value."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Final, Literal

from compliance.audit import AuditError, AuditLog, AuditOutcome, JsonValue
from ground.logs import get_logger

log = get_logger("medhotline.his.audit")

HIS_ACTOR: Final = "his"
HIS_ROLE: Final = "system"
# The audit log refuses number-like text (a phone or record number could hide in it); a HIS's control ids are
# often timestamps with a counter, so those are recorded by their SHA-256 instead. Ours are letters only.
_NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")


def control_id_details(control_id: str) -> dict[str, JsonValue]:
    """How an audit entry names a control id: as is when it is safe text, else by its SHA-256."""
    if control_id and not _NUMBER_LIKE.search(control_id) and control_id.isprintable() and len(control_id) <= 64:
        return {"control_id": control_id}
    return {"control_id_sha256": hashlib.sha256(control_id.encode("utf-8")).hexdigest()}


class Hl7Audit:
    """Appends ``hl7_send``/``hl7_receive`` entries; without an audit log it does nothing (unit tests)."""

    def __init__(self, audit: AuditLog | None, *, actor: str = HIS_ACTOR, role: str = HIS_ROLE) -> None:
        self._audit = audit
        self._actor = actor
        self._role = role

    async def record(
        self,
        direction: Literal["send", "receive"],
        message_type: str,
        control_id: str,
        *,
        outcome: AuditOutcome,
        patient: str | None = None,
        ack: str | None = None,
        location: str = "",
        error_code: str = "",
        reason: str = "",
    ) -> None:
        """One entry. Raises AuditError if the log refuses it: no unaudited exchange is reported as done."""
        if self._audit is None:
            return
        details: dict[str, JsonValue] = {"type": message_type, **control_id_details(control_id)}
        if ack:
            details["ack"] = ack
        if location:
            details["location"] = location
        if error_code:
            details["error_code"] = error_code
        audit = self._audit
        try:
            await asyncio.to_thread(
                lambda: audit.append(
                    actor=self._actor,
                    role=self._role,
                    action="hl7_send" if direction == "send" else "hl7_receive",
                    outcome=outcome,
                    patient=patient,
                    reason=reason,
                    details=details,
                )
            )
        except AuditError as exc:
            log.error("his.audit_failed", direction=direction, type=message_type, error=str(exc))
            raise
