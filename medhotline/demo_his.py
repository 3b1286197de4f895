"""The demo's HIS: the simulated HIS (``his.simulator.SimulatedHis``) on an event loop of its own in a thread of
the demo's process, and the environment that points the demo's service at it (``[his] enabled``).

In the demo's process rather than as ``medhotline his simulate``: the demo gives it one more synthetic patient,
the one whose number the demo's callers use, without putting that number on a command line, and reads its
counters for the summary directly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import date
from typing import TypeVar

from his.messages import PdqPatient
from his.simulator import SYNTHETIC_PATIENTS, SimulatedHis

T = TypeVar("T")
HOST = "127.0.0.1"


def demo_patient(phone: str) -> PdqPatient:
    """A synthetic patient for the demo caller's (made-up, test-range) number: a name from no register."""
    return PdqPatient("SIM-000100", "演示患者", phone, date(1970, 1, 1))


class HisSimulatorThread:
    """``SimulatedHis`` on a free loopback port, served by an event loop in a daemon thread until ``stop``."""

    def __init__(self, caller_phone: str) -> None:
        self.his = SimulatedHis((*SYNTHETIC_PATIENTS, demo_patient(caller_phone)))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="demo-his", daemon=True)
        self.port: int | None = None

    def start(self) -> int:
        self._thread.start()
        self.port = self._run(lambda: self.his.start(HOST, 0))
        return self.port

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=30)

    def stop(self) -> None:
        """Close the server (no new connection, open ones ended), then the loop and its thread."""
        if not self._thread.is_alive():
            if not self.loop.is_closed():
                self.loop.close()  # never started (or already stopped): nothing listens
            return
        try:
            self._run(self.his.aclose)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    def summary(self) -> str:
        """One line for the demo's summary: counts only, never an identifier."""
        his = self.his
        return (
            f"HIS (simulated): {his.pdq_queries} PDQ quer{'y' if his.pdq_queries == 1 else 'ies'} answered "
            f"({his.pdq_found} identified), {len(his.received)} message(s) acknowledged"
        )


def service_env(port: int) -> dict[str, str]:
    """What points the demo's service at the simulated HIS (environment overrides for the child process)."""
    return {"MEDHOTLINE__HIS__ENABLED": "true", "MEDHOTLINE__HIS__HOST": HOST, "MEDHOTLINE__HIS__PORT": str(port)}
