"""The agent's upgrade sequence: pressed in order, within the gap, once."""

from __future__ import annotations

import pytest

from routing.upgrade import UpgradeKeys


def test_the_sequence_upgrades_once() -> None:
    keys = UpgradeKeys("*0")
    assert not keys.press("*", 0.0)
    assert keys.press("0", 0.5)
    assert not keys.press("*", 1.0)
    assert not keys.press("0", 1.2)  # already upgraded: nothing more to do


def test_other_keys_before_it_do_not_matter() -> None:
    keys = UpgradeKeys("*0")
    assert not any(keys.press(k, t) for t, k in enumerate("1203#*", start=0))
    assert keys.press("0", 6.0)


@pytest.mark.parametrize("pressed", ["0*", "0", "*", "*1", "**"])
def test_anything_else_does_not_upgrade(pressed: str) -> None:
    keys = UpgradeKeys("*0")
    assert not any(keys.press(k, i * 0.2) for i, k in enumerate(pressed))


def test_keys_too_far_apart_start_again() -> None:
    keys = UpgradeKeys("*0", gap=3.0)
    assert not keys.press("*", 0.0)
    assert not keys.press("0", 3.5)
    assert not keys.press("*", 4.0)
    assert keys.press("0", 5.0)


@pytest.mark.parametrize("sequence", ["", "0", "*0*0*", "ab"])
def test_a_bad_sequence_is_refused(sequence: str) -> None:
    with pytest.raises(ValueError, match="2 to 4 keys"):
        UpgradeKeys(sequence)
