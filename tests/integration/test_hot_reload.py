"""Administrators edit the flow while the service runs: the next call takes the new path; a broken edit is
rejected and the last good version keeps answering. Runs against the session's editable copy of the flows."""

from __future__ import annotations

import time

import pytest

from medhotline.phones import Press
from tests.integration.conftest import Hotline

pytestmark = pytest.mark.integration

RELOAD_WAIT = 2.0  # several reload intervals (0.3 s in the test configuration)


def test_valid_edit_changes_the_next_call_and_invalid_edit_is_rejected(hotline: Hotline) -> None:
    path = hotline.config.hotline.flows_dir / "hotline.yaml"
    original = path.read_text(encoding="utf-8")
    try:
        # Key 5 now leads to medication guidance instead of general health questions.
        edited = original.replace("5: general, 9: main_menu}", "5: medication, 9: main_menu}", 1)
        assert edited != original
        path.write_text(edited, encoding="utf-8")
        time.sleep(RELOAD_WAIT)
        before = hotline.call_ids()
        assert hotline.call("12320", presses=[Press(1500, "5")]).succeeded
        first = hotline.finished_record(before)
        assert first.last_step == "medication"

        # A broken edit (a menu pointing nowhere) must not change anything for callers.
        path.write_text(edited.replace("2: medication,", "2: nowhere,", 1), encoding="utf-8")
        time.sleep(RELOAD_WAIT)
        before = hotline.call_ids()
        assert hotline.call("agi-12320", presses=[Press(1500, "5")]).succeeded
        second = hotline.finished_record(before)
        assert second.last_step == "medication"
        assert second.flow_version == first.flow_version
    finally:
        path.write_text(original, encoding="utf-8")
        time.sleep(RELOAD_WAIT)

    before = hotline.call_ids()
    assert hotline.call("12320", presses=[Press(1500, "5")]).succeeded
    restored = hotline.finished_record(before)
    assert restored.last_step == "general"
    assert restored.flow_version not in (first.flow_version, None)
