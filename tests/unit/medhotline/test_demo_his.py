"""The demo's simulated HIS (``medhotline.demo_his``): real MLLP on loopback from the demo's thread, the demo
caller identified by PDQ, the summary line without an identifier, the port closed at stop."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime

from his.messages import build_pdq_query, new_control_id, read_pdq_answer
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY
from his.transport import MllpClient
from medhotline import demo_his

CALLER = "13800000000"  # the demo's made-up caller number


async def ask(port: int, phone: str) -> tuple[str, int]:
    query = build_pdq_query(phone, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=datetime.now(UTC),
                            control_id=new_control_id())  # fmt: skip
    client = MllpClient(demo_his.HOST, port)
    try:
        answer = read_pdq_answer(await client.request(query), query.control_id)
    finally:
        await client.aclose()
    return answer.status, len(answer.patients)


def test_demo_caller_identified_summary_without_identifiers_and_port_closed() -> None:
    his = demo_his.HisSimulatorThread(CALLER)
    port = his.start()
    try:
        assert asyncio.run(ask(port, CALLER)) == ("OK", 1)
        assert asyncio.run(ask(port, "13800138999")) == ("NF", 0)
        line = his.summary()
    finally:
        his.stop()
    assert line == "HIS (simulated): 2 PDQ queries answered (1 identified), 0 message(s) acknowledged"
    patient = demo_his.demo_patient(CALLER)
    assert not any(value in line for value in (CALLER, patient.name, patient.record_number))
    with socket.socket() as sock:
        assert sock.connect_ex((demo_his.HOST, port)) != 0  # stopped: nothing listens there any more
    his.stop()  # a second stop is harmless (the demo's finally after an early failure)


def test_service_env_enables_the_his_at_the_port() -> None:
    assert demo_his.service_env(4321) == {
        "MEDHOTLINE__HIS__ENABLED": "true",
        "MEDHOTLINE__HIS__HOST": "127.0.0.1",
        "MEDHOTLINE__HIS__PORT": "4321",
    }
