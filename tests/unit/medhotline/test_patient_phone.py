"""The called patient's phone: its rendered scenario (golden checks) and real SIPp calls on loopback.

A second SIPp plays the hotline (a UAC scenario written here), offering telephone-event on 101 as Asterisk does; its
SDP points the patient's RTP at a UDP socket of this test, which decodes the RFC 4733 telephone events, so the
digits are checked as they arrive on the wire. No Asterisk is involved.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medhotline.phones import PhoneError, Press
from medhotline.phones.agent import NEVER_MS
from medhotline.phones.dtmf_pcap import RtpStream
from medhotline.phones.patient import (
    ANSWERED,
    CANCELLED,
    DIGITS_SENT,
    HUNGUP_BY_PATIENT,
    HUNGUP_BY_SERVICE,
    PRESSED,
    REJECTED_BUSY,
    REJECTED_OFFER,
    RINGING,
    PatientCallLog,
    PatientEvent,
    PatientPhone,
    capture_name,
    check_script,
    dtmf_play_ms,
    parse_events,
    patient_uas_scenario,
    press_captures,
)

EVENT_CODES = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}
DIGIT_OF = {code: key for key, code in EVENT_CODES.items()}

# --- the rendered scenario ---------------------------------------------------------------------------------------


def body(xml: str) -> list[ET.Element]:
    """The scenario's top-level elements, in order."""
    return list(ET.fromstring(xml.split("\n", 2)[2]))  # past the XML declaration and the DOCTYPE


def sent_first_lines(xml: str) -> list[str]:
    """The start line of every message the scenario sends (requests and responses), in order."""
    return [(e.text or "").strip().splitlines()[0] for e in body(xml) if e.tag == "send"]


def played(xml: str) -> list[str]:
    return [x.get("play_pcap_audio", "") for x in ET.fromstring(xml.split("\n", 2)[2]).iter("exec")]


def answer_sdp(xml: str) -> list[str]:
    """The SDP lines of the scenario's one message with a body: the 200 OK answering the INVITE."""
    [answer] = [(e.text or "") for e in body(xml) if e.tag == "send" and "application/sdp" in (e.text or "")]
    return [line.strip() for line in answer.split("v=0", 1)[1].strip().splitlines()]


def rtp_of_capture(capture: bytes) -> list[bytes]:
    """The RTP packets (header and payload) of a libpcap capture of Ethernet/IPv4/UDP packets, in order."""
    offset, packets = 24, []
    while offset < len(capture):
        length = int.from_bytes(capture[offset + 8 : offset + 12], "little")
        ip = capture[offset + 16 + 14 : offset + 16 + length]
        packets.append(ip[(ip[0] & 0x0F) * 4 + 8 :])
        offset += 16 + length
    return packets


def test_presses_are_waits_for_bye_then_captures_played_in_order() -> None:
    xml = patient_uas_scenario(
        [Press(500, "1956"), Press(2500, "182#")], answer_after_ms=300, reject_busy=False, max_call_ms=20_000
    )
    elements = body(xml)
    tags = [(e.tag, e.get("request") or e.get("response") or e.get("id") or "") for e in elements]
    answer = tags.index(("label", "answer"))
    start = tags.index(("recv", "ACK"), answer) + 1  # the answer's ACK: the script starts there
    script = elements[start : start + 9]
    assert [(e.tag, e.get("timeout"), e.get("ontimeout"), e.get("next")) for e in script[0::3]] == [
        ("recv", "500", "press1", "bye"),
        ("recv", "2500", "press2", "bye"),
        ("recv", str(dtmf_play_ms("182#")), "played", "bye"),
    ]
    assert [e.get("id") for e in script[1::3]] == ["press1", "press2", "played"]
    execs = [e.find("action/exec") for e in script[2::3][:2]]
    assert [x.get("play_pcap_audio") for x in execs if x is not None] == ["press1.pcap", "press2.pcap"]
    logs = [e.find("action/log") for e in script[2::3]]
    assert [x.get("message", "").split()[0] for x in logs if x is not None] == [PRESSED, PRESSED, DIGITS_SENT]
    # Then listening for the rest of max_call_ms, and the patient's own BYE when it runs out.
    listen = elements[start + 9]
    scripted = 500 + 2500 + dtmf_play_ms("182#")
    assert (listen.tag, listen.get("request"), listen.get("timeout"), listen.get("ontimeout")) == (
        "recv", "BYE", str(20_000 - scripted), "hang_up"
    )  # fmt: skip
    assert ("label", "bye") in tags
    assert ("label", "hang_up") in tags
    assert ("label", "end") in tags
    assert played(xml) == [capture_name(0), capture_name(1)]
    # No play_dtmf: SIPp 3.6.1 sends those on payload type 96 only.
    assert [x.attrib for x in ET.fromstring(xml.split("\n", 2)[2]).iter("exec") if "play_dtmf" in x.attrib] == []


