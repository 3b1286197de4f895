"""A simulated patient phone that the hotline *calls*: a SIPp UAS at a static contact, for outreach tests.

The scheduler's outbound calls (follow-ups, medication reminders) reach it through the sandbox trunk. For every
incoming call it rings, then refuses busy (486), or answers after ``answer_after_ms`` (never, with
:data:`~medhotline.phones.agent.NEVER_MS`: the hotline's ring timeout CANCELs it), presses the scripted keys
as RFC 4733 telephone events, and listens until the hotline hangs up or ``max_call_ms`` after the answer. The
same script plays for every call, so the scheduler's retries meet the same patient.

What it saw is read back from its scenario log as events with timestamps and the SIPp call number, so several
consecutive calls are told apart: RINGING, CANCELLED, REJECTED_BUSY, REJECTED_OFFER, ANSWERED, PRESSED (a press
began), DIGITS_SENT (the last press has been played out), HUNGUP_BY_SERVICE, HUNGUP_BY_PATIENT.

Keys. Each press is an RFC 4733 capture (:mod:`medhotline.phones.dtmf_pcap`) replayed with SIPp's
``play_pcap_audio``, on the telephone-event payload type the hotline's offer uses (``dtmf_payload_type``, 101 as
Asterisk offers it). Not SIPp's ``play_dtmf``: SIPp 3.6.1 sends that on payload type 96 only, and Asterisk, the
offerer here, drops RTP on a payload type it did not offer. The answer declares the same payload type, and a
phone with keys to press checks that the offer maps telephone-event to it: if not, it refuses the call with 488
(REJECTED_OFFER) rather than answer and lose every digit silently. The presses of a call continue one RTP
stream (one SSRC, sequence numbers and timestamps carrying on from press to press).

Timing of keys. A press of n keys lasts :func:`dtmf_play_ms` = 360 n - 100 ms from its start: each key is a 200 ms
tone (a packet every 20 ms), then three 20 ms end packets, then 100 ms of silence before the next key. A
second play started before the first has finished cancels it, so a press must wait at least
:func:`dtmf_play_ms` of the previous one; the constructor refuses a script that would cut a press short,
instead of letting digits silently go missing. Waits are waits for the hotline's BYE with a timeout (not
``<pause>``), so a hang-up in the middle of the script is answered and logged rather than aborting the scenario.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from medhotline.phones import _STAMP, SCENARIO_DIR, PhoneError, Press
from medhotline.phones.agent import NEVER_MS
from medhotline.phones.dtmf_pcap import DYNAMIC_PAYLOAD_TYPES, RtpStream, dtmf_pcap, play_ms

PATIENT_UAS_TEMPLATE: Final = SCENARIO_DIR / "patient_uas.xml.in"

RINGING: Final = "RINGING"
CANCELLED: Final = "CANCELLED"
REJECTED_BUSY: Final = "REJECTED_BUSY"
REJECTED_OFFER: Final = "REJECTED_OFFER"
ANSWERED: Final = "ANSWERED"
PRESSED: Final = "PRESSED"
DIGITS_SENT: Final = "DIGITS_SENT"
HUNGUP_BY_SERVICE: Final = "HUNGUP_BY_SERVICE"
HUNGUP_BY_PATIENT: Final = "HUNGUP_BY_PATIENT"

# The payload type Asterisk offers telephone-event on; the phone sends its keys on it and answers with it.
DTMF_PAYLOAD_TYPE: Final = 101
_MAX_TIMEOUT_MS: Final = NEVER_MS

# The phones' stamp ("LABEL <s> <us>") followed by the SIPp call number the line belongs to.
_EVENT: Final = re.compile(_STAMP.pattern.removesuffix("$") + r" (?P<call>\d+)$", re.MULTILINE)


def dtmf_play_ms(digits: str) -> int:
    """How long a press of ``digits`` lasts, from its start to the end of its last packet: 360 n - 100 ms."""
    return play_ms(digits)


def capture_name(index: int) -> str:
    """The file of press ``index`` (from 0), next to the scenario (SIPp looks for captures there)."""
    return f"press{index + 1}.pcap"


@dataclass(frozen=True)
class PatientEvent:
    label: str
    at: float
    call: int


@dataclass(frozen=True)
class PatientCallLog:
    """The events of one call the phone received (SIPp numbers its calls from 1), in order."""

    number: int
    events: tuple[PatientEvent, ...]

    @property
    def labels(self) -> list[str]:
        return [event.label for event in self.events]

    def at(self, label: str) -> float | None:
        """When ``label`` first happened in this call, or None."""
        return next((event.at for event in self.events if event.label == label), None)

    @property
    def answered(self) -> bool:
        return self.at(ANSWERED) is not None

    @property
    def ended(self) -> bool:
        endings = (CANCELLED, REJECTED_BUSY, REJECTED_OFFER, HUNGUP_BY_SERVICE, HUNGUP_BY_PATIENT)
        return any(label in self.labels for label in endings)


def _log(label: str, var: str) -> str:
    return f'<gettimeofday assign_to="{var}_s,{var}_us"/><log message="{label} [${var}_s] [${var}_us] [call_number]"/>'


def _wait_for_bye(ms: int, then: str) -> list[str]:
    """Wait ``ms`` for the hotline's BYE (handled at ``bye``), else go on at label ``then``."""
    if ms <= 0:
        return []
    return [f'  <recv request="BYE" timeout="{ms}" ontimeout="{then}" next="bye"/>', f'  <label id="{then}"/>']


