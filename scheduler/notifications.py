"""Outreach by SMS: the outbox (medication and vaccination reminders) and its delivery through the gateway."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from compliance.keystore import read_token_file
from ground.logs import get_logger
from scheduler.medication import MedicationStore
from scheduler.notify import HttpSmsGateway, Outbox, deliver_pending
from scheduler.outreach_core import OutreachCore, OutreachPart
from scheduler.vaccination import (
    VaccinationStore,
    send_day_before_reminders,
)

log = get_logger("scheduler.outreach")


class Notifications(OutreachPart):
    """Messages into the encrypted outbox, and the leader's delivery of it (or a warning when no gateway is set)."""

    def __init__(self, core: OutreachCore) -> None:
        super().__init__(core)
        self._warned_no_gateway = False

    async def _medication_text(self, reminder_id: str) -> str:

        medication, dose = await MedicationStore(self._sessions).text(self._services().ring, reminder_id)
        return f"用药提醒：请按时服用{medication}，{dose}。"

    async def enqueue_sms(self, patient_id: str, kind: str, subject_id: str | None, text: str) -> str:

        return await Outbox(self._sessions).enqueue(
            self._services().ring, patient_id=patient_id, kind=kind, text=text, subject_id=subject_id, at=self._clock()
        )

    async def deliver_outbox(self) -> None:

        gateway = self._gateway()
        if gateway is None:
            if not self._warned_no_gateway:
                self._warned_no_gateway = True
                log.warning(
                    "outreach.no_sms_gateway", hint="set [outreach] sms_gateway_url; messages wait in the outbox"
                )
            return
        if self._patients is None:
            return

        async def phone_of(patient_id: str) -> str:
            record = await self.patient_record(patient_id, "sending a notification")
            return str(record.phone)

        await deliver_pending(Outbox(self._sessions), self._services().ring, gateway, phone_of, self._clock())

    def _gateway(self) -> Any:

        oc = self._config.outreach
        if not oc.sms_gateway_url:
            return None

        assert oc.sms_token_file is not None  # guaranteed by config validation
        token = read_token_file(oc.sms_token_file).decode("utf-8").strip()  # refuses a token others can read
        return HttpSmsGateway(oc.sms_gateway_url, token)

    async def vaccination_reminders(self) -> None:
        """Once a day in effect: every booking of tomorrow without a reminder gets one (idempotent per booking)."""

        if self._patients is None:
            return
        now = self._clock()
        tomorrow = (now.astimezone(self.policy.tz) + timedelta(days=1)).date()

        async def enqueue(*, patient_id: str, kind: str, text: str, subject_id: str | None) -> str:
            return await self.enqueue_sms(patient_id, kind, subject_id, text)

        sent = await send_day_before_reminders(VaccinationStore(self._sessions), enqueue, tomorrow, now)
        if sent:
            log.info("outreach.vaccination_reminders", count=sent)
