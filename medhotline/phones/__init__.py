"""Simulated phones: SIPp scenarios that play patients (and, later, agent phones) against Asterisk.

The demo and the integration tests use the same scenarios, so what the demo shows is what CI proves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from medhotline.errors import MedhotlineError

SCENARIO_DIR = Path(__file__).resolve().parent
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


def scenario(name: str) -> Path:
    path = SCENARIO_DIR / f"{name}.xml"
    if not path.exists():
        raise PhoneError(f"no SIPp scenario {name!r} in {SCENARIO_DIR}")
    return path


def _presses_xml(presses: list[Press]) -> str:
    steps = []
    for press in presses:
        steps.append(f'  <pause milliseconds="{press.after_ms}"/>')
        steps.append(f'  <nop><action><exec play_dtmf="{press.digits}"/></action></nop>')
    return "\n".join(steps) + "\n"


def place_call(
    name: str,
    *,
    target_host: str,
    target_port: int,
    service: str,
    local_port: int,
    media_port: int,
    keys: dict[str, str] | None = None,
    pause_ms: int = 0,
    presses: list[Press] | None = None,
    timeout: float = 90.0,
) -> PhoneCall:
    """Run one call of a SIPp client scenario to completion and report what the phone saw.

    ``keys`` fill ``[keyword]`` placeholders in messages; ``pause_ms`` is the length of a scenario's bare
    ``<pause/>`` (SIPp's ``-d``), e.g. how long a patient listens before hanging up.
    """
    if shutil.which("sipp") is None:
        raise PhoneError("sipp is not installed: run `apt-get install sip-tester`")
    with tempfile.TemporaryDirectory(prefix="medhotline-sipp-") as tmp:
        log_file = Path(tmp) / "messages.log"
        if presses is not None:
            template = (SCENARIO_DIR / f"{name}.xml.in").read_text(encoding="utf-8")
            scenario_path = Path(tmp) / f"{name}.xml"
            scenario_path.write_text(template.replace("{{presses}}", _presses_xml(presses)), encoding="utf-8")
        else:
            scenario_path = scenario(name)
        err_file = Path(tmp) / "errors.log"
        args = [
            "sipp",
            f"{target_host}:{target_port}",
            "-sf",
            str(scenario_path),
            "-s",
            service,
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
        for key, value in (keys or {}).items():
            args += ["-key", key, value]
        if pause_ms:
            args += ["-d", str(pause_ms)]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 15, check=False)
        except subprocess.TimeoutExpired:
            raise PhoneError(f"sipp scenario {name!r} did not finish within {timeout + 15:.0f}s") from None
        log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
        errors = err_file.read_text(errors="replace") if err_file.exists() else result.stderr
    stamps = {m.group("label"): int(m.group("s")) + int(m.group("us")) / 1e6 for m in _STAMP.finditer(log_text)}
    return PhoneCall(result.returncode, stamps, log_text, errors)