# Captured from the INVITE by a phone that answers: the CSeq for the 487 after a CANCEL, and for the patient's own
# BYE the dialog's parties seen from this side and where to send it.
_DIALOG = """\
      <ereg regexp=".*" search_in="hdr" header="CSeq:" check_it="true" assign_to="inv_cseq"/>
      <ereg regexp=".*" search_in="hdr" header="From:" check_it="true" assign_to="remote_party"/>
      <ereg regexp=".*" search_in="hdr" header="To:" check_it="true" assign_to="local_party"/>
      <ereg regexp="sip:[^&gt;;]*" search_in="hdr" header="Contact:" check_it="true" assign_to="remote_contact"/>"""

# A phone with keys to press needs the offer to carry telephone-event on the payload type its captures use. A
# failed check_it would only be noted in SIPp's error file (the scenario goes on and the digits are lost), so the
# match is tested instead: without it the call is refused as a media mismatch.
_OFFER_CHECK = """
      <ereg regexp="a=rtpmap:{pt} telephone-event/8000" search_in="body" assign_to="dtmf_offer"/>"""

_OFFER_GATE = """
  <nop test="dtmf_offer" next="offer_ok"/>
  <nop><action>{log}</action></nop>
  <send>
    <![CDATA[
      SIP/2.0 488 Not Acceptable Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Warning: 305 [local_ip] "telephone-event is not offered on payload type {pt}"
      Content-Length: 0

    ]]>
  </send>
  <recv request="ACK" next="end"/>
  <label id="offer_ok"/>
"""

_BUSY = """
  <nop><action>{log}</action></nop>
  <send>
    <![CDATA[
      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <recv request="ACK" next="end"/>
"""

_RING = """
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
  <recv request="CANCEL" timeout="{answer_after_ms}" ontimeout="answer">
    <action>{cancelled}</action>
  </recv>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <send>
    <![CDATA[
      SIP/2.0 487 Request Terminated
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      CSeq:[$inv_cseq]
      Content-Length: 0

    ]]>
  </send>
  <recv request="ACK" next="end"/>
  <label id="answer"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=patient 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 {pt}
      a=rtpmap:0 PCMU/8000
      a=rtpmap:{pt} telephone-event/8000
      a=fmtp:{pt} 0-16
      a=sendrecv

    ]]>
  </send>
  <recv request="ACK">
    <action>{answered}</action>
  </recv>
{presses}
  <label id="bye"/>
  <nop><action>{hungup_by_service}</action></nop>
  <send next="end">
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
  <label id="hang_up"/>
  <send retrans="500">
    <![CDATA[
      BYE [$remote_contact] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From:[$local_party];tag=[pid]SIPpTag01[call_number]
      To:[$remote_party]
      [last_Call-ID:]
      CSeq: 1 BYE
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200">
    <action>{hungup_by_patient}</action>
  </recv>
"""


