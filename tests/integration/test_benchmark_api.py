"""The CI smoke of ``python -m benchmarks.api`` (its ``--smoke`` run, about 45 s): real SIPp calls through the
sandbox, the wallboard's stream read by a signed-in supervisor, each change matched to its Asterisk event.

Correctness of the measurement only (every change is matched to an event that came before it); the figures
themselves are never asserted (the machine is shared)."""

from __future__ import annotations

import argparse
import asyncio
import shutil

import pytest

from benchmarks import api_calls
from tests.integration.conftest import unavailable

pytestmark = pytest.mark.integration


def test_the_real_call_benchmark_matches_every_wallboard_change_to_an_earlier_asterisk_event() -> None:
    if shutil.which("sipp") is None:
        unavailable("sipp is not installed (apt-get install sip-tester)")
    parser = argparse.ArgumentParser()
    api_calls.add_arguments(parser)
    args = parser.parse_args(["--smoke"])
    api_calls.smoke(args)
    phases = asyncio.run(api_calls.main_async(args))
    assert [p.name for p in phases] == ["baseline", "load"]
    for phase in phases:
        assert sum(phase.outcomes.values()) == phase.calls, phase.outcomes
        assert phase.sipp_ok + phase.sipp_failed == phase.calls
        # Every call showed up waiting or was answered at once, and every call left the board again.
        assert phase.samples["ended"], phase
        assert phase.samples["waiting"] or phase.samples["talking"], phase
        assert phase.unmatched == 0, phase
        # An origin after the arrival would be a mismatched event (the same host clock on both sides).
        assert min(phase.all_samples()) >= 0, phase.samples
    load = phases[1]
    assert len(load.samples["waiting"]) >= load.calls - args.agents, load.samples  # more callers than agents wait
