"""No caller is left in silence: ARI requests fail or time out at each step of a call, through a proxy in front of
the real sandbox's ARI port, and what the SIPp caller hears (RTP captured on loopback) and the call record are
checked. Once with REST over HTTP and once over the event WebSocket (``rest_transport``): the proxy fails requests
on either; a reset exists on HTTP only.

A failure another attempt survives (a timeout, a reset) is retried and the call goes on; one that persists
ends with the unavailable prompt and the service hanging up, and the record closed with outcome "error" and the
reason. Never a silent line until the caller gives up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from medhotline.free_ports import free_rtp_range
from medhotline.phones import Press
from tests.integration.ari_faults import AriFaultProxy, Fault, FaultKind, RtpSniffer
from tests.integration.conftest import Hotline, running_hotline

pytestmark = pytest.mark.integration

# 50 packets: a second of audio (one packet per 20 ms) reached the phone after the fault.
HEARD = 50


@dataclass(frozen=True)
class Case:
    pattern: str  # a regular expression over "METHOD /ari/path?query"; GREETING stands for the greeting's sound
    kind: FaultKind
    times: int
    presses: tuple[Press, ...]
    hang_up_after_ms: int | None  # None: the phone listens until the service hangs up
    outcome: str


ANSWER = r"^POST /ari/channels/[^/?]+/answer"
CASES = {
    # Retried, and the call goes on: the caller hears the greeting, then hangs up themself.
    "answer timeout, retried": Case(ANSWER, "timeout", 1, (), 5000, "caller_hangup"),
    "greeting timeout, retried under a new playback id": Case("GREETING", "timeout", 1, (), 5000, "caller_hangup"),
    # Persistent: every attempt fails; the caller is told and hung up.
    "answer reset on every attempt": Case(ANSWER, "reset", 3, (), None, "error"),
    "greeting 500 on every attempt": Case("GREETING", "500", 3, (), None, "error"),
    # The queue: the caller presses 0 (emergency) and the holding bridge can't be created.
    "holding bridge 500": Case(r"^POST /ari/bridges\?.*type=holding", "500", 1, (Press(1500, "0"),), None, "error"),
}


@pytest.fixture(scope="module")
def proxied(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Hotline, AriFaultProxy, str]]:
    transport: str = request.param
    proxy = AriFaultProxy().start()
    try:
        with running_hotline(
            tmp_path_factory.mktemp(f"faults-{transport}"),
            f"faults{transport[:2]}",
            before_start=lambda config: setattr(proxy, "upstream_port", config.asterisk.ari_port),
            # The service reaches ARI through the proxy; a request unanswered for 1 s counts as unanswered.
            asterisk_extra=f'ari_connect_port = {proxy.port}\nari_timeout = 1.0\nrest_transport = "{transport}"',
        ) as hotline:
            yield hotline, proxy, transport
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("proxied", "name"),
    # A reset is a lost HTTP connection; over the event WebSocket it is a lost event stream, which
    # test_sandbox_lifecycle covers (the service reconnects after an Asterisk restart).
    [(t, n) for t in ("http", "websocket") for n in CASES if not (t == "websocket" and CASES[n].kind == "reset")],
    indirect=["proxied"],
)
def test_a_failed_request_never_leaves_the_caller_in_silence(
    proxied: tuple[Hotline, AriFaultProxy, str], name: str
) -> None:
    hotline, proxy, transport = proxied
    case = CASES[name]
    greeting = hotline.sound_of("hotline", "greeting").split("/", 1)[1]
    fault = Fault(
        case.pattern.replace("GREETING", rf"^POST /ari/channels/[^/?]+/play/.*{greeting}"), case.kind, case.times
    )
    proxy.faults = [fault]
    before = hotline.call_ids()
    media_port = free_rtp_range(4)

    with RtpSniffer(media_port).running() as heard:
        phone = hotline.call(
            hotline.config.hotline.number,
            case.presses,
            case.hang_up_after_ms,
            media_port=media_port,
            timeout=90,
        )

    assert len(fault.at) == case.times, f"the fault was injected {len(fault.at)} times: {proxy.requests[-20:]}"
    if transport == "websocket":  # the failed requests really went over the event socket
        assert sum(1 for r in proxy.ws_requests if re.search(fault.pattern, r)) >= case.times, proxy.ws_requests[-20:]
    assert phone.succeeded, phone.errors
    # The caller heard something after the (last) fault: the prompt after the retry, or the unavailable prompt.
    assert heard.after(fault.at[-1]) >= HEARD, f"{heard.after(fault.at[-1])} RTP packets after the fault"
    record = hotline.finished_record(before)
    assert record.outcome == case.outcome, record
    if case.outcome == "error":
        assert "HUNGUP_BY_SERVICE" in phone.stamps  # told, then hung up by the service
        assert record.error, record
        # Hung up soon after being told: the unavailable prompt is a few seconds, not a wait for a timeout.
        assert phone.stamps["HUNGUP_BY_SERVICE"] - fault.at[-1] < 30
        played = [r for r in proxy.requests if "/play/" in r and "unavailable" in r]
        assert played, "the unavailable prompt was not requested"
    else:
        assert "HUNGUP_BY_PATIENT" in phone.stamps
