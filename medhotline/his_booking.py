"""Appointments made on the command line go to the HIS, and what the CLI prints follows the HIS's answer.

``medhotline vaccination book|change|cancel`` with ``[his] enabled``: the SIU (S12 book, S13 change, S15 cancel) is
queued in the outbox like the IVR's (``his.producer.HisOutbound``), the booking marked ``requested``, and then
the command delivers the outbox itself for up to ``reply_timeout`` seconds (the same lease the service's sender
takes, so the two never send one message twice). The answer decides what is printed and the exit status:

- AA: the booking's HIS state is ``confirmed``: booked.
- AR, or AE: not booked, with the HIS's reason (segment-field and table 0357 code, never its free text). An AE
  stays in the outbox and is retried by the service; an AR is set aside (``medhotline his retry``).
- no answer in time (HIS down, other messages ahead): ``requested``; the service's sender delivers it later.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal

from ground.config import Config
from his import open_patient_directory
from his.link import open_his_link
from medhotline.maintenance import booking_answers
from scheduler.vaccination import BookingRecord, VaccinationStore
from telephony.ports import AppointmentEvent, AppointmentFacts

HisOutcome = Literal["confirmed", "refused", "requested"]
_DELIVERY_STEPS: Final = 50


@dataclass(frozen=True, slots=True)
class HisAnswer:
    """What the HIS said of one booking's message: outcome, ACK code, and the reason of a refusal."""

    outcome: HisOutcome
    control_id: str
    ack: str = ""
    reason: str = ""

    def describe(self) -> str:
        if self.outcome == "confirmed":
            return f"HIS: confirmed (AA to {self.control_id})"
        if self.outcome == "refused":
            return f"HIS: NOT booked, {self.ack} {self.reason} (message {self.control_id})".replace("  ", " ")
        return f"HIS: requested, no answer yet (message {self.control_id} stays in the outbox)"


async def send_appointment(config: Config, event: AppointmentEvent, booking: BookingRecord) -> HisAnswer:
    """Queue the booking's SIU, deliver the outbox for up to ``reply_timeout`` seconds, return the HIS's answer."""
    services = await open_patient_directory(config)
    try:
        link = open_his_link(config, services, on_answer=booking_answers(services))
        try:
            facts = AppointmentFacts(
                booking.id, booking.patient_id, booking.starts_at, booking.ends_at, booking.vaccine,
                booking.vaccine_name, booking.clinic, booking.changed_from,
            )  # fmt: skip
            control_id = await link.producer.appointment(event, facts)
            store = VaccinationStore.for_engine(services.engine)
            await asyncio.to_thread(store.mark_his_requested, booking.id, control_id)
            outbox_store = link.outbox.store
            loop = asyncio.get_running_loop()
            deadline = loop.time() + config.his.reply_timeout
            for _ in range(_DELIVERY_STEPS):
                step = await link.outbox.send_next(link.outbox_client)
                entry = await asyncio.to_thread(outbox_store.get, control_id)
                if entry is None or entry.status != "pending" or entry.ack_code == "AE":
                    break
                if step.kind in ("idle", "busy") or loop.time() + max(step.delay, 0.0) > deadline:
                    break  # the service's sender has it, or waiting longer would hold the operator
                if step.kind in ("wait", "retry"):
                    await asyncio.sleep(max(step.delay, 0.01))
        finally:
            await link.aclose()
        entry = await asyncio.to_thread(outbox_store.get, control_id)
    finally:
        await services.aclose()
    if entry is None or entry.ack_code is None:
        return HisAnswer("requested", control_id)
    if entry.status == "sent":
        return HisAnswer("confirmed", control_id, "AA")
    # AR (failed) or AE (failed after its attempts, or pending a retry): not booked as far as the HIS is concerned.
    reason = (entry.last_error or "").removeprefix(entry.ack_code).strip()
    return HisAnswer("refused", control_id, entry.ack_code, reason)