def test_the_answer_declares_telephone_events_on_the_payload_type_of_the_keys() -> None:
    xml = patient_uas_scenario([Press(0, "1")], answer_after_ms=750, reject_busy=False, max_call_ms=10_000)
    ring = [e for e in body(xml) if e.tag == "recv" and e.get("request") == "CANCEL"]
    assert [(e.get("timeout"), e.get("ontimeout")) for e in ring] == [("750", "answer")]
    assert answer_sdp(xml)[-5:] == [
        "m=audio [media_port] RTP/AVP 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16", "a=sendrecv",
    ]  # fmt: skip
    # A press with no delay plays right after the answer: no wait, no label.
    assert '<recv request="BYE" timeout="0"' not in xml
    assert 'id="press1"' not in xml


def test_another_payload_type_goes_into_the_answer_and_the_offer_check() -> None:
    xml = patient_uas_scenario(
        [Press(0, "1")], answer_after_ms=0, reject_busy=False, max_call_ms=10_000, dtmf_payload_type=110
    )
    assert answer_sdp(xml)[-5:-1] == [
        "m=audio [media_port] RTP/AVP 0 110", "a=rtpmap:0 PCMU/8000", "a=rtpmap:110 telephone-event/8000",
        "a=fmtp:110 0-16",
    ]  # fmt: skip
    invite = ET.fromstring(xml.split("\n", 2)[2]).find("recv/action")
    assert invite is not None
    checks = [e for e in invite if e.tag == "ereg" and e.get("search_in") == "body"]
    assert [(e.get("regexp"), e.get("assign_to")) for e in checks] == [
        ("a=rtpmap:110 telephone-event/8000", "dtmf_offer")
    ]


def test_a_phone_with_keys_refuses_an_offer_without_its_payload_type_with_488() -> None:
    xml = patient_uas_scenario([Press(0, "1")], answer_after_ms=0, reject_busy=False, max_call_ms=10_000)
    elements = body(xml)
    gate = elements[1]  # right after the INVITE
    assert (gate.tag, gate.get("test"), gate.get("next")) == ("nop", "dtmf_offer", "offer_ok")
    assert sent_first_lines(xml)[:2] == ["SIP/2.0 488 Not Acceptable Here", "SIP/2.0 180 Ringing"]
    assert REJECTED_OFFER in xml
    # Without keys there is nothing to lose: no check, no refusal.
    quiet = patient_uas_scenario([], answer_after_ms=0, reject_busy=False, max_call_ms=10_000)
    assert "dtmf_offer" not in quiet
    assert "SIP/2.0 488 Not Acceptable Here" not in sent_first_lines(quiet)


@pytest.mark.parametrize("payload_type", [0, 95, 128])
def test_a_payload_type_outside_the_dynamic_range_is_refused(payload_type: int) -> None:
    with pytest.raises(PhoneError, match=f"dtmf_payload_type must be a dynamic payload type .*got {payload_type}"):
        PatientPhone("p", 5999, 30000, dtmf_payload_type=payload_type)


