"""The HIS link end to end through the sandbox: ``medhotline serve`` with ``[his]`` pointed at the simulated HIS
(``his.simulator.SimulatedHis``, run here on its own event loop in a thread), SIPp callers on a small test desk
(tests/data/flows/his_booking.yaml: the shipped vaccination flow's nodes with one key for tomorrow morning, so the
module stays within CI's budget).

One service start, in order (each step builds on the one before):

1. a caller whose number only the HIS knows is identified by PDQ (the registry was empty), types the birth year
   the HIS gave (verified), and books on the keypad: the simulated HIS holds the appointment (SIU^S12, AA);
2. an ADT^A08 from the simulator moves a patient to a new number: the next call from that number is identified
   (the simulator's PDQ does not know the new number, so only the A08 can have done it);
3. the HIS is stopped, bookings and a cancellation are made meanwhile: when it is back, the outbox drains and
   every message arrived exactly once (no control id delivered twice).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time as clock
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import text

from ground import db
from ground.config import Config
from his.simulator import SYNTHETIC_PATIENTS, SimulatedHis
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, PhoneCall, Press, place_call
from medhotline.phones.patient import dtmf_play_ms
from scheduler.policy import LOCAL_TZ
from scheduler.vaccination import VaccinationStore
from tests.integration.conftest import Hotline, running_hotline

pytestmark = pytest.mark.integration

FLOW = "his_booking"
DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / f"{FLOW}.yaml"
SLACK_MS = 1200  # after a prompt has played, before the caller types (a collect waits 6 s)
KNOWN = SYNTHETIC_PATIENTS[0]  # known to the HIS only, found by PDQ
MOVED = SYNTHETIC_PATIENTS[1]  # its number changed by an ADT^A08
NEW_PHONE = "13800138188"
T = TypeVar("T")


class HisThread:
    """The simulated HIS on an event loop of its own, so the synchronous test can stop and restart it."""

    def __init__(self) -> None:
        self.his = SimulatedHis()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self.run(self.his.start)

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=30)

    def stop(self) -> None:
        self.run(self.his.aclose)

    def restart(self) -> None:
        self.run(lambda: self.his.start(port=self.port))  # the same port: the service's configuration

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def tomorrow() -> datetime:
    return datetime.combine((datetime.now(LOCAL_TZ) + timedelta(days=1)).date(), time(0), tzinfo=LOCAL_TZ)


def add_slots(config: Config) -> None:
    """Tomorrow's morning and afternoon slots, written before the service starts (in process: no CLI start-up)."""
    engine = db.make_engine(config.database_url)
    try:
        store, now = VaccinationStore.for_engine(engine), datetime.now(UTC)
        store.add_vaccine("influenza", "流感疫苗", at=now)
        store.add_clinic("c1", "社区卫生服务中心", "hotline", at=now)
        for hour in (9, 14):
            store.add_slots("c1", "influenza", tomorrow() + timedelta(hours=hour), minutes=30, capacity=5, at=now)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def his_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, HisThread, int]]:
    sim = HisThread()
    listen_port = free_port(socket.SOCK_STREAM)
    # Short timeouts and backoff keep the outage step short; the PDQ budget leaves room for a loaded machine.
    settings = f"""
[his]
enabled = true
port = {sim.port}
listen_port = {listen_port}
pdq_budget = 3.0
connect_timeout = 1.0
reply_timeout = 2.0
backoff_initial = 0.2
backoff_max = 0.5
"""
    try:
        with running_hotline(
            tmp_path_factory.mktemp("his"), "his", settings, flow=FLOW, extra_flows=(DESK,), before_start=add_slots
        ) as hotline:
            yield hotline, sim, listen_port
    finally:
        sim.close()


def cli(hotline: Hotline, *argv: str, stdin: str | None = None, ok: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "medhotline", "--config", str(hotline.config_path), *argv],
        input=stdin, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode in ok, done.stderr
    return done.stdout.strip()


def patient_ids(hotline: Hotline, phone: str) -> list[str]:
    return cli(hotline, "patients", "find", "--from-json", "-", stdin=json.dumps({"phone": phone}), ok=(0, 1)).split()


def scalars(hotline: Hotline, sql: str, **params: str) -> list[str]:
    """Read the service's database directly (a CLI process per poll would cost seconds on a loaded machine)."""
    engine = db.make_engine(hotline.config.database_url)
    try:
        with engine.connect() as conn:
            return [str(v) for v in conn.execute(text(sql), params).scalars()]
    finally:
        engine.dispose()


def his_state(hotline: Hotline, booking_id: str) -> str | None:
    states = scalars(hotline, "SELECT his_state FROM vaccination_bookings WHERE id = :id", id=booking_id)
    return states[0] if states else None


def outbox(hotline: Hotline, status: str) -> list[str]:
    """Control ids of the outbox messages in ``status``."""
    return scalars(hotline, "SELECT control_id FROM his_outbox WHERE status = :s ORDER BY id", s=status)


