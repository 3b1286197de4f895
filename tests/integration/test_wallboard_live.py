"""The wallboard with real calls: SIPp patients and an agent's SIPp phone through the Asterisk sandbox, the service
routing them, ``medhotline api`` on the same database and the page in Debian's headless Chromium (over CDP).

What a supervisor on the floor sees, checked on the page itself (the DOM the browser drew from the pushed
snapshots): two callers wait while the only agent is paused, the emergency shown first although it came second;
the agent is unpaused and goes ringing → talking → wrap-up (and back to paused, as the supervisor pauses her again
during the call, so the other caller waits on and gives up); today's figures follow. A screenshot of each stage
is kept as a test artifact (``$MEDHOTLINE_ARTIFACTS/wallboard-live``, else the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from ground import db
from ground.config import Config
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, PhoneCall, Press
from medhotline.phones.agent import AgentPhone
from routing.store import AgentStore
from tests.integration.conftest import CALLER, Hotline, running_hotline, unavailable
from tests.integration.wallboard_browser import (
    CHROMIUM,
    Cdp,
    add_supervisor,
    api_server,
    artifacts_dir,
    sign_in,
    wallboard,
)

pytestmark = pytest.mark.integration

DESK = Path(__file__).resolve().parents[1] / "data" / "flows" / "routing_desk.yaml"
KEYS = {"general": "2", "emergency": "3"}
AGENT = "nurse"
SUPERVISOR = "sup.board"
# No escalation: the emergency waits for the nurse, however long the loaded machine takes.
RULES = """
emergency:
  required: [[physician_license, nurse_license]]
diagnosis:
  required: [[physician_license]]
medication:
  required: [[pharmacist_license, physician_license]]
adverse_reaction:
  required: [[physician_license, nurse_license]]
vaccination:
  required: [[nurse_license, physician_license]]
triage:
  required: [[nurse_license, physician_license]]