def check_script(presses: Sequence[Press], max_call_ms: int) -> int:
    """The time the script takes from the answer to its last tone; PhoneError if it cannot play as written.

    Refused: a press that starts before the previous one has played out (SIPp would cut that one short) and a
    script longer than ``max_call_ms``. Messages count presses and digits; they never repeat the keys.
    """
    if max_call_ms <= 0:
        raise PhoneError(f"max_call_ms must be positive, got {max_call_ms}")
    total = 0
    for index, press in enumerate(presses):
        if index > 0:
            needed = dtmf_play_ms(presses[index - 1].digits)
            if press.after_ms < needed:
                raise PhoneError(
                    f"press {index + 1} starts {press.after_ms} ms after press {index}, whose "
                    f"{len(presses[index - 1].digits)} digit(s) take {needed} ms to play: SIPp would cut them off"
                )
        total += press.after_ms
    if presses:
        total += dtmf_play_ms(presses[-1].digits)
    if total >= max_call_ms:
        raise PhoneError(f"the key presses take {total} ms, not less than max_call_ms ({max_call_ms} ms)")
    return total


def press_captures(presses: Sequence[Press], stream: RtpStream, payload_type: int) -> list[bytes]:
    """The capture of every press, in order: one RTP stream from ``stream`` on, each press where it starts.

    The presses must have passed :func:`check_script` (each starts after the previous one has played).
    """
    captures: list[bytes] = []
    for index, press in enumerate(presses):
        if index > 0:
            stream = stream.after(presses[index - 1].digits, press.after_ms)
        captures.append(dtmf_pcap(press.digits, stream, payload_type))
    return captures


def patient_uas_scenario(
    presses: Sequence[Press],
    *,
    answer_after_ms: int,
    reject_busy: bool,
    max_call_ms: int,
    dtmf_payload_type: int = DTMF_PAYLOAD_TYPE,
) -> str:
    """The scenario XML of a called patient (see the module docstring); PhoneError for an unplayable script.

    Press ``i`` (from 0) plays the capture :func:`capture_name` ``(i)``, which must lie next to the scenario.
    """
    if not 0 <= answer_after_ms <= _MAX_TIMEOUT_MS:
        raise PhoneError(f"answer_after_ms must be 0-{_MAX_TIMEOUT_MS}, got {answer_after_ms}")
    if dtmf_payload_type not in DYNAMIC_PAYLOAD_TYPES:
        raise PhoneError(f"dtmf_payload_type must be a dynamic payload type (96-127), got {dtmf_payload_type}")
    scripted_ms = check_script(presses, max_call_ms)
    if reject_busy:
        dialog, on_invite = "", _BUSY.format(log=_log(REJECTED_BUSY, "b"))
    else:
        steps: list[str] = []
        for index, press in enumerate(presses):
            steps += _wait_for_bye(press.after_ms, f"press{index + 1}")
            play = f'<exec play_pcap_audio="{capture_name(index)}"/>'
            steps.append(f"  <nop><action>{_log(PRESSED, 'p')}{play}</action></nop>")
        if presses:
            steps += _wait_for_bye(dtmf_play_ms(presses[-1].digits), "played")
            steps.append(f"  <nop><action>{_log(DIGITS_SENT, 'd')}</action></nop>")
        # Listen for the rest of max_call_ms, then hang up (the fall-through to "bye" is the BYE received).
        steps.append(f'  <recv request="BYE" timeout="{max_call_ms - scripted_ms}" ontimeout="hang_up"/>')
        dialog, gate = _DIALOG, ""
        if presses:
            dialog += _OFFER_CHECK.format(pt=dtmf_payload_type)
            gate = _OFFER_GATE.format(pt=dtmf_payload_type, log=_log(REJECTED_OFFER, "o"))
        on_invite = gate + _RING.format(
            pt=dtmf_payload_type,
            answer_after_ms=max(answer_after_ms, 1),  # timeout="0" would mean "wait for ever"
            cancelled=_log(CANCELLED, "c"),
            answered=_log(ANSWERED, "a"),
            presses="\n".join(steps),
            hungup_by_service=_log(HUNGUP_BY_SERVICE, "h"),
            hungup_by_patient=_log(HUNGUP_BY_PATIENT, "h"),
        )
    template = PATIENT_UAS_TEMPLATE.read_text(encoding="utf-8")
    for part in ("{{dialog}}", "{{on_invite}}"):
        if template.count(part) != 1:
            raise PhoneError(f"{PATIENT_UAS_TEMPLATE}: expected {part} exactly once")
    return template.replace("{{dialog}}", dialog).replace("{{on_invite}}", on_invite)


def parse_events(log_text: str) -> list[PatientEvent]:
    """The events of a patient phone's scenario log, in the order they were written."""
    return [
        PatientEvent(m.group("label"), int(m.group("s")) + int(m.group("us")) / 1e6, int(m.group("call")))
        for m in _EVENT.finditer(log_text)
    ]