def call_from(hotline: Hotline, number: str, presses: list[Action], hang_up_after_ms: int | None = None) -> PhoneCall:
    return place_call(
        target_host="127.0.0.1",
        target_port=hotline.config.asterisk.sip_port,
        service=hotline.config.hotline.number,
        local_port=free_port(socket.SOCK_DGRAM),
        media_port=free_rtp_range(4),
        caller=number,
        presses=presses,
        hang_up_after_ms=hang_up_after_ms,
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = clock.monotonic() + timeout
    while not check():
        assert clock.monotonic() < deadline, f"timed out waiting for {what}"
        clock.sleep(0.2)


def test_pdq_identification_keypad_booking_a08_and_an_outage(his_hotline: tuple[Hotline, HisThread, int]) -> None:
    hotline, sim, listen_port = his_hotline
    his = sim.his
    assert patient_ids(hotline, KNOWN.phone) == []  # the hotline's registry has never heard of the caller

    # 1. Identified by PDQ, birth year from the HIS confirmed, tomorrow morning booked on the keypad.
    year = str(KNOWN.birth_date.year) if KNOWN.birth_date else ""
    presses: list[Action] = [
        Press(hotline.ms_of(FLOW, ["identity"]) + SLACK_MS, year),
        Press(dtmf_play_ms(year) + hotline.ms_of(FLOW, ["choose"]) + SLACK_MS, "1"),
    ]
    before = hotline.call_ids()
    call = call_from(hotline, KNOWN.phone, presses)
    assert call.succeeded, call.errors
    record = hotline.finished_record(before)
    path = [(node, edge) for node, edge, _ in hotline.path(record)]
    assert ("identify", "found") in path
    assert ("verify", "verified") in path  # the birth year came from the HIS's PID-7
    assert ("book", "booked") in path
    assert his.pdq_queries >= 1
    (known_id,) = patient_ids(hotline, KNOWN.phone)  # the pseudonymous id the call was identified by
    (booking_line,) = cli(hotline, "vaccination", "bookings", "--patient", known_id).splitlines()
    booking_id = booking_line.split()[0]
    wait_for("the SIU^S12 at the HIS", lambda: booking_id in his.appointments)
    entry = his.appointments[booking_id]
    assert (entry.event, entry.record_number) == ("S12", KNOWN.record_number)
    wait_for("the HIS's AA on the booking", lambda: his_state(hotline, booking_id) == "confirmed")
    assert outbox(hotline, "failed") == []

    # 2. An ADT^A08 moves MOVED to a new number; the simulator's own list keeps the old one, so its PDQ answers NF
    # for the new number and only the A08, through the service's listener, can identify the next call.
    ack = sim.run(lambda: his.send_adt("127.0.0.1", listen_port, replace(MOVED, phone=NEW_PHONE), trigger="A08"))
    assert ack.code == "AA"
    before = hotline.call_ids()
    call = call_from(hotline, NEW_PHONE, [], hang_up_after_ms=1500)
    record = hotline.finished_record(before)
    assert ("identify", "found") in [(node, edge) for node, edge, _ in hotline.path(record)]
    (moved_id,) = patient_ids(hotline, NEW_PHONE)

    # 3. The HIS goes away; a booking and a cancellation are made meanwhile (the CLI queues them and says so).
    sim.stop()
    delivered = len(his.deliveries)
    booked = cli(hotline, "vaccination", "book", "--patient", moved_id, "--date", f"{tomorrow():%Y-%m-%d}", "--part",
                 "afternoon")  # fmt: skip
    assert "HIS: requested, no answer yet" in booked
    cancelled = cli(hotline, "vaccination", "cancel", booking_id, "--as", "os:test")
    assert "HIS: requested, no answer yet" in cancelled
    pending = outbox(hotline, "pending")
    assert len(pending) == 2, pending
    assert len(his.deliveries) == delivered
    sim.restart()
    wait_for("the outbox to drain", lambda: outbox(hotline, "pending") == [], timeout=30)
    assert outbox(hotline, "failed") == []
    assert set(pending) <= set(his.received)
    assert len(his.deliveries) == len(set(his.deliveries)), "a message reached the HIS twice"
    assert his.appointments[booking_id].event == "S15"
    assert his_state(hotline, booking_id) == "confirmed"  # the HIS's AA to the cancellation
    assert [e.event for e in his.appointments.values()].count("S12") == 1  # the afternoon booking

    # Nothing the service wrote names the patients: the HIS's traffic is logged by control id, type and location.
    written = hotline.log_path.read_text(encoding="utf-8", errors="replace")
    assert hotline.config.service.log_file is not None
    written += hotline.config.service.log_file.read_text(encoding="utf-8", errors="replace")
    for patient in (KNOWN, MOVED):
        for value in (patient.name, patient.phone, patient.record_number):
            assert value not in written
    assert NEW_PHONE not in written
