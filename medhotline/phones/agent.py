"""A simulated agent phone: a SIPp UAS at the agent's static SIP contact, for the demo and integration tests.

It rings for every call, answers after ``answer_after_ms`` (or lets a cancelled ring end with 487), and hangs up
after ``talk_ms`` unless the hotline hangs up first. Given ``play`` (a libpcap capture of RTP, e.g.
:func:`medhotline.phones.tone_pcap.tone_pcap`), it sends that audio from the answer on, as a real phone sends
its microphone: a bridge only mixes what a phone sends, so a silent phone would hide what a barge says. What it
saw is read back from its scenario log as (event, timestamp) pairs: RINGING, CANCELLED, ANSWERED.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from medhotline.phones import _STAMP, SCENARIO_DIR, PhoneError

AGENT_TEMPLATE = SCENARIO_DIR / "agent.xml.in"
NEVER_MS = 3_600_000  # "never answers": longer than any ring timeout


@dataclass(frozen=True)
class AgentEvent:
    label: str
    at: float


class AgentPhone:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    def __init__(
        self,
        name: str,
        port: int,
        media_port: int,
        *,
        answer_after_ms: int = 500,
        talk_ms: int = 2000,
        play: bytes | None = None,
    ):
        self.name = name
        self.port = port
        self.media_port = media_port
        self.answer_after_ms = answer_after_ms
        self.talk_ms = talk_ms
        self.play = play
        self._dir = Path(tempfile.mkdtemp(prefix=f"medhotline-agent-{name}-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def contact(self) -> str:
        return f"sip:{self.name}@127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "agent.log"

    def start(self) -> AgentPhone:
        if shutil.which("sipp") is None:
            raise PhoneError("sipp is not installed: run `apt-get install sip-tester`")
        scenario = self._dir / "agent.xml"
        text = AGENT_TEMPLATE.read_text(encoding="utf-8")
        text = text.replace("{{answer_after_ms}}", str(self.answer_after_ms)).replace("{{talk_ms}}", str(self.talk_ms))
        play = ""
        if self.play is not None:
            capture = self._dir / "play.pcap"
            capture.write_bytes(self.play)
            play = f'\n      <exec play_pcap_audio="{capture}"/>'
        text = text.replace("{{play}}", play)
        scenario.write_text(text, encoding="utf-8")
        args = ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(self.port), "-mp", str(self.media_port)]
        args += ["-nostdin", "-trace_logs", "-log_file", str(self.log_path)]
        args += ["-trace_err", "-error_file", str(self._dir / "errors.log")]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.2)
        if self._process.poll() is not None:
            err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
            raise PhoneError(f"agent phone {self.name} (sipp on port {self.port}) exited at once: {err.strip()}")
        return self

    def events(self) -> list[AgentEvent]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [
            AgentEvent(m.group("label"), int(m.group("s")) + int(m.group("us")) / 1e6) for m in _STAMP.finditer(text)
        ]

    def count(self, label: str) -> int:
        return sum(1 for event in self.events() if event.label == label)

    def set_answer(self, answer_after_ms: int) -> None:
        """Change how the phone behaves for the next calls (restarts the phone on the same port)."""
        self.stop(remove=False)
        self.answer_after_ms = answer_after_ms
        self.start()

    def stop(self, *, remove: bool = True) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None
        if remove:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> AgentPhone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
