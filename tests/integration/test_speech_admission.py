"""Admission control end to end: more callers reach the hotline's ``listen`` node at once than the node's budget of
concurrent recognitions (``speech.max_streams = 2``) allows.

Four SIPp callers dial together and each speaks after the question and presses 0 a little later. Whoever is
admitted is listened to (the scripted engine "hears" an emergency once the caller's real audio came through
Asterisk) and routed as heard; whoever is over the budget gets the key menu at once: what Asterisk was asked to
play on their channel (seen through a pass-through proxy in front of ARI) goes from the notices straight to the key
menu, never the invitation to speak, they hear it (RTP captured on loopback), and their 0 reaches the emergency
route. The records say which was which (``calls.speech_admission``, the ``ask`` step's "speech busy"). A fifth
caller afterwards is listened to again: the slots of the first four were released when their calls ended.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from ground import db
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import PhoneCall, Press, Speak, place_call, speech_wav
from tests.integration.ari_faults import AriFaultProxy, RtpSniffer
from tests.integration.conftest import CALLER, Hotline, finished_records, running_hotline
from tests.integration.test_speech import recognized_events

pytestmark = pytest.mark.integration

EMERGENCY = "我爸胸口疼得厉害喘不上气"
BUDGET = 2
CALLERS = 4
NOTICES = ["greeting", "scope_notice"]
# A second of audio (one RTP packet per 20 ms): the caller heard a prompt, not a stray packet.
HEARD = 50
# How long the key menu waits for a key after its prompt (dialplans/hotline.yaml, main_menu.timeout).
MENU_TIMEOUT_MS = 6000


@pytest.fixture(scope="module")
def busy_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, AriFaultProxy]]:
    proxy = AriFaultProxy().start()  # no faults: it only records which sounds were played on which channel
    # One sentence per admitted listening: two in the crowd, one for the caller after it.
    script = ", ".join(f'"{EMERGENCY}"' for _ in range(BUDGET + 1))
    extra = f'[speech]\nengine = "scripted"\nscript = [{script}]\nmax_streams = {BUDGET}\n'
    try:
        with running_hotline(
            tmp_path_factory.mktemp("admission"),
            "admission",
            extra,
            before_start=lambda config: setattr(proxy, "upstream_port", config.asterisk.ari_port),
            asterisk_extra=f"ari_connect_port = {proxy.port}",
        ) as hotline:
            yield hotline, proxy
    finally:
        proxy.stop()


@dataclass
class Caller:
    media_port: int
    heard: RtpSniffer


def wav_ms(path: Path) -> int:
    """Duration of an 8 kHz μ-law WAV (one byte a sample; the ``wave`` module reads PCM only), header included."""
    return path.stat().st_size // 8


def played(proxy: AriFaultProxy, hotline: Hotline, channel_id: str, nodes: list[str]) -> list[str]:
    """Which of ``nodes``' prompts Asterisk was asked to play on the channel, in order."""
    digests = {hotline.sound_of("hotline", node).split("/", 1)[1]: node for node in nodes}
    order: list[str] = []
    for request in list(proxy.requests):
        if request.startswith(f"POST /ari/channels/{channel_id}/play"):
            order.extend(node for digest, node in digests.items() if digest in request)
    return order


def step_at(hotline: Hotline, record: db.CallRecord, node: str) -> datetime:
    return next(step.at for step in hotline.repo.steps(record.id) if step.node == node)


