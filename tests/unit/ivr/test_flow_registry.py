"""Hot reload: calls keep the version they started on; valid edits reach new calls; invalid edits change nothing."""

from __future__ import annotations

import os
from pathlib import Path

from structlog.testing import capture_logs

from ivr.flow_registry import FlowRegistry

FLOW = """
flow: demo
start: hello
nodes:
  hello:
    type: play
    say: {text}
    next: bye
  bye:
    type: hangup
"""


def write(path: Path, text: str, tick: int) -> None:
    path.write_text(FLOW.format(text=text), encoding="utf-8")
    # Distinct modification times even on coarse file-system clocks.
    os.utime(path, ns=(tick * 1_000_000_000, tick * 1_000_000_000))


def test_a_call_keeps_its_snapshot_while_new_calls_get_the_edit(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    write(path, "第一版", 1)
    registry = FlowRegistry(tmp_path)
    assert registry.refresh() == []
    in_flight = registry.current  # what a call that started now holds

    write(path, "第二版", 2)
    assert registry.refresh() == []

    assert in_flight["demo"].flow.nodes["hello"].say == "第一版"
    assert registry.current["demo"].flow.nodes["hello"].say == "第二版"
    assert registry.current["demo"].version != in_flight["demo"].version


def test_an_invalid_edit_is_rejected_and_logged_and_the_last_good_version_serves(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    write(path, "第一版", 1)
    registry = FlowRegistry(tmp_path)
    registry.refresh()
    good = registry.current["demo"]

    path.write_text(FLOW.format(text="坏的").replace("next: bye", "next: nowhere"), encoding="utf-8")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    with capture_logs() as logs:
        problems = registry.refresh()

    assert problems
    assert any("nowhere" in str(p) for p in problems)
    assert registry.current["demo"] is good
    assert any(entry["event"] == "flows.rejected" and "nowhere" in entry["problem"] for entry in logs)


def test_nothing_changed_means_no_reload(tmp_path: Path) -> None:
    write(tmp_path / "demo.yaml", "第一版", 1)
    registry = FlowRegistry(tmp_path)
    registry.refresh()
    snapshot = registry.current

    assert registry.refresh() is None
    assert registry.current is snapshot
