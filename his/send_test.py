"""``medhotline his send-test``: one harmless PDQ query to the configured HIS, its answer and round-trip time.

The query is a QBP^Q22 for a phone number from the synthetic test range (``13800138000`` by default) that
should match no patient: the HIS answers ``AA`` with ``QAK-2`` = ``NF``, and nothing is stored or changed on
either side. The answer is read by the same code as a caller's identification (``read_pdq_answer``); a HIS that
does find patients for the test number is reported by count only, never by what it sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from his.audit import Hl7Audit
from his.hl7 import Hl7Error, Party
from his.messages import build_pdq_query, new_control_id, read_pdq_answer
from his.outbox import Requester
from his.transport import HisError

TEST_PHONE: Final = "13800138000"


@dataclass(frozen=True, slots=True)
class SendTestResult:
    """What the HIS answered: ACK code (``AA``/``AE``/``AR``, or ``-`` with no answer), QAK-2, time taken."""

    control_id: str
    code: str
    status: str
    candidates: int
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "AA"


async def send_test(
    client: Requester,
    *,
    sender: Party,
    receiver: Party,
    phone: str = TEST_PHONE,
    audit: Hl7Audit | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SendTestResult:
    """Send the test query through ``client`` and read the answer; transport and HL7 errors are results."""
    control_id = new_control_id()
    at = (clock or (lambda: datetime.now(UTC)))()
    query = build_pdq_query(phone, sender=sender, receiver=receiver, at=at, control_id=control_id)
    started = time.perf_counter()
    try:
        reply = await client.request(query)
        seconds = time.perf_counter() - started
        answer = read_pdq_answer(reply, control_id)
        result = SendTestResult(control_id, "AA" if answer.status in ("OK", "NF") else answer.status,
                                answer.status, len(answer.patients), seconds)  # fmt: skip
    except (HisError, Hl7Error) as exc:
        result = SendTestResult(control_id, "-", "", 0, time.perf_counter() - started, str(exc))
    if audit is not None:
        await audit.record("send", "QBP^Q22", control_id, outcome="success" if result.ok else "error",
                           ack=(result.status or result.code)[:16], reason="HIS send-test")  # fmt: skip
    return result
