"""The route prompt on the ARI path plays while the agent's phone already rings (docs/routing.md).

An emergency caller of the shipped hotline presses 0 during the greeting. Before, the IVR said the emergency
route prompt (seconds long) and only then routed, so the agent's phone rang after it; now the decision goes to the
queue at once, the agent's INVITE comes within moments of the key, and the caller hears the prompt in the holding
bridge meanwhile. An agent who answers during the prompt stops it. Ordering is asserted with wide margins (a loaded
2-core machine), never speed.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from compliance.accounts import AccountStore
from ground import db
from ground.config import Config
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Press
from medhotline.phones.agent import AgentPhone
from medhotline.phones.tone_pcap import PCMU, ulaw_decode
from routing.store import AgentStore
from tests.integration.conftest import Hotline, running_hotline
from tests.integration.loopback_capture import LoopbackSniffer

pytestmark = pytest.mark.integration

ROUTING = """
[routing]
ring_timeout = 15
wrap_up = 0.5
first_announcement = 30
refresh_interval = 0.2
"""
PRESS_MS = 800  # the key, during the greeting
# An RTP packet louder than this carries a prompt (or music), not silence or comfort noise.
LOUD_RMS = 300.0


class LoudPackets(LoopbackSniffer):
    """Arrival times of the loud PCMU packets sent to one UDP port (what the patient's phone hears)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loud: list[float] = []
        super().__init__("loud-packets")

    def between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at in self.loud if start <= at <= end)

    def _frame(self, frame: bytes, l4: int, proto: int) -> None:
        if proto != socket.IPPROTO_UDP or struct.unpack_from("!H", frame, l4 + 2)[0] != self.port:
            return
        rtp = frame[l4 + 8 :]
        if len(rtp) < 12 or rtp[0] >> 6 != 2 or rtp[1] & 0x7F != PCMU:
            return
        samples = ulaw_decode(rtp[12 + 4 * (rtp[0] & 0x0F) :])
        if samples and math.sqrt(sum(s * s for s in samples) / len(samples)) >= LOUD_RMS:
            with self._lock:
                self.loud.append(time.time())


def _add_nurse(phone: AgentPhone) -> Callable[[Config], None]:
    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        store = AgentStore(sessions)
        now = datetime.now(UTC)
        AccountStore(sessions).add("admin1", "Credentials office", ["admin"], now)
        store.add_agent_with_account("nurse", "nurse", ["nurse"], "nurse", now, contact=phone.contact)
        year = timedelta(days=365)
        cred = store.add_credential("nurse", "nurse_license", "L-nurse", "卫健委", now - year, now + year, now)
        store.verify_credential(cred, "admin1", now)

    return setup


@pytest.fixture(scope="module")
def nurse_desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, AgentPhone]]:
    """The shipped hotline (no speech engine: keys) with one nurse, whose phone answers as each test sets it."""
    phone = AgentPhone("nurse", free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=600, talk_ms=1500)
    phone.start()
    try:
        with running_hotline(
            tmp_path_factory.mktemp("rprompt"), "rprompt", ROUTING, before_start=_add_nurse(phone)
        ) as hotline:
            deadline = time.monotonic() + 30
            while " nurse/" not in hotline.sandbox.cli_output("pjsip show endpoints"):
                assert time.monotonic() < deadline, "the nurse's endpoint never reached Asterisk"
                time.sleep(0.5)
            time.sleep(1.0)  # the engine has read the agent table and the phone's contact
            yield hotline, phone
    finally:
        phone.stop()


def _emergency_call(hotline: Hotline, phone: AgentPhone) -> tuple[LoudPackets, float, float, db.CallRecord]:
    """Press 0 during the greeting; (loud packets the patient heard, key moment, agent's INVITE moment, record)."""
    before = hotline.call_ids()
    rings = phone.count("RINGING")
    media_port = free_rtp_range(4)
    with LoudPackets(media_port) as heard:
        patient = hotline.call(hotline.config.hotline.number, [Press(PRESS_MS, "0")], media_port=media_port, timeout=90)
    assert patient.succeeded, patient.errors
    record = hotline.finished_record(before, timeout=30)
    invites = [event.at for event in phone.events() if event.label == "RINGING"]
    assert len(invites) == rings + 1, f"the nurse's phone rang {len(invites) - rings} times"
    return heard, patient.stamps["ANSWERED"] + PRESS_MS / 1000, invites[-1], record


def test_the_emergency_agent_rings_while_the_caller_hears_the_route_prompt(
    nurse_desk: tuple[Hotline, AgentPhone],
) -> None:
    hotline, phone = nurse_desk
    prompt = hotline.prompt_seconds(hotline.flow_texts("hotline", ["emergency"]))
    assert prompt > 2.5, f"the emergency prompt is {prompt:.1f} s: too short to tell the orderings apart"
    phone.set_answer(int(prompt * 1000) + 2500)  # the agent answers after the prompt: the caller hears all of it

    heard, key_at, invite_at, record = _emergency_call(hotline, phone)

    assert (record.outcome, record.route_category, record.route_priority) == ("routed", "emergency", "emergency")
    # The agent's phone rang long before the prompt could have ended (said first, it rang after all of it).
    assert invite_at < key_at + prompt - 1.0, f"INVITE {invite_at - key_at:.2f} s after the key; prompt {prompt:.2f} s"
    # Meanwhile the caller heard the prompt: sound for most of its length after the agent was dialled (music
    # starts only after it, so this is the prompt).
    loud = heard.between(invite_at + 0.3, key_at + prompt - 0.3)
    expected = 50 * (key_at + prompt - 0.6 - invite_at)
    assert loud >= 0.5 * expected, f"{loud} loud packets while the prompt played; about {expected:.0f} expected"
    path = hotline.path(record)
    sound = hotline.sound_of("hotline", "emergency")
    assert ("emergency", "emergency", "emergency") in path  # the route step, as before
    assert path.index(("route_prompt", "playing", sound)) < path.index(("route_prompt", "played", sound))
    assert path.index(("route_prompt", "played", sound)) < next(i for i, s in enumerate(path) if s[0] == "answered")


def test_an_agent_answering_during_the_route_prompt_stops_it(nurse_desk: tuple[Hotline, AgentPhone]) -> None:
    hotline, phone = nurse_desk
    phone.set_answer(300)

    _, _, _, record = _emergency_call(hotline, phone)

    assert record.outcome == "routed"
    path = hotline.path(record)
    sound = hotline.sound_of("hotline", "emergency")
    stopped = path.index(("route_prompt", "stopped", "agent answered"))
    assert path.index(("route_prompt", "playing", sound)) < stopped
    assert stopped < next(i for i, s in enumerate(path) if s[0] == "answered")
    assert ("route_prompt", "played", sound) not in path
