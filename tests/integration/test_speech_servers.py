"""Recognition on two speech servers (``medhotline speech serve`` with the Korean model, Vosk's WebSocket protocol):
four SIPp callers speak into ``listen`` at once, their streams are spread over both servers, and one server is
killed (SIGKILL) while they speak. Its callers go on to the key menu and hear its prompt at once; the others are
recognised; no caller is left in silence.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from medhotline.free_ports import free_rtp_range
from medhotline.phones import PhoneCall, Speak, speech_wav
from tests.integration.ari_faults import RtpSniffer
from tests.integration.conftest import Hotline, finished_records, running_hotline
from tests.integration.test_speech import BEFORE_LISTENING, korean_model

pytestmark = pytest.mark.integration

CALLERS = 4
CAPACITY = 2  # per server: four callers fill both, so a spread is the only way they all fit
# About nine seconds of speech, no sentence end inside: the utterance is still going on when the server dies.
WORDS = "안녕하세요 저는 지난주부터 계속 머리가 아프고 어지러워서 병원 예약을 하고 싶은데 언제 가능한지 알려주세요"
HEARD = 50  # a second of audio (one RTP packet per 20 ms)
PROMPTLY = 3.0  # seconds from the kill within which the killed server's callers hear the key prompt


@dataclass
class SpeechServerProcess:
    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def opened(self) -> int:
        return sum(1 for line in self.lines if line.startswith("stream ") and line.endswith(" opened"))


@contextmanager
def speech_server(model: Path, workdir: Path) -> Iterator[SpeechServerProcess]:
    process = subprocess.Popen(
        [sys.executable, "-m", "medhotline", "speech", "serve", "--port", "0", "--workers", "1", "--model", str(model)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    with process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline().strip()
            assert first.startswith("listening on ws://"), f"speech serve printed {first!r}"
            server = SpeechServerProcess(process, first.removeprefix("listening on "))
            threading.Thread(target=pump, args=(process.stdout, server.lines), daemon=True).start()
            yield server
        finally:
            process.kill()


def pump(stream: IO[str], into: list[str]) -> None:
    """The server's stream lines, as they come (a thread: the test's main thread waits on the callers)."""
    for line in stream:
        into.append(line.strip())


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, list[SpeechServerProcess]]]:
    model = korean_model()
    workdir = tmp_path_factory.mktemp("speech-servers")
    with ExitStack() as stack:
        servers = [stack.enter_context(speech_server(model, workdir)) for _ in range(2)]
        listed = ", ".join(f'{{url = "{s.url}", capacity = {CAPACITY}}}' for s in servers)
        # A loaded build machine decodes late: only a server that is gone (or 5 s behind) counts as failed here.
        extra = f'[speech]\nengine = "servers"\nservers = [{listed}]\nreply_timeout = 5.0\n'
        hotline = stack.enter_context(running_hotline(tmp_path_factory.mktemp("farm"), "farm", extra))
        yield hotline, servers


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_streams_spread_over_two_servers_and_a_killed_one_sends_its_callers_to_the_key_menu(
    farm: tuple[Hotline, list[SpeechServerProcess]], tmp_path: Path
) -> None:
    hotline, (doomed, survivor) = farm
    words = speech_wav(WORDS, "ko", tmp_path / "caller.wav", trailing_silence=1.0)
    speak_after = hotline.ms_of("hotline", BEFORE_LISTENING) + 800
    before = hotline.call_ids()
    media_ports = [free_rtp_range(4) for _ in range(CALLERS)]

    def caller(media_port: int) -> PhoneCall:
        return hotline.call(
            hotline.config.hotline.number,
            [Speak(speak_after, words)],
            media_port=media_port,
            # From the start of the speech: long enough to hear the key menu after the kill (or, recognised, the
            # route's prompt), short of the service's own hang-up after "no agent available" (~20 s).
            hang_up_after_ms=18000,
            timeout=120,
        )

    with ExitStack() as stack, ThreadPoolExecutor(CALLERS) as pool:
        sniffers = [stack.enter_context(RtpSniffer(port).running()) for port in media_ports]
        calls = [pool.submit(caller, port) for port in media_ports]
        # Every caller is speaking, each on a stream of its own: two on each server.
        wait_until(lambda: doomed.opened() + survivor.opened() == CALLERS, 60, "four speech streams")
        time.sleep(1.5)  # well into the utterance
        doomed.process.kill()
        killed_at = time.time()
        phones = [call.result() for call in calls]

    assert all(phone.succeeded for phone in phones), [phone.errors for phone in phones if not phone.succeeded]
    assert (doomed.opened(), survivor.opened()) == (CAPACITY, CAPACITY), (doomed.lines, survivor.lines)

    records = finished_records(hotline, before, CALLERS, timeout=60)
    asks = {r.id: next((edge, heard) for node, edge, heard in hotline.path(r) if node == "ask") for r in records}
    failed = [r for r in records if asks[r.id][0] == "fallback"]
    recognised = [r for r in records if asks[r.id][0] != "fallback"]
    # The killed server's two callers: the key menu, the record says speech failed (and what had been heard).
    assert len(failed) == CAPACITY, asks
    for record in failed:
        edge, heard = asks[record.id]
        assert heard is not None
        assert heard.startswith("speech failed"), heard
        # The key menu: a step of its own, or where the caller was when they hung up (while it was being read).
        nodes = [node for node, _, _ in hotline.path(record)]
        after = nodes[nodes.index("ask") + 1 :] or [record.last_step or ""]
        assert after[0] == "main_menu", (nodes, record.last_step)
    # The survivor's callers were recognised (Korean words: no Chinese keyword, so the default edge or a category).
    assert len(recognised) == CALLERS - CAPACITY, asks
    for record in recognised:
        edge, _ = asks[record.id]
        assert edge is not None
        assert edge == "default" or edge.startswith("heard "), asks

    # Nobody in silence: every caller heard a second of audio after the kill, and the killed server's callers
    # heard the key prompt at once (the others are still speaking then; their menu comes after the utterance).
    heard_after = sorted(sniffer.after(killed_at) for sniffer in sniffers)
    promptly = [sniffer.after(killed_at) - sniffer.after(killed_at + PROMPTLY) for sniffer in sniffers]
    # (A prompt started while the caller was still leaving the listen bridge was dropped by Asterisk: this test
    # caught callers in silence until the tap waited for ChannelLeftBridge.)
    assert heard_after[0] >= HEARD, f"a caller heard silence after the kill: packets {heard_after}"
    assert sum(1 for packets in promptly if packets >= HEARD) >= CAPACITY, f"the key prompt came late: {promptly}"