def test_callers_over_the_budget_get_the_key_menu_at_once_and_0_still_reaches_emergency(
    busy_hotline: tuple[Hotline, AriFaultProxy], tmp_path: Path
) -> None:
    hotline, proxy = busy_hotline
    words = speech_wav("胸口疼", "cmn", tmp_path / "caller.wav", trailing_silence=1.0)
    notices_ms = hotline.ms_of("hotline", NOTICES)
    listen_ms = notices_ms + hotline.ms_of("hotline", ["ask"])
    speak_at = listen_ms + 500  # after the question: an admitted caller is listened to from its end
    # 0 while the words still play: an admitted caller is being listened to by then (a key does not interrupt the
    # listening, and the scripted engine has heard its second of audio), a refused one is at the key menu, which
    # the hotline's question outlasts by a few seconds.
    press_after = 1500
    assert wav_ms(words) > press_after
    assert speak_at + press_after < notices_ms + hotline.ms_of("hotline", ["main_menu"]) + MENU_TIMEOUT_MS - 500
    before = hotline.call_ids()
    callers: list[Caller] = []
    for _ in range(CALLERS):
        port = free_rtp_range(4)
        while any(abs(port - c.media_port) < 4 for c in callers):
            port = free_rtp_range(4)
        callers.append(Caller(port, RtpSniffer(port)))

    def dial(caller: Caller) -> PhoneCall:
        return place_call(
            target_host="127.0.0.1",
            target_port=hotline.config.asterisk.sip_port,
            service=hotline.config.hotline.number,
            local_port=free_port(socket.SOCK_DGRAM),
            media_port=caller.media_port,
            caller=CALLER,
            presses=[Speak(speak_at, words), Press(press_after, "0")],
            timeout=120,
        )

    with contextlib.ExitStack() as sniffing, ThreadPoolExecutor(CALLERS) as pool:
        for caller in callers:
            sniffing.enter_context(caller.heard.running())
        phones = list(pool.map(dial, callers))

    for phone in phones:
        assert phone.succeeded, phone.errors
    records = finished_records(hotline, before, CALLERS)
    admitted = [r for r in records if r.speech_admission == "admitted"]
    refused = [r for r in records if r.speech_admission == "refused"]
    assert (len(admitted), len(refused)) == (BUDGET, CALLERS - BUDGET), records

    for record in admitted:
        # Listened to and recognised: the spoken emergency chose the route, not the key.
        ask = next(step for step in hotline.repo.steps(record.id) if step.node == "ask")
        assert ask.edge == "heard emergency", hotline.path(record)
        assert (record.route_category, record.route_priority) == ("emergency", "emergency")
        assert played(proxy, hotline, record.channel_id, [*NOTICES, "ask", "main_menu"]) == [*NOTICES, "ask"]

    fallback_at = {}
    for record in refused:
        path = hotline.path(record)
        assert ("ask", "fallback", "speech busy") in path, path
        assert ("main_menu", "press 0", "0") in path, path
        assert (record.outcome, record.route_category, record.route_priority) == ("routed", "emergency", "emergency")
        # At once: after the notices Asterisk was asked to play the key menu, never the invitation to speak.
        assert played(proxy, hotline, record.channel_id, [*NOTICES, "ask", "main_menu"]) == [*NOTICES, "main_menu"]
        fallback_at[record.id] = step_at(hotline, record, "ask")
    # And without a wait: every refused caller left the listen node before any admitted caller was done being
    # asked and listened to (an order of the records, not a speed).
    assert max(fallback_at.values()) < min(step_at(hotline, record, "ask") for record in admitted)

    # Nobody was left in silence: every phone heard at least a second of audio after the first fallback (the
    # refused ones the key menu and their route, the admitted ones the question and theirs).
    first_fallback = min(fallback_at.values()).timestamp()
    assert all(c.heard.after(first_fallback) >= HEARD for c in callers), [
        c.heard.after(first_fallback) for c in callers
    ]
    for record in refused:
        # A figure for the report, not an assertion (the machine is shared): time spent in the listen node.
        in_listen = (fallback_at[record.id] - step_at(hotline, record, "scope_notice")).total_seconds()
        print(f"refused call {record.id[:8]}: left the listen node {in_listen:.3f} s after the notices")

    # The metric: the node's counters in its structured log, one refusal per caller over the budget.
    busy = [e for e in events(hotline) if e.get("event") == "speech.busy"]
    assert [e["reason"] for e in busy] == ["budget"] * (CALLERS - BUDGET)
    assert max(int(str(e["refused_total"])) for e in busy) == CALLERS - BUDGET
    assert all(e["max_streams"] == BUDGET for e in busy)

    # Released: every slot came back when those calls ended, so the next caller is listened to again.
    before = hotline.call_ids()
    phone = hotline.call(hotline.config.hotline.number, presses=[Speak(speak_at, words)])
    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before, timeout=60)
    assert record.speech_admission == "admitted"
    assert next(edge for node, edge, _ in hotline.path(record) if node == "ask") == "heard emergency"
    assert len(recognized_events(hotline)) >= BUDGET + 1


def events(hotline: Hotline) -> list[dict[str, object]]:
    log = hotline.config.service.state_dir / "service.jsonl"
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
