"""A call over SIP/TLS with SRTP (``[sip] tls``), ARI and AMI over TLS (``[asterisk] tls``): Debian's baresip calls
the hotline through the TLS trunk.

What a capture on the loopback interface must show: the hotline flow answers (its greeting plays), the RTP that
carries the greeting to the phone is SRTP (each packet 10 bytes longer than PCMU for the auth tag, and its
payload looks like noise, not like the greeting's µ-law), and the SIP on the TLS port is not readable. Debian's
SIPp is built without TLS, so baresip is the phone here.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ground import db
from ground.config import Config
from medhotline.asterisk_config import TLS_TRUNK
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Press
from medhotline.phones.tone_pcap import ulaw_encode
from routing.store import AgentStore
from tests.integration.conftest import CALLER, Hotline, running_hotline, unavailable
from tests.integration.loopback_capture import LoopbackCapture, byte_entropy

pytestmark = pytest.mark.integration

PCMU_PAYLOAD = 160  # 20 ms at 8 kHz
SRTP_TAG = 10  # AES_CM_128_HMAC_SHA1_80
CALL_SECONDS = 6
AGENT = "agenttls"


def _baresip_config(
    directory: Path, *, ca_file: Path, sip_port: int, rtp_start: int, modules: tuple[str, ...] = ()
) -> None:
    """A phone with no sound card: a tone file as its microphone, no speaker; ``modules`` loaded after srtp.so."""
    directory.mkdir(mode=0o700)
    extra_modules = "".join(f"module {module}\n" for module in modules)
    (directory / "config").write_text(
        f"""poll_method epoll