def test_the_presses_of_a_call_are_one_rtp_stream() -> None:
    presses = [Press(300, "1*"), Press(2000, "#")]
    first, second = (rtp_of_capture(c) for c in press_captures(presses, RtpStream(99, 65535, 1000), 101))
    assert len(first) == 26
    assert len(second) == 13
    seqs = [int.from_bytes(p[2:4], "big") for p in first + second]
    assert seqs == [65535, *range(38)]
    assert {p[8:12] for p in first + second} == {(99).to_bytes(4, "big")}
    timestamps = sorted({int.from_bytes(p[4:8], "big") for p in first + second})
    assert timestamps == [1000, 1000 + 360 * 8, 1000 + 2000 * 8]  # the second press starts 2000 ms after the first
    assert [p[12] for p in first[::13] + second[::13]] == [1, 10, 11]
    assert {p[1] & 0x7F for p in first + second} == {101}


def test_a_phone_keeps_its_captures_and_a_busy_one_has_none() -> None:
    phone = PatientPhone("p", 5999, 30000, presses=[Press(0, "12"), Press(1000, "3")])
    assert [len(rtp_of_capture(c)) for c in phone.captures] == [26, 13]
    assert PatientPhone("p", 5999, 30000, presses=[Press(0, "1")], reject_busy=True).captures == ()


def test_a_busy_phone_refuses_with_486_and_never_answers() -> None:
    xml = patient_uas_scenario([Press(0, "1")], answer_after_ms=500, reject_busy=True, max_call_ms=10_000)
    assert sent_first_lines(xml) == ["SIP/2.0 486 Busy Here"]
    assert played(xml) == []
    assert REJECTED_BUSY in xml


