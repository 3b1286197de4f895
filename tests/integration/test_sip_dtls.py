"""A call over SIP/TLS with DTLS-SRTP (``[sip] media_encryption = "dtls"``): Debian's baresip calls the hotline
through the TLS trunk and the keys for SRTP come from a DTLS handshake on the media port, not from the SDP.

What a capture on the loopback interface must show: the hotline flow answers (its greeting plays), DTLS
handshake records reach the phone's media port before any RTP, the RTP after them is SRTP (noise, not the
greeting's µ-law), and the SIP on the TLS port is not readable.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from medhotline.asterisk_config import TLS_TRUNK
from medhotline.free_ports import free_port
from tests.integration.conftest import Hotline, running_hotline, unavailable
from tests.integration.test_sip_tls import (
    _call_through_tls_trunk,
    _greeting_ulaw,
    _no_clear_sip,
    _refused_through_tls_trunk,
    _srtp_checks,
)

pytestmark = pytest.mark.integration

DTLS_HANDSHAKE = 22
DTLS_VERSIONS = (b"\xfe\xff", b"\xfe\xfd")  # DTLS 1.0, 1.2 (the record layer of 1.3 still says 1.2)


@pytest.fixture(scope="module")
def dtls_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hotline, int]]:
    if not Path("/usr/lib/baresip/modules/dtls_srtp.so").exists():
        unavailable("baresip's dtls_srtp module is not installed (scripts/bootstrap installs baresip)")
    tls_port = free_port(socket.SOCK_STREAM)
    config = f'\n[sip]\ntls = true\ntls_port = {tls_port}\nmedia_encryption = "dtls"\n'
    with running_hotline(tmp_path_factory.mktemp("dtls"), "dtls", config) as hotline:
        yield hotline, tls_port


def _is_dtls_handshake(payload: bytes) -> bool:
    return len(payload) >= 13 and payload[0] == DTLS_HANDSHAKE and payload[1:3] in DTLS_VERSIONS


def _is_rtp(payload: bytes) -> bool:
    return len(payload) >= 12 and payload[0] >> 6 == 2 and payload[1] & 0x7F == 0


def test_call_over_tls_with_dtls_srtp_is_answered_and_unreadable_on_the_wire(
    dtls_hotline: tuple[Hotline, int], tmp_path: Path
) -> None:
    hotline, tls_port = dtls_hotline
    sandbox = hotline.sandbox
    phone_dir = tmp_path / "baresip"
    # Both of baresip's media encryptions: DTLS-SRTP for the call, SDES for the one that must be refused.
    call = _call_through_tls_trunk(hotline, tls_port, phone_dir, "dtls_srtp", modules=("dtls_srtp.so",))
    output, record, udp = call.output, call.record, call.udp
    assert "Call established" in output, output[-3000:]
    # baresip checked Asterisk's certificate against the SDP's fingerprint and took its SRTP keys from DTLS.
    assert "DTLS-SRTP complete" in output, output[-3000:]

    assert record.channel_name.startswith(f"PJSIP/{TLS_TRUNK}-"), record.channel_name
    assert record.flow == "hotline"
    assert (record.outcome, record.last_step) == ("caller_hangup", "greeting")
    # Asterisk's side of the handshake reached the phone's media port, and it came before the first RTP.
    handshakes = [i for i, p in enumerate(udp) if _is_dtls_handshake(p)]
    assert handshakes, f"no DTLS handshake record among {len(udp)} UDP packets to the phone"
    first_rtp = next(i for i, p in enumerate(udp) if _is_rtp(p))
    assert handshakes[0] < first_rtp, (handshakes[0], first_rtp)
    _srtp_checks(udp, _greeting_ulaw(sandbox.sounds_dir, hotline.sound_of("hotline", "greeting")), 150)
    _no_clear_sip(call.tcp, hotline.config.hotline.number.encode())

    # A phone offering SDES (keys in the SDP) to a DTLS endpoint is refused: no call, no record.
    sdes = call.account.replace("mediaenc=dtls_srtp", "mediaenc=srtp-mand")
    _refused_through_tls_trunk(hotline, tls_port, phone_dir, sdes)