sip_listen 127.0.0.1:{sip_port}
sip_cafile {ca_file}
audio_player aubridge,none
audio_source aufile,{directory / "tone.wav"}
audio_alert aubridge,none
rtp_ports {rtp_start}-{rtp_start + 10}
rtcp_mux no
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module aubridge.so
module srtp.so
{extra_modules}module_tmp account.so
module_app menu.so
""",
        encoding="utf-8",
    )
    (directory / "contacts").write_text("", encoding="utf-8")
    # The microphone: a 440 Hz tone at the codec's 8 kHz (aufile does not resample).
    with wave.open(str(directory / "tone.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        tone = (int(8000 * math.sin(2 * math.pi * 440 * i / 8000)) for i in range(8000 * (CALL_SECONDS + 5)))
        wav.writeframes(b"".join(t.to_bytes(2, "little", signed=True) for t in tone))


def _call(phone_dir: Path, uri: str, seconds: int) -> str:
    """Dial ``uri`` and hang up (baresip quits) after ``seconds``; baresip's output."""
    phone = subprocess.run(
        ["baresip", "-f", str(phone_dir), "-e", f"/dial {uri}", "-t", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 20,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return phone.stdout + phone.stderr


@dataclass
class TrunkCall:
    """A call baresip made to the hotline through the TLS trunk while a loopback capture ran."""

    account: str  # the phone's account line: a test varies its media encryption for a call that must be refused
    output: str  # baresip's
    record: db.CallRecord
    udp: list[bytes]  # to the phone's RTP ports
    tcp: list[bytes]  # on the TLS port


def _call_through_tls_trunk(
    hotline: Hotline, tls_port: int, phone_dir: Path, mediaenc: str, modules: tuple[str, ...] = ()
) -> TrunkCall:
    """baresip, set up in ``phone_dir`` with media encryption ``mediaenc``, calls the hotline through the TLS trunk
    and hangs up after CALL_SECONDS; what crossed loopback meanwhile and the call's finished record."""
    sandbox = hotline.sandbox
    rtp_start = free_rtp_range(10)
    _baresip_config(
        phone_dir,
        ca_file=sandbox.pki().ca_cert,
        sip_port=free_port(socket.SOCK_DGRAM),
        rtp_start=rtp_start,
        modules=modules,
    )
    account = (
        f"<sip:{TLS_TRUNK}@127.0.0.1:{tls_port};transport=tls>;auth_pass={sandbox.tls_trunk_password()}"
        f";regint=0;mediaenc={mediaenc};audio_codecs=PCMU"
    )
    (phone_dir / "accounts").write_text(account + "\n", encoding="utf-8")
    (phone_dir / "accounts").chmod(0o600)
    number = hotline.config.hotline.number
    before = hotline.call_ids()
    with LoopbackCapture(range(rtp_start, rtp_start + 11), [tls_port]) as capture:
        output = _call(phone_dir, f"sip:{number}@127.0.0.1:{tls_port}", CALL_SECONDS)
        record = hotline.finished_record(before, timeout=20)
    udp, tcp = capture.snapshot()
    return TrunkCall(account, output, record, udp, tcp)


def _refused_through_tls_trunk(hotline: Hotline, tls_port: int, phone_dir: Path, account: str) -> None:
    """With ``account`` (a phone set up by _call_through_tls_trunk), the call is refused with 488: never
    established, no record."""
    (phone_dir / "accounts").write_text(account + "\n", encoding="utf-8")
    before = hotline.call_ids()
    output = _call(phone_dir, f"sip:{hotline.config.hotline.number}@127.0.0.1:{tls_port}", 3)
    assert "Call established" not in output, output[-3000:]
    assert "488" in output, output[-3000:]
    assert hotline.call_ids() == before


def _plain_answer(port: int) -> bytes:
    """What a client speaking plain HTTP (or waiting for AMI's banner) gets: nothing readable from a TLS port."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"GET /ari/asterisk/info HTTP/1.0\r\n\r\n")
        try:
            data = sock.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return b""
    # A TLS server answers a non-TLS first flight with an alert record (0x15) or closes; never with text.
    return b"" if not data or data[0] == 0x15 else data


def _greeting_ulaw(sounds: Path, sound: str) -> bytes:
    """What the greeting would be on the wire as plain PCMU."""
    with wave.open(str(sounds / f"{sound}.wav")) as wav:
        frames = wav.readframes(wav.getnframes())
    samples = [int.from_bytes(frames[i : i + 2], "little", signed=True) for i in range(0, len(frames), 2)]
    return bytes(ulaw_encode(s) for s in samples)


@dataclass
class TlsDesk:
    hotline: Hotline
    tls_port: int
    agent_dir: Path
    agent_sip_port: int


def _add_tls_agent(sip_port: int) -> Callable[[Config], None]:
    def setup(config: Config) -> None:
        store = AgentStore(db.make_sessionmaker(config.database_url))
        # baresip listens for TLS one port above its UDP/TCP port; the generated endpoint adds ;transport=tls.
        contact = f"sip:{AGENT}@127.0.0.1:{sip_port + 1}"
        store.add_agent_with_account(AGENT, AGENT, ["agent"], AGENT, datetime.now(UTC), contact=contact)

    return setup


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDesk]:
    if shutil.which("baresip") is None:
        unavailable("baresip is not installed (scripts/bootstrap installs it)")
    tls_port = free_port(socket.SOCK_STREAM)
    agent_sip_port = _free_port_pair()
    config = f'\n[sip]\ntls = true\ntls_port = {tls_port}\nmedia_encryption = "sdes"\n'
    state = tmp_path_factory.mktemp("tls")
    # ARI and AMI over TLS too: the service reaches Asterisk only through them, so an answered call shows they work.
    with running_hotline(
        state, "tls", config, asterisk_extra="tls = true", before_start=_add_tls_agent(agent_sip_port)
    ) as hotline:
        yield TlsDesk(hotline, tls_port, state / "agent-phone", agent_sip_port)


def _free_port_pair() -> int:
    """A port p with p free for UDP and TCP and p + 1 free for TCP (baresip's TLS listener)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        try:
            with socket.socket() as tcp, socket.socket() as tls:
                tcp.bind(("127.0.0.1", port))
                tls.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for the agent's phone")


def _srtp_checks(udp: list[bytes], known_ulaw: bytes, min_packets: int) -> None:
    """Every RTP packet is PCMU + SRTP's auth tag, and its payload is noise, not the known audio's µ-law."""
    rtp = [p for p in udp if len(p) >= 12 and p[0] >> 6 == 2 and p[1] & 0x7F == 0]
    assert len(rtp) >= min_packets, f"only {len(rtp)} RTP packets reached the phone"
    sizes = {len(p) - 12 for p in rtp}
    assert sizes == {PCMU_PAYLOAD + SRTP_TAG}, sizes
    payload = b"".join(p[12 : 12 + PCMU_PAYLOAD] for p in rtp)
    # Ciphertext is close to 8 bits of entropy a byte; the same audio as plain µ-law is far below it.
    assert byte_entropy(payload) > 7.9, byte_entropy(payload)
    assert byte_entropy(known_ulaw) < 7.5, byte_entropy(known_ulaw)
    assert not any(p[12 : 12 + 40] in known_ulaw for p in rtp[:min_packets])


def _no_clear_sip(tcp: list[bytes], *clear: bytes) -> None:
    """TLS records on the port (0x16 handshake) and none of ``clear`` readable."""
    assert tcp, "nothing seen on the TLS port"
    assert any(p[0] == 0x16 for p in tcp)
    wire = b"".join(tcp)
    for text in (b"INVITE sip:", b"SIP/2.0", *clear):
        assert text not in wire, text


def test_call_over_tls_with_srtp_is_answered_and_unreadable_on_the_wire(desk: TlsDesk, tmp_path: Path) -> None:
    hotline, tls_port = desk.hotline, desk.tls_port
    sandbox = hotline.sandbox
    ast = hotline.config.asterisk
    for port in (ast.ari_port, ast.ami_port):
        assert _plain_answer(port) == b"", f"port {port} answers in clear"
    phone_dir = tmp_path / "baresip"
    call = _call_through_tls_trunk(hotline, tls_port, phone_dir, "srtp-mand")
    assert "Call established" in call.output, call.output[-3000:]

    # The hotline flow answered on the TLS trunk's endpoint; the caller hung up during its greeting.
    record = call.record
    assert record.channel_name.startswith(f"PJSIP/{TLS_TRUNK}-"), record.channel_name
    assert record.flow == "hotline"
    assert (record.outcome, record.last_step) == ("caller_hangup", "greeting")
    # SRTP: the RTP to the phone carries the greeting; signalling: nothing readable on the TLS port.
    _srtp_checks(call.udp, _greeting_ulaw(sandbox.sounds_dir, hotline.sound_of("hotline", "greeting")), 150)
    _no_clear_sip(call.tcp, hotline.config.hotline.number.encode())

    # A phone that offers plain RTP over TLS is refused: the link is encrypted or there is no call.
    _refused_through_tls_trunk(hotline, tls_port, phone_dir, call.account.replace(";mediaenc=srtp-mand", ""))


def test_agent_phone_is_rung_over_tls_with_srtp(desk: TlsDesk) -> None:
    """A patient's call (plain UDP from the trunk side) is routed to an agent whose phone Asterisk reaches over
    TLS, and the agent's leg carries SRTP."""
    hotline = desk.hotline
    pki = hotline.sandbox.pki()
    phone_dir = desk.agent_dir
    rtp_start = free_rtp_range(10)
    _baresip_config(phone_dir, ca_file=pki.ca_cert, sip_port=desk.agent_sip_port, rtp_start=rtp_start)
    # The phone's TLS listener needs a certificate; Asterisk's transport does not verify phones (verify_server).
    (phone_dir / "cert.pem").write_bytes(pki.server_cert.read_bytes() + pki.server_key.read_bytes())
    (phone_dir / "cert.pem").chmod(0o600)
    with (phone_dir / "config").open("a", encoding="utf-8") as config:
        config.write(f"sip_certificate {phone_dir / 'cert.pem'}\n")
    (phone_dir / "accounts").write_text(
        f"<sip:{AGENT}@127.0.0.1>;regint=0;answermode=auto;mediaenc=srtp-mand;audio_codecs=PCMU\n", encoding="utf-8"
    )
    before = hotline.call_ids()
    with LoopbackCapture(range(rtp_start, rtp_start + 11), [desk.agent_sip_port + 1]) as capture:
        phone = subprocess.Popen(
            ["baresip", "-f", str(phone_dir), "-t", "40"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(1.0)  # its listeners are up
            # Type-ahead: 5 (other health questions) interrupts the greeting and routes to the general queue.
            patient = hotline.call(hotline.config.hotline.number, presses=[Press(1500, "5")], hang_up_after_ms=8000)
            record = hotline.finished_record(before, timeout=30)
        finally:
            phone.terminate()
            output, _ = phone.communicate(timeout=10)
    udp, tcp = capture.snapshot()
    assert patient.succeeded, patient.errors
    assert "Call established" in output, output[-3000:]
    rings = AgentStore(db.make_sessionmaker(hotline.config.database_url)).rings(record.id)
    assert [(r.account_id, r.outcome) for r in rings] == [(AGENT, "answered")]
    # The agent hears the patient's side, SRTP on the wire; the patient's SIPp plays silence, encrypted here.
    _srtp_checks(udp, _greeting_ulaw(hotline.sandbox.sounds_dir, hotline.sound_of("hotline", "greeting")), 50)
    _no_clear_sip(tcp, CALLER.encode())