def test_never_answering_waits_for_the_cancel() -> None:
    xml = patient_uas_scenario([], answer_after_ms=NEVER_MS, reject_busy=False, max_call_ms=10_000)
    assert f'<recv request="CANCEL" timeout="{NEVER_MS}" ontimeout="answer">' in xml
    assert DIGITS_SENT not in xml
    assert played(xml) == []
    assert sent_first_lines(xml) == [
        "SIP/2.0 180 Ringing", "SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated", "SIP/2.0 200 OK", "SIP/2.0 200 OK",
        "BYE [$remote_contact] SIP/2.0",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("presses", "max_call_ms", "message"),
    [
        (
            [Press(0, "12"), Press(600, "3")],
            60_000,
            "press 2 starts 600 ms after press 1, whose 2 digit(s) take 620 ms",
        ),
        ([Press(0, "1"), Press(259, "2")], 60_000, "press 2 starts 259 ms after press 1"),
        ([Press(5000, "1")], 5200, "the key presses take 5260 ms, not less than max_call_ms (5200 ms)"),
        ([], 0, "max_call_ms must be positive"),
    ],
)
def test_a_script_that_cannot_play_as_written_is_refused(presses: list[Press], max_call_ms: int, message: str) -> None:
    with pytest.raises(PhoneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_script(presses, max_call_ms)
    with pytest.raises(PhoneError):
        PatientPhone("p", 5999, 30000, presses=presses, max_call_ms=max_call_ms)


def test_the_refusal_counts_digits_and_never_repeats_the_keys() -> None:
    with pytest.raises(PhoneError) as info:
        check_script([Press(0, "1956"), Press(100, "182")], 60_000)
    assert "1956" not in str(info.value)
    assert "182" not in str(info.value)


def test_a_press_may_start_exactly_when_the_previous_one_has_played() -> None:
    assert dtmf_play_ms("1") == 260
    assert dtmf_play_ms("1956") == 1340 == 360 * 4 - 100
    assert check_script([Press(0, "1956"), Press(1340, "2")], 60_000) == 1340 + 260


def test_bad_answer_delay_is_refused() -> None:
    with pytest.raises(PhoneError, match="answer_after_ms must be"):
        patient_uas_scenario([], answer_after_ms=-1, reject_busy=False, max_call_ms=1000)


def test_events_are_grouped_by_call_and_malformed_lines_are_ignored() -> None:
    log = "\n".join(
        [
            "RINGING 100.000000 250000.000000 1",
            "ANSWERED 101 0 1",
            "some SIPp chatter 1 2 3",
            "RINGING 200 5 2",
            "PRESSED 102 0 1",
            "ANSWERED 103 0",  # no call number: not one of this phone's lines
            "CANCELLED 201 0 2",
        ]
    )
    events = parse_events(log)
    assert [(e.label, e.at, e.call) for e in events] == [
        (RINGING, 100.25, 1), (ANSWERED, 101.0, 1), (RINGING, 200.000005, 2), (PRESSED, 102.0, 1),
        (CANCELLED, 201.0, 2),
    ]  # fmt: skip


def test_a_refused_offer_ends_the_call() -> None:
    log = PatientCallLog(1, (PatientEvent(RINGING, 1.0, 1), PatientEvent(REJECTED_OFFER, 1.1, 1)))
    assert log.ended
    assert not log.answered


# --- real SIPp calls -----------------------------------------------------------------------------------------------

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed")

_HOTLINE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="hotline">
  <send retrans="500">
    <![CDATA[
      INVITE sip:patient@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:hotline@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:patient@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:hotline@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=hotline 1 1 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio {rtp_port} RTP/AVP 0 {te_pt}
      a=rtpmap:0 PCMU/8000
      a=rtpmap:{te_pt} telephone-event/8000

    ]]>
  </send>
  <recv response="100" optional="true"/>
{after_invite}
</scenario>
"""

_ACK = """
  <send>
    <![CDATA[
      ACK sip:patient@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:hotline@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:patient@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""

# The hotline listens for {talk_ms} and hangs up.
_TALK_AND_HANG_UP = f"""
  <recv response="180" optional="true"/>
  <recv response="200"/>
{_ACK}
  <pause milliseconds="{{talk_ms}}"/>
  <send retrans="500">
    <![CDATA[
      BYE sip:patient@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:hotline@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:patient@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
"""

# The hotline keeps listening until the patient hangs up.
_WAIT_FOR_PATIENT_BYE = f"""
  <recv response="180" optional="true"/>
  <recv response="200"/>
{_ACK}
  <recv request="BYE" timeout="30000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
"""

_EXPECT_BUSY = f"""
  <recv response="486"/>
{_ACK}
"""

_EXPECT_NOT_ACCEPTABLE = f"""
  <recv response="488"/>
{_ACK}
"""

# The hotline gives up ringing after {ring_ms} and cancels.
_CANCEL = (
    """
  <recv response="180"/>
  <pause milliseconds="{ring_ms}"/>
  <send>
    <![CDATA[
      CANCEL sip:patient@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:hotline@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:patient@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
"""
    + _ACK
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_media_port() -> int:
    """An even UDP port with the next three free too (SIPp opens -mp and -mp+2 for its echo sockets)."""
    for _ in range(200):
        start = random.randrange(30000, 60000, 2)
        socks: list[socket.socket] = []
        try:
            for port in range(start, start + 4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free media ports")


@dataclass
class RtpEvents:
    """A UDP socket standing in for the hotline's RTP port; it decodes RFC 4733 telephone events."""

    sock: socket.socket
    packets: list[bytes] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> RtpEvents:
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.packets.append(data)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()

    def rtp(self, payload_type: int) -> list[bytes]:
        """The RTP packets received on ``payload_type``, in arrival order."""
        return [p for p in self.packets if len(p) >= 16 and p[0] >> 6 == 2 and p[1] & 0x7F == payload_type]

    def digits(self, payload_type: int = 101) -> str:
        """The keys, one per completed event, in arrival order.

        An event is completed by its end packets (E bit); its repeats (the same SSRC, timestamp and event right
        after it) count once. Repeats are told by adjacency, not by remembering every event: consecutive calls
        replay the same captures, so their events look the same.
        """
        keys: list[str] = []
        last_end: tuple[int, int, int] | None = None
        for data in self.rtp(payload_type):
            timestamp, ssrc = struct.unpack("!II", data[4:12])
            event, flags = data[12], data[13]
            if not flags & 0x80:
                last_end = None
            elif (ssrc, timestamp, event) != last_end:
                last_end = (ssrc, timestamp, event)
                keys.append(DIGIT_OF.get(event, "?"))
        return "".join(keys)


@pytest.fixture
def rtp() -> Iterator[RtpEvents]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    events = RtpEvents(sock).start()
    try:
        yield events
    finally:
        events.stop()


@dataclass(frozen=True)
class HotlineRun:
    returncode: int
    stdout: str
    errors: str


def run_hotline(
    tmp_path: Path,
    phone: PatientPhone,
    rtp_port: int,
    after_invite: str,
    *,
    calls: int = 1,
    timeout: float = 60,
    offer_payload_type: int = 101,
) -> HotlineRun:
    """The second SIPp: ``calls`` consecutive calls to the patient phone, each running ``after_invite``.

    Its offer maps telephone-event to ``offer_payload_type``.
    """
    scenario = tmp_path / "hotline.xml"
    xml = _HOTLINE.replace("{rtp_port}", str(rtp_port)).replace("{te_pt}", str(offer_payload_type))
    scenario.write_text(xml.replace("{after_invite}", after_invite))
    errors = tmp_path / "hotline-errors.log"
    args = ["sipp", f"127.0.0.1:{phone.sip_port}", "-sf", str(scenario), "-i", "127.0.0.1"]
    args += ["-p", str(free_udp_port()), "-mp", str(free_media_port()), "-m", str(calls), "-l", "1"]
    args += ["-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_err", "-error_file", str(errors)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 15, check=False)
    return HotlineRun(result.returncode, result.stdout, errors.read_text() if errors.exists() else "")


def make_phone(**kwargs: object) -> PatientPhone:
    return PatientPhone("patient", free_udp_port(), free_media_port(), **kwargs)  # type: ignore[arg-type]


@needs_sipp
def test_the_phone_answers_and_the_hotline_receives_the_digits_as_rfc4733(tmp_path: Path, rtp: RtpEvents) -> None:
    presses = [Press(300, "1*9"), Press(dtmf_play_ms("1*9"), "05#")]
    talk_ms = 300 + dtmf_play_ms("1*9") + dtmf_play_ms("05#") + 1500
    with make_phone(answer_after_ms=200, presses=presses) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _TALK_AND_HANG_UP.replace("{talk_ms}", str(talk_ms)))
        assert run.returncode == 0, f"hotline SIPp failed: {run.errors}\n{run.stdout[-2000:]}"
        assert phone.wait_for(HUNGUP_BY_SERVICE), phone.errors()
        calls = phone.calls
        captured = [packet for capture in phone.captures for packet in rtp_of_capture(capture)]
    assert rtp.digits(101) == "1*905#"
    assert rtp.rtp(96) == []
    # SIPp replays the captured RTP as is (it rewrites only addresses, ports and the UDP checksum): one SSRC and
    # consecutive sequence numbers across both presses, in the captures' order.
    assert rtp.rtp(101) == captured
    assert len({p[8:12] for p in captured}) == 1
    assert len(calls) == 1
    assert calls[0].labels == [RINGING, ANSWERED, PRESSED, PRESSED, DIGITS_SENT, HUNGUP_BY_SERVICE]
    ringing, answered, sent = calls[0].at(RINGING), calls[0].at(ANSWERED), calls[0].at(DIGITS_SENT)
    assert ringing is not None
    assert answered is not None
    assert sent is not None
    assert ringing <= answered <= sent


@needs_sipp
def test_every_consecutive_call_plays_the_same_presses(tmp_path: Path, rtp: RtpEvents) -> None:
    presses = [Press(100, "7")]
    talk_ms = 100 + dtmf_play_ms("7") + 1000
    with make_phone(answer_after_ms=100, presses=presses) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _TALK_AND_HANG_UP.replace("{talk_ms}", str(talk_ms)), calls=2)
        assert run.returncode == 0, f"hotline SIPp failed: {run.errors}\n{run.stdout[-2000:]}"
        assert phone.wait_for(HUNGUP_BY_SERVICE, count=2), phone.errors()
        calls = phone.calls
        assert phone.count(ANSWERED) == 2
    assert rtp.digits() == "77"
    assert rtp.rtp(101) == 2 * rtp_of_capture(phone.captures[0])  # each call replays the same capture
    assert [c.number for c in calls] == [1, 2]
    assert all(c.labels == [RINGING, ANSWERED, PRESSED, DIGITS_SENT, HUNGUP_BY_SERVICE] for c in calls)


@needs_sipp
def test_a_hotline_that_hangs_up_during_the_keys_is_answered_and_stops_them(tmp_path: Path, rtp: RtpEvents) -> None:
    presses = [Press(200, "1"), Press(4000, "2")]
    with make_phone(answer_after_ms=100, presses=presses) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _TALK_AND_HANG_UP.replace("{talk_ms}", "2000"))
        assert run.returncode == 0, f"the hotline's BYE was not answered: {run.errors}"
        assert phone.wait_for(HUNGUP_BY_SERVICE), phone.errors()
        calls = phone.calls
    assert calls[0].labels == [RINGING, ANSWERED, PRESSED, HUNGUP_BY_SERVICE]
    assert rtp.digits() == "1"


@needs_sipp
def test_the_patient_hangs_up_when_max_call_ms_runs_out(tmp_path: Path, rtp: RtpEvents) -> None:
    with make_phone(answer_after_ms=100, presses=[Press(0, "3")], max_call_ms=1500) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _WAIT_FOR_PATIENT_BYE)
        assert run.returncode == 0, f"hotline SIPp did not get the patient's BYE: {run.errors}"
        assert phone.wait_for(HUNGUP_BY_PATIENT), phone.errors()
        labels = phone.calls[0].labels
    assert labels == [RINGING, ANSWERED, PRESSED, DIGITS_SENT, HUNGUP_BY_PATIENT]
    assert rtp.digits() == "3"


@needs_sipp
def test_a_busy_phone_rejects_with_486(tmp_path: Path, rtp: RtpEvents) -> None:
    with make_phone(reject_busy=True, presses=[Press(0, "1")]) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _EXPECT_BUSY)
        assert run.returncode == 0, f"hotline SIPp did not see 486: {run.errors}"
        assert phone.wait_for(REJECTED_BUSY), phone.errors()
        labels = phone.calls[0].labels
    assert labels == [RINGING, REJECTED_BUSY]
    assert rtp.digits() == ""