appointment: {}
general: {}
"""
# Each stage lasts several of the wallboard's 0.5 s polls, so the page shows every one of them: the phone rings
# 1.5 s, the nurse talks 3 s, wrap-up is 3 s.
ROUTING = """
[routing]
rules_file = "{rules}"
ring_timeout = 8
wrap_up = 3
no_answer_pause = 600
first_announcement = 1
announce_every = 5
refresh_interval = 0.2
"""
# The general caller gives up this long after choosing, long after the page has shown both callers waiting.
GENERAL_HANGS_UP_MS = 15_000

# The JavaScript the checks read the page with.
FIGURE = (
    "(l=>{const f=[...document.querySelectorAll('#figures .fig')].find(f=>f.firstChild.textContent===l);"
    "return f?f.querySelector('b').textContent:null})"
)
STATE = f'(document.querySelector(\'tr.agent[data-agent="{AGENT}"] td[class^="state-"]\')||{{}}).className'
CALL_ROWS = "[...document.querySelectorAll('tr.call')].map(r=>[r.dataset.call,r.classList.contains('emergency')])"
# Every state the agent's row is drawn in, in order (a MutationObserver: no state is missed between two checks).
RECORD_STATES = (
    "window.__states=[];const rec=()=>{const s=" + STATE + ";"
    "if(s&&window.__states[window.__states.length-1]!==s)window.__states.push(s)};"
    "rec();new MutationObserver(rec).observe(document.getElementById('agents'),{childList:true,subtree:true});true"
)


@pytest.fixture(scope="module")
def board_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, AgentPhone]]:
    """The hotline on the routing test desk with one nurse (paused) whose SIPp phone answers after 1.5 s."""
    if CHROMIUM is None:
        unavailable("Debian's chromium is not installed (apt-get install chromium)")
    phone = AgentPhone(AGENT, free_port(socket.SOCK_DGRAM), free_rtp_range(4), answer_after_ms=1500, talk_ms=3000)
    phone.start()
    state = tmp_path_factory.mktemp("wallboard-live")
    rules = state / "routing.yaml"
    rules.write_text(RULES, encoding="utf-8")

    def setup(config: Config) -> None:
        sessions = db.make_sessionmaker(config.database_url)
        store, now = AgentStore(sessions), datetime.now(UTC)
        AccountStore(sessions).add("admin1", "Credentials office", ["admin"], now)
        store.add_agent_with_account(AGENT, AGENT, ["nurse"], AGENT, now, contact=phone.contact)
        licence = store.add_credential(AGENT, "nurse_license", "L-nurse", "卫健委", now - timedelta(days=365),
                                       now + timedelta(days=365), now)  # fmt: skip
        store.verify_credential(licence, "admin1", now)
        store.pause(AGENT, "培训", now)
        add_supervisor(config.database_url, SUPERVISOR)

    try:
        with running_hotline(state, "board", ROUTING.format(rules=rules), flow="routing_desk", extra_flows=(DESK,),
                             before_start=setup) as hotline:  # fmt: skip
            deadline = time.monotonic() + 30
            while f" {AGENT}/" not in hotline.sandbox.cli_output("pjsip show endpoints"):
                assert time.monotonic() < deadline, "the agent's endpoint was not configured in Asterisk"
                time.sleep(0.5)
            yield hotline, phone
    finally:
        phone.stop()


async def _figure(cdp: Cdp, label: str) -> str | None:
    value = await cdp.evaluate(f"{FIGURE}({label!r})")
    assert value is None or isinstance(value, str)
    return value


async def _until_figure(cdp: Cdp, label: str, value: str, seconds: float = 20) -> None:
    await cdp.until(f"{FIGURE}({label!r})==={value!r}", seconds)


async def test_the_wallboard_follows_real_calls_emergency_first_agent_states_and_figures(
    board_hotline: tuple[Hotline, AgentPhone], tmp_path: Path
) -> None:
    hotline, phone = board_hotline
    url = hotline.config.database_url
    agents = AgentStore(db.make_sessionmaker(url))
    shots = artifacts_dir(tmp_path, "wallboard-live")
    print(f"\nwallboard screenshots: {shots}")
    pool = ThreadPoolExecutor(max_workers=2)

    def call(category: str, hang_up_after_ms: int | None) -> Future[PhoneCall]:
        presses: list[Action] = [Press(300, KEYS[category])]
        return pool.submit(hotline.call, hotline.config.hotline.number, presses, hang_up_after_ms)

    try:
        with api_server(hotline.config_path, tmp_path / "api.stderr") as base:
            token = sign_in(base, hotline.config_path, SUPERVISOR)
            async with wallboard(base, token, tmp_path / "chromium") as cdp:
                assert await cdp.evaluate(RECORD_STATES)
                assert await cdp.evaluate(STATE) == "state-paused"
                assert (await _figure(cdp, "今日来电"), await _figure(cdp, "已接听")) == ("0", "0")
                assert await _figure(cdp, "急救目标内接听") == "0 / 0"
                await cdp.screenshot(shots / "0-empty.png")

                # A general caller, then an emergency caller; the only agent is paused, so both wait.
                general = call("general", GENERAL_HANGS_UP_MS)
                await cdp.until("document.querySelectorAll('tr.call').length===1", 30)
                ((general_id, general_emergency),) = await cdp.evaluate(CALL_ROWS)
                assert not general_emergency
                emergency = call("emergency", None)  # stays until the nurse hangs up
                await cdp.until("document.querySelectorAll('tr.call').length===2", 30)
                rows = await cdp.evaluate(CALL_ROWS)
                await cdp.screenshot(shots / "1-waiting-emergency-first.png")
                # The emergency came second and is shown first, in the emergency queue (the first queue shown).
                assert rows[1] == [general_id, False], rows
                emergency_id, is_emergency = rows[0]
                assert is_emergency, rows
                assert await cdp.evaluate("document.querySelector('.queue').dataset.queue") == "emergency"
                await _until_figure(cdp, "今日来电", "2")

                # The supervisor unpauses the nurse: the emergency rings her first.
                await asyncio.to_thread(agents.unpause, AGENT, datetime.now(UTC))
                await cdp.until(f"{STATE}==='state-ringing'", 20)
                await cdp.screenshot(shots / "2-ringing.png")
                await cdp.until(f"{STATE}==='state-talking'", 20)
                await cdp.screenshot(shots / "3-talking.png")
                assert [r.outcome for r in agents.rings(emergency_id)] == ["answered"]
                # Paused again after this call (a break): the general caller keeps waiting, and gives up.
                await asyncio.to_thread(agents.pause, AGENT, "休息", datetime.now(UTC))
                await cdp.until(f"{STATE}==='state-wrap_up'", 20)
                await cdp.screenshot(shots / "4-wrap-up.png")
                await cdp.until(f"{STATE}==='state-paused'", 20)
                await _until_figure(cdp, "已接听", "1")
                await _until_figure(cdp, "放弃率", "50.0%", seconds=30)
                await cdp.until("document.querySelectorAll('tr.call').length===0", 10)
                await cdp.screenshot(shots / "5-figures.png")
                states = await cdp.evaluate("window.__states")
                emergencies = await _figure(cdp, "急救目标内接听")
                html = await cdp.evaluate("document.documentElement.outerHTML")
        patients = [await asyncio.wrap_future(f) for f in (general, emergency)]
    finally:
        pool.shutdown(wait=True)
    assert all(p.succeeded for p in patients), [p.errors for p in patients]
    # Every state the row was drawn in: "ready" may flash between the unpause and the ring, nothing else.
    assert [s for s in states if s != "state-ready"] == [
        "state-paused",
        "state-ringing",
        "state-talking",
        "state-wrap_up",
        "state-paused",
    ], states
    # The emergency was answered (within its 10 s target unless the machine is very slow: not asserted).
    assert emergencies is not None
    assert emergencies.endswith("/ 1"), emergencies
    assert phone.count("ANSWERED") == 1
    assert CALLER not in html
    assert "休息" in html, "the pause reason is shown"