class PatientPhone:
    """A called patient's phone. Start with :meth:`start`, stop with :meth:`stop` (or use ``with``).

    It registers nothing: the hotline reaches it at :attr:`contact` (the sandbox's trunk or endpoint points
    there), and it takes any number of consecutive calls, playing the same ``presses`` in each (the same
    captures: every call's keys are one RTP stream with this phone's random SSRC and starting points).
    ``dtmf_payload_type`` must be the telephone-event payload type of the hotline's offer.
    """

    def __init__(
        self,
        name: str,
        sip_port: int,
        media_port: int,
        *,
        answer_after_ms: int = 500,
        presses: Sequence[Press] = (),
        reject_busy: bool = False,
        max_call_ms: int = 60_000,
        dtmf_payload_type: int = DTMF_PAYLOAD_TYPE,
    ) -> None:
        self.name = name
        self.sip_port = sip_port
        self.media_port = media_port
        self.answer_after_ms = answer_after_ms
        self.presses = tuple(presses)
        self.reject_busy = reject_busy
        self.max_call_ms = max_call_ms
        self.dtmf_payload_type = dtmf_payload_type
        # Rendered now, so a script that cannot play fails at construction, not silently during a test.
        self._scenario = patient_uas_scenario(
            self.presses,
            answer_after_ms=answer_after_ms,
            reject_busy=reject_busy,
            max_call_ms=max_call_ms,
            dtmf_payload_type=dtmf_payload_type,
        )
        # RFC 3550 wants the SSRC and the first sequence number and timestamp random.
        stream = RtpStream(secrets.randbits(32), secrets.randbelow(1 << 16), secrets.randbits(32))
        self._captures = [] if reject_busy else press_captures(self.presses, stream, dtmf_payload_type)
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def contact(self) -> str:
        return f"sip:{self.name}@127.0.0.1:{self.sip_port}"

    @property
    def scenario(self) -> str:
        return self._scenario

    @property
    def captures(self) -> tuple[bytes, ...]:
        """The pcap file of each press, in order, as SIPp replays them in every call."""
        return tuple(self._captures)

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "patient.log"

    def start(self) -> PatientPhone:
        if shutil.which("sipp") is None:
            raise PhoneError("sipp is not installed: run `apt-get install sip-tester`")
        if self._process is not None:
            raise PhoneError(f"patient phone {self.name} (port {self.sip_port}) is already running")
        self.stop()  # a log kept by stop(remove=False) goes: SIPp numbers the calls from 1 again
        self._dir = Path(tempfile.mkdtemp(prefix=f"medhotline-patient-{self.name}-"))
        scenario = self._dir / "patient_uas.xml"
        scenario.write_text(self._scenario, encoding="utf-8")
        for index, capture in enumerate(self._captures):
            (self._dir / capture_name(index)).write_bytes(capture)
        args = ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(self.sip_port), "-mp", str(self.media_port)]
        args += ["-nostdin", "-trace_logs", "-log_file", str(self._dir / "patient.log")]
        args += ["-trace_err", "-error_file", str(self._dir / "errors.log")]
        # In the scenario's directory: SIPp looks for the captures next to the scenario, else in its working one.
        self._process = subprocess.Popen(args, cwd=self._dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.2)
        if self._process.poll() is not None:
            err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
            self.stop()
            raise PhoneError(f"patient phone {self.name} (sipp on port {self.sip_port}) exited at once: {err.strip()}")
        return self

    def events(self) -> list[PatientEvent]:
        path = self.log_path
        text = path.read_text(errors="replace") if path is not None and path.exists() else ""
        return parse_events(text)

    def count(self, label: str) -> int:
        return sum(1 for event in self.events() if event.label == label)

    @property
    def calls(self) -> list[PatientCallLog]:
        """One entry per call received so far, in SIPp's call order."""
        by_call: dict[int, list[PatientEvent]] = {}
        for event in self.events():
            by_call.setdefault(event.call, []).append(event)
        return [PatientCallLog(number, tuple(events)) for number, events in sorted(by_call.items())]

    def wait_for(self, label: str, *, count: int = 1, timeout: float = 30.0) -> bool:
        """Poll the log until ``label`` has happened ``count`` times; False when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while self.count(label) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def errors(self) -> str:
        """What SIPp reported as unexpected (its error file), for a failing test's message."""
        path = None if self._dir is None else self._dir / "errors.log"
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def stop(self, *, remove: bool = True) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stderr is not None:
                process.stderr.close()
        if remove and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PatientPhone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
