"""Simulated phones: SIPp scenarios that play patients (and, later, agent phones) against Asterisk.

The demo and the integration tests use the same scenario, so what the demo shows is what CI proves. One
template (``patient.xml.in``) covers every patient: it calls, presses the scripted keys as RFC 4733 events,
then either listens until the hotline hangs up or hangs up itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import MedhotlineError

SCENARIO_DIR = Path(__file__).resolve().parent
PATIENT_TEMPLATE = SCENARIO_DIR / "patient.xml.in"
# Scenario log lines "LABEL <seconds> <microseconds>" (SIPp prints its variables as doubles: "123.000000").
_STAMP = re.compile(r"^(?P<label>[A-Z_]+) (?P<s>\d+)(?:\.\d+)? (?P<us>\d+)(?:\.\d+)?$", re.MULTILINE)


class PhoneError(MedhotlineError):
    """SIPp is missing or could not run the scenario."""


@dataclass(frozen=True)
class PhoneCall:
    """What one simulated phone observed."""

    returncode: int
    stamps: dict[str, float] = field(default_factory=dict)
    log: str = ""
    errors: str = ""

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Press:
    """The caller waits ``after_ms`` (from answer, or from the previous press), then presses ``digits``."""

    after_ms: int
    digits: str

    def __post_init__(self) -> None:
        if not self.digits or any(d not in "0123456789*#" for d in self.digits) or self.after_ms < 0:
            raise PhoneError(f"not a key press: {self.digits!r} after {self.after_ms} ms")


@dataclass(frozen=True)
class Speak:
    """The caller waits ``after_ms``, then speaks: ``wav`` (8 kHz mono μ-law WAV) is streamed as RTP (PCMU)."""

    after_ms: int
    wav: Path


Action = Press | Speak


_LISTEN = """
  <recv request="BYE" timeout="120000">
    <action>
      <gettimeofday assign_to="bye_s,bye_us"/>
      <log message="HUNGUP_BY_SERVICE [$bye_s] [$bye_us]"/>
    </action>
  </recv>

  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[caller]@[local_ip]:[local_port]>
      Content-Length: 0

    ]]>
  </send>
"""

_HANG_UP = """
  <pause milliseconds="{ms}"/>

  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[caller]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: <sip:[caller]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>

  <recv response="200" crlf="true">
    <action>
      <gettimeofday assign_to="bye_s,bye_us"/>
      <log message="HUNGUP_BY_PATIENT [$bye_s] [$bye_us]"/>
    </action>
  </recv>
"""


# Through a SIP proxy (Kamailio before several nodes): keep the Record-Route of the 200 OK and send ACK and BYE
# along it to the node's Contact, instead of to the address the INVITE went to (the proxy would not know them).
_DIRECT_ACK = "ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0"
_DIRECT_BYE = "BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0"
_ANSWER = '<recv response="200" rtd="true">'


def _through_proxy(scenario: str) -> str:
    for direct, routed in (
        (_ANSWER, '<recv response="200" rtd="true" rrs="true">'),
        (_DIRECT_ACK, "ACK [next_url] SIP/2.0\n      [routes]"),
        (_DIRECT_BYE, "BYE [next_url] SIP/2.0\n      [routes]"),
    ):
        scenario = scenario.replace(direct, routed)
    return scenario


def patient_scenario(actions: Sequence[Action], hang_up_after_ms: int | None, *, proxied: bool = False) -> str:
    """The patient scenario XML: keys and speech, then listening (None) or hanging up after a pause.

    ``proxied``: the call goes through a SIP proxy that record-routes (the cluster's Kamailio front).
    """
    steps = []
    for action in actions:
        steps.append(f'  <pause milliseconds="{action.after_ms}"/>')
        if isinstance(action, Press):
            steps.append(f'  <nop><action><exec play_dtmf="{action.digits}"/></action></nop>')
        else:
            steps.append(f'  <nop><action><exec rtp_stream="{action.wav},1,0"/></action></nop>')
    ending = _LISTEN if hang_up_after_ms is None else _HANG_UP.format(ms=hang_up_after_ms)
    template = PATIENT_TEMPLATE.read_text(encoding="utf-8")
    scenario = template.replace("{{presses}}", "\n".join(steps) + "\n").replace("{{ending}}", ending)
    return _through_proxy(scenario) if proxied else scenario


def speech_wav(text: str, voice: str, target: Path, *, trailing_silence: float = 1.5) -> Path:
    """Render what a simulated patient says (espeak-ng) as the 8 kHz μ-law WAV that ``Speak`` streams."""
    raw = target.with_suffix(".raw.wav")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "140", "-w", str(raw), "--stdin"],
        input=text.encode(),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["sox", str(raw), "-r", "8000", "-c", "1", "-e", "u-law", str(target), "pad", "0.2", str(trailing_silence)],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    return target


def place_call(
    *,
    target_host: str,
    target_port: int,
    service: str,
    local_port: int,
    media_port: int,
    caller: str,
    presses: Sequence[Action] = (),
    hang_up_after_ms: int | None = None,
    timeout: float = 150.0,
    proxied: bool = False,
) -> PhoneCall:
    """Run one patient call to completion and report what the phone saw.

    The patient presses keys and speaks (``presses``), then listens until the hotline hangs up, or hangs up itself
    ``hang_up_after_ms`` after the last key (or after the answer, without keys). ``proxied``: ``target_*`` is a
    record-routing SIP proxy (``patient_scenario``).
    """
    if shutil.which("sipp") is None:
        raise PhoneError("sipp is not installed: run `apt-get install sip-tester`")
    with tempfile.TemporaryDirectory(prefix="medhotline-sipp-") as tmp:
        scenario_path = Path(tmp) / "patient.xml"
        scenario_path.write_text(patient_scenario(presses, hang_up_after_ms, proxied=proxied), encoding="utf-8")
        log_file = Path(tmp) / "messages.log"
        err_file = Path(tmp) / "errors.log"
        args = [
            "sipp",
            f"{target_host}:{target_port}",
            "-sf",
            str(scenario_path),
            "-s",
            service,
            "-key",
            "caller",
            caller,
            "-i",
            target_host,
            "-p",
            str(local_port),
            "-mp",
            str(media_port),
            "-m",
            "1",
            "-l",
            "1",
            "-nostdin",
            "-timeout",
            f"{int(timeout)}s",
            "-timeout_error",
            "-trace_logs",
            "-log_file",
            str(log_file),
            "-trace_err",
            "-error_file",
            str(err_file),
        ]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 15, check=False)
        except subprocess.TimeoutExpired:
            raise PhoneError(f"sipp did not finish within {timeout + 15:.0f}s") from None
        log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
        errors = err_file.read_text(errors="replace") if err_file.exists() else result.stderr
    stamps = {m.group("label"): int(m.group("s")) + int(m.group("us")) / 1e6 for m in _STAMP.finditer(log_text)}
    return PhoneCall(result.returncode, stamps, log_text, errors)
