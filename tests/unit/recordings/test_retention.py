"""Retention of recordings: the 15-year floor (in code and in configuration), the retention date (29 February
included), the class of a call's records, and whether a removal is allowed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from ground.config import RETENTION_FLOOR_YEARS, ConfigError, RetentionYears, load_config
from recordings.retention import (
    RETENTION_CLASSES,
    RetentionClass,
    RetentionError,
    RetentionPolicy,
    check_removal,
    retention_class,
)

DEFAULT = RetentionPolicy.from_config(RetentionYears())


def policy(outpatient: int = 15, emergency: int = 15, inpatient: int = 30) -> RetentionPolicy:
    return RetentionPolicy({"outpatient": outpatient, "emergency": emergency, "inpatient": inpatient})


# --- the floor -------------------------------------------------------------------------------------------------


def test_the_floor_is_fifteen_years() -> None:
    assert RETENTION_FLOOR_YEARS == 15


@pytest.mark.parametrize("name", RETENTION_CLASSES)
def test_a_policy_below_the_floor_is_refused_naming_the_class(name: RetentionClass) -> None:
    years: dict[RetentionClass, int] = {"outpatient": 15, "emergency": 15, "inpatient": 30, name: 14}
    with pytest.raises(RetentionError, match=rf"retention class {name}: 14 years is below the legal floor of 15"):
        RetentionPolicy(years)


@pytest.mark.parametrize("years", [0, -1, -30])
def test_zero_or_negative_years_are_below_the_floor(years: int) -> None:
    with pytest.raises(RetentionError, match="below the legal floor"):
        policy(outpatient=years)


def test_a_policy_missing_a_class_is_refused() -> None:
    with pytest.raises(RetentionError, match="retention class inpatient has no period"):
        RetentionPolicy({"outpatient": 15, "emergency": 15})


def test_a_policy_at_or_above_the_floor_is_accepted() -> None:
    assert policy(15, 20, 30).years == {"outpatient": 15, "emergency": 20, "inpatient": 30}


def test_the_configured_defaults_are_fifteen_and_thirty_years() -> None:
    assert DEFAULT.years == {"outpatient": 15, "emergency": 15, "inpatient": 30}


@pytest.mark.parametrize("field", ["outpatient", "emergency", "inpatient"])
def test_the_configuration_refuses_years_below_the_floor(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RetentionYears.model_validate({field: 14})
    assert getattr(RetentionYears.model_validate({field: 16}), field) == 16


def test_a_configuration_file_below_the_floor_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text("[recordings.retention_years]\noutpatient = 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"recordings\.retention_years\.outpatient"):
        load_config(path, {})


def test_a_configuration_may_raise_the_years() -> None:
    years = RetentionYears.model_validate({"outpatient": 20, "emergency": 25, "inpatient": 50})
    assert RetentionPolicy.from_config(years).years == {"outpatient": 20, "emergency": 25, "inpatient": 50}


# --- the retention date ------------------------------------------------------------------------------------------


def test_retain_until_is_the_same_moment_years_later() -> None:
    ended = datetime(2026, 11, 26, 14, 30, 15, 250_000, tzinfo=UTC)
    assert DEFAULT.retain_until("outpatient", ended) == datetime(2041, 11, 26, 14, 30, 15, 250_000, tzinfo=UTC)
    assert DEFAULT.retain_until("emergency", ended) == datetime(2041, 11, 26, 14, 30, 15, 250_000, tzinfo=UTC)
    assert DEFAULT.retain_until("inpatient", ended) == datetime(2056, 11, 26, 14, 30, 15, 250_000, tzinfo=UTC)


def test_29_february_into_a_common_year_is_kept_until_1_march() -> None:
    ended = datetime(2028, 2, 29, 23, 59, tzinfo=UTC)
    # 2043 has no 29 February: keeping until the 28th would be a day short of 15 years.
    assert DEFAULT.retain_until("outpatient", ended) == datetime(2043, 3, 1, 23, 59, tzinfo=UTC)


def test_29_february_into_a_leap_year_stays_29_february() -> None:
    ended = datetime(2024, 2, 29, 8, 0, tzinfo=UTC)
    assert policy(outpatient=16).retain_until("outpatient", ended) == datetime(2040, 2, 29, 8, 0, tzinfo=UTC)
    assert DEFAULT.retain_until("inpatient", ended) == datetime(2054, 3, 1, 8, 0, tzinfo=UTC)


def test_retain_until_is_never_less_than_the_years() -> None:
    start = datetime(2024, 1, 1, 12, tzinfo=UTC)
    for day in range(366 * 4):
        ended = start + timedelta(days=day)
        until = DEFAULT.retain_until("outpatient", ended)
        assert until.year == ended.year + 15
        assert (until.month, until.day) >= (ended.month, ended.day)
        assert until.timetz() == ended.timetz()


def test_the_calendar_day_is_the_local_one() -> None:
    beijing = timezone(timedelta(hours=8))
    ended = datetime(2028, 2, 29, 1, 0, tzinfo=beijing)  # 28 February 17:00 UTC
    until = DEFAULT.retain_until("outpatient", ended)
    assert until == datetime(2043, 3, 1, 1, 0, tzinfo=beijing)
    assert until.tzinfo == beijing


def test_retain_until_needs_an_aware_time() -> None:
    with pytest.raises(RetentionError, match="timezone-aware"):
        DEFAULT.retain_until("outpatient", datetime(2026, 1, 1, 12))  # naive on purpose


def test_retain_until_refuses_an_unknown_class() -> None:
    with pytest.raises(RetentionError, match=r"unknown retention class 'forever'; classes: outpatient, emergency"):
        DEFAULT.retain_until("forever", datetime(2026, 1, 1, tzinfo=UTC))


def test_retain_until_beyond_the_calendar_is_a_retention_error() -> None:
    with pytest.raises(RetentionError, match="beyond year 9999"):
        DEFAULT.retain_until("inpatient", datetime(9980, 2, 29, tzinfo=UTC))


# --- the class -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "inpatient", "expected"),
    [
        ("emergency", False, "emergency"),
        ("normal", False, "outpatient"),
        (None, False, "outpatient"),
        ("unheard-of", False, "outpatient"),
        ("emergency", True, "inpatient"),
        ("normal", True, "inpatient"),
        (None, True, "inpatient"),
    ],
)
def test_retention_class(priority: str | None, inpatient: bool, expected: str) -> None:
    assert retention_class(priority, inpatient=inpatient) == expected


# --- removal -----------------------------------------------------------------------------------------------------

NOW = datetime(2042, 6, 1, 12, tzinfo=UTC)


def test_removal_before_the_retention_date_is_refused_with_the_date() -> None:
    check = check_removal(state="stored", retain_until=NOW + timedelta(days=1), legal_hold=False, now=NOW)
    assert (check.allowed, check.refusal) == (False, "retention")
    assert "2042-06-02" in check.explanation


def test_removal_at_or_after_the_retention_date_is_allowed() -> None:
    for until in (NOW, NOW - timedelta(microseconds=1), NOW - timedelta(days=400)):
        check = check_removal(state="stored", retain_until=until, legal_hold=False, now=NOW)
        assert (check.allowed, check.refusal, check.explanation) == (True, None, "")


def test_removal_one_microsecond_early_is_refused() -> None:
    check = check_removal(state="stored", retain_until=NOW + timedelta(microseconds=1), legal_hold=False, now=NOW)
    assert check.refusal == "retention"


def test_a_legal_hold_refuses_removal_even_past_retention() -> None:
    check = check_removal(state="stored", retain_until=NOW - timedelta(days=400), legal_hold=True, now=NOW)
    assert (check.allowed, check.refusal) == (False, "legal_hold")
    assert "legal hold" in check.explanation


@pytest.mark.parametrize("state", ["capturing", "finished", "missing", "purged"])
def test_only_a_stored_recording_may_be_removed(state: str) -> None:
    check = check_removal(state=state, retain_until=NOW - timedelta(days=1), legal_hold=False, now=NOW)
    assert (check.allowed, check.refusal) == (False, "not_stored")
    assert state in check.explanation


def test_a_stored_recording_without_a_date_is_not_removable() -> None:
    check = check_removal(state="stored", retain_until=None, legal_hold=False, now=NOW)
    assert (check.allowed, check.refusal) == (False, "not_stored")
