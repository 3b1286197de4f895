"""A simulated HIS for the demo, the tests and ``python -m benchmarks.his``: an MLLP server with a small patient
list and an appointment book.

- ``QBP^Q22`` (PDQ by phone) is answered with ``RSP^K22`` from the patient list (OK with the matches, or NF).
- ``SIU^S12/S13/S15`` are ACKed and kept in the appointment book (by SCH-1, the hotline's booking id);
  ``SRM^S01/S02/S04`` (a hotline with ``[his] appointment_messages = "srm"``) likewise by ARQ-1, answered with
  ``SRR`` carrying the booking as held (SCH-2 filler id ``HIS-<booking id>``, SCH-25 Booked/Cancelled);
  ``ADT``, ``VXU^V04`` and ``ORU^R01`` are ACKed and remembered by control id (a control id seen before is
  acknowledged again and not stored twice, as a real receiver drops a duplicate).
- ``refuse`` makes it answer the next messages of a type with AE or AR (the tests of what the hotline shows).
- :meth:`SimulatedHis.send_adt` plays the HIS's side of demographics: an ADT (A08 by default) to the hotline's
  listener.

The patients are synthetic (names from no register, numbers from the 13800138xxx test range used across the
project's tests); the simulator is never pointed at a real HIS's data.
"""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Final, Literal

from ground.logs import get_logger
from his.adt import build_adt
from his.hl7 import UNSUPPORTED_MESSAGE_TYPE, Hl7Error, Message, Party
from his.messages import Ack, PdqPatient, build_ack, build_pdq_answer, new_control_id, read_ack, read_pdq_query
from his.outbound import read_siu
from his.srm import build_srr, read_srm
from his.transport import MllpClient, MllpServer

log = get_logger("medhotline.his.simulator")

SIMULATOR_PARTY: Final = Party("HIS", "HOSPITAL")
HOTLINE_PARTY: Final = Party("MEDHOTLINE", "HOTLINE")
ACCEPTED: Final = ("ADT", "SIU", "SRM", "VXU", "ORU")

# Synthetic: made-up names and numbers from the test range, never a real person's.
SYNTHETIC_PATIENTS: Final = (
    PdqPatient("SIM-000101", "测试患者甲", "13800138101", date(1950, 3, 14)),
    PdqPatient("SIM-000102", "测试患者乙", "13800138102", date(1962, 7, 1)),
    PdqPatient("SIM-000103", "测试患者丙", "13800138103", date(1988, 11, 23)),
)


@dataclass
class BookEntry:
    """The simulated HIS's view of one appointment: the last event and status it was told."""

    event: str
    status: str
    starts_at: str
    record_number: str = field(repr=False)


class SimulatedHis:
    """The MLLP server and its stores; see the module docstring."""

    def __init__(
        self,
        patients: tuple[PdqPatient, ...] | list[PdqPatient] = SYNTHETIC_PATIENTS,
        *,
        party: Party = SIMULATOR_PARTY,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.patients: list[PdqPatient] = list(patients)
        self.party = party
        self.received: dict[str, str] = {}  # control id -> message type, first delivery only
        self.deliveries: list[str] = []  # every control id as delivered, duplicates included
        self.appointments: dict[str, BookEntry] = {}  # SCH-1 booking id -> its state
        self.pdq_queries = 0
        self.pdq_found = 0  # queries answered with exactly one candidate: the caller identified
        self._refusals: dict[str, deque[tuple[Literal["AE", "AR"], Hl7Error]]] = {}
        self._server = MllpServer(self.handle, sender=party, tls=tls)
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.port = await self._server.start(host, port)
        return self.port

    async def aclose(self) -> None:
        await self._server.aclose()

    def refuse(self, message_code: str, code: Literal["AE", "AR"], location: str, reason: str, times: int = 1) -> None:
        """Answer the next ``times`` messages of ``message_code`` (e.g. ``SIU``) with ``code`` naming ``location``."""
        queue = self._refusals.setdefault(message_code, deque())
        for _ in range(times):
            queue.append((code, Hl7Error(location, reason)))

    def find(self, phone: str) -> list[PdqPatient]:
        return [p for p in self.patients if p.phone == phone]

    async def handle(self, message: Message) -> Message:
        now = datetime.now(UTC)
        if message.type == "QBP^Q22":
            self.pdq_queries += 1
            _, phone = read_pdq_query(message)
            found = self.find(phone)
            self.pdq_found += len(found) == 1
            return build_pdq_answer(message, found, sender=self.party, at=now)
        code = message.message_code
        if code not in ACCEPTED:
            raise Hl7Error(
                "MSH-9", f"the simulated HIS accepts QBP^Q22 and {', '.join(ACCEPTED)}", UNSUPPORTED_MESSAGE_TYPE
            )
        self.deliveries.append(message.control_id)
        queue = self._refusals.get(code)
        if queue:
            answer, error = queue.popleft()
            log.info("his.simulator_refused", type=message.type, control_id=message.control_id, ack=answer)
            if code == "SRM":
                return build_srr(message, answer, sender=self.party, at=now, error=error)
            return build_ack(message, answer, sender=self.party, at=now, error=error)
        if message.control_id not in self.received:
            if code in ("SIU", "SRM"):
                # An Hl7Error here is an AR naming the field (the server's rule).
                siu = read_siu(message) if code == "SIU" else read_srm(message)
                self.appointments[siu.booking_id] = BookEntry(siu.event, siu.status, siu.starts_at, siu.record_number)
            self.received[message.control_id] = message.type
        log.info("his.simulator_accepted", type=message.type, control_id=message.control_id)
        if code == "SRM":
            # The filler's answer: the booking as the HIS now holds it (a duplicate gets the same answer).
            booking = read_srm(message).booking_id
            entry = self.appointments[booking]
            return build_srr(message, "AA", sender=self.party, at=now, filler_id=f"HIS-{booking}", status=entry.status)
        return build_ack(message, "AA", sender=self.party, at=now)

    async def send_adt(
        self,
        host: str,
        port: int,
        patient: PdqPatient,
        *,
        trigger: str = "A08",
        receiver: Party = HOTLINE_PARTY,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> Ack:
        """Send an ADT about ``patient`` to the hotline's listener at ``host:port``; the hotline's ACK."""
        message = build_adt(trigger, patient, sender=self.party, receiver=receiver, at=datetime.now(UTC),
                            control_id=new_control_id())  # fmt: skip
        client = MllpClient(host, port, tls=tls, server_name=server_name)
        try:
            return read_ack(await client.request(message), message.control_id)
        finally:
            await client.aclose()