@needs_sipp
def test_a_phone_with_keys_refuses_an_offer_on_another_payload_type(tmp_path: Path, rtp: RtpEvents) -> None:
    with make_phone(answer_after_ms=100, presses=[Press(0, "1")]) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _EXPECT_NOT_ACCEPTABLE, offer_payload_type=96)
        assert run.returncode == 0, f"hotline SIPp did not see 488: {run.errors}"
        assert phone.wait_for(REJECTED_OFFER), phone.errors()
        labels = phone.calls[0].labels
    assert labels == [RINGING, REJECTED_OFFER]
    assert rtp.packets == []


@needs_sipp
def test_a_phone_set_to_the_offers_payload_type_sends_on_it(tmp_path: Path, rtp: RtpEvents) -> None:
    talk_ms = 100 + dtmf_play_ms("*0#") + 1000
    with make_phone(answer_after_ms=100, presses=[Press(100, "*0#")], dtmf_payload_type=96) as phone:
        hang_up = _TALK_AND_HANG_UP.replace("{talk_ms}", str(talk_ms))
        run = run_hotline(tmp_path, phone, rtp.port, hang_up, offer_payload_type=96)
        assert run.returncode == 0, f"hotline SIPp failed: {run.errors}"
        assert phone.wait_for(HUNGUP_BY_SERVICE), phone.errors()
    assert rtp.digits(96) == "*0#"
    assert rtp.rtp(101) == []


@needs_sipp
def test_a_phone_that_never_answers_is_cancelled(tmp_path: Path, rtp: RtpEvents) -> None:
    with make_phone(answer_after_ms=NEVER_MS, presses=[Press(0, "1")]) as phone:
        run = run_hotline(tmp_path, phone, rtp.port, _CANCEL.replace("{ring_ms}", "700"))
        assert run.returncode == 0, f"hotline SIPp did not see 200/487 for its CANCEL: {run.errors}"
        assert phone.wait_for(CANCELLED), phone.errors()
        labels = phone.calls[0].labels
        assert phone.count(ANSWERED) == 0
    assert labels == [RINGING, CANCELLED]
    assert rtp.digits() == ""


@needs_sipp
def test_starting_on_a_port_in_use_names_the_phone_and_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = int(taken.getsockname()[1])
        phone = PatientPhone("busyport", port, free_media_port())
        with pytest.raises(PhoneError, match=f"patient phone busyport \\(sipp on port {port}\\) exited at once"):
            phone.start()
    assert phone.log_path is None  # its directory is removed again
