"""Many patients at once: one SIPp process places ``count`` calls at a fixed rate, so they overlap.

``place_call`` runs one caller and reads what it saw; a batch is for load (the cluster's 40 concurrent calls,
``benchmarks.cluster``) and reports only what SIPp counts: calls that succeeded and calls that failed at the SIP
level (an error answer, a timeout, an unexpected message), plus the mean INVITE → 200 OK time.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from medhotline.phones import PhoneError, patient_scenario


@dataclass(frozen=True)
class CallBatch:
    """What SIPp counted over a batch of calls."""

    placed: int
    successful: int
    failed: int
    # Seconds from the first INVITE to the end of the last call (SIPp's own run time, start-up excluded).
    elapsed: float
    # Mean INVITE sent → 200 OK received, over the successful calls (SIPp's ResponseTime1), seconds.
    answer_mean: float | None
    errors: str = ""
    # Every answered call's INVITE → 200 OK, seconds, in SIPp's order (its ``-trace_rtt`` file).
    answer_times: tuple[float, ...] = ()


def _duration(value: str) -> float | None:
    """SIPp's ``HH:MM:SS:uuuuuu`` (or ``HH:MM:SS.uuuuuu``) as seconds."""
    parts = value.replace(".", ":").split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    hours, minutes, seconds, micros = (int(p) for p in parts)
    return hours * 3600 + minutes * 60 + seconds + micros / 1e6


def _rtt_seconds(text: str) -> list[float]:
    """The response times of SIPp's ``-trace_rtt`` file (``Date_ms;response_time_ms;rtd_no`` rows after a
    header) as seconds; rows it cannot read are skipped."""
    times = []
    for row in text.strip().splitlines()[1:]:
        fields = row.split(";")
        with contextlib.suppress(ValueError, IndexError):
            times.append(float(fields[1]) / 1000)
    return times


def place_calls(
    *,
    target_host: str,
    target_port: int,
    service: str,
    local_port: int,
    media_port: int,
    caller: str,
    count: int,
    rate: float,
    hang_up_after_ms: int,
    proxied: bool = False,
    timeout: float = 60.0,
) -> CallBatch:
    """Place ``count`` calls at ``rate`` calls/s, each hanging up ``hang_up_after_ms`` after its answer (no keys:
    the callers stay in the IVR's first menu when that is longer than the hold). All may be up at once (``-l``).
    ``proxied``: ``target_*`` is a record-routing SIP proxy (``patient_scenario``)."""
    if count < 1 or rate <= 0:
        raise PhoneError(f"a batch needs at least one call at a positive rate, not {count} at {rate}/s")
    if shutil.which("sipp") is None:
        raise PhoneError("sipp is not installed: run `apt-get install sip-tester`")
    with tempfile.TemporaryDirectory(prefix="medhotline-sipp-batch-") as tmp:
        work = Path(tmp)
        scenario = work / "patient.xml"
        scenario.write_text(patient_scenario([], hang_up_after_ms, proxied=proxied), encoding="utf-8")
        stats, err_file = work / "stats.csv", work / "errors.log"
        args = [
            "sipp", f"{target_host}:{target_port}", "-sf", str(scenario), "-s", service, "-key", "caller", caller,
            "-i", target_host, "-p", str(local_port), "-mp", str(media_port),
            "-r", f"{rate:g}", "-l", str(count), "-m", str(count), "-nostdin",
            "-timeout", f"{int(timeout)}s",
            # One stats row at the end (a period longer than the run), errors kept for the report.
            "-trace_stat", "-stf", str(stats), "-fd", "3600", "-trace_err", "-error_file", str(err_file),
            "-trace_rtt", "-rtt_freq", "1",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            subprocess.run(args, capture_output=True, check=False, timeout=timeout + 15, cwd=work)
        except subprocess.TimeoutExpired:
            raise PhoneError(f"sipp did not finish {count} calls within {timeout + 15:.0f}s") from None
        wall = time.monotonic() - started
        rows = stats.read_text(errors="replace").strip().splitlines() if stats.exists() else []
        errors = err_file.read_text(errors="replace")[-2000:] if err_file.exists() else ""
        answers = tuple(t for rtt in work.glob("*_rtt.csv") for t in _rtt_seconds(rtt.read_text(errors="replace")))
    if len(rows) < 2:
        return CallBatch(count, 0, count, wall, None, errors or "sipp wrote no statistics")
    value = dict(zip(rows[0].split(";"), rows[-1].split(";"), strict=False))
    elapsed = _duration(value.get("ElapsedTime(C)", "")) or wall
    return CallBatch(
        placed=count,
        successful=int(value.get("SuccessfulCall(C)", 0) or 0),
        failed=int(value.get("FailedCall(C)", 0) or 0),
        elapsed=elapsed,
        answer_mean=_duration(value.get("ResponseTime1(C)", "")),
        errors=errors,
        answer_times=answers,
    )
