"""Evaluating ``branch`` conditions: call variables and opening hours. Pure functions; the clock is passed in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from zoneinfo import ZoneInfo

from ivr.flow_model import (
    AllCondition,
    AnyCondition,
    Condition,
    Hours,
    NotCondition,
    OpenCondition,
    VarCondition,
)

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def is_open(hours: Hours, now: datetime) -> bool:
    """Open at ``now`` (any aware datetime; converted to the hours' own time zone)?"""
    local = now.astimezone(ZoneInfo(hours.timezone))
    today = local.date()
    if today in hours.holidays:
        return False
    weekday = hours.workdays.get(today, _WEEKDAYS[local.weekday()])
    moment = local.time().replace(tzinfo=None)
    return any(start <= moment < end for start, end in hours.spans_for(weekday))


def evaluate(condition: Condition, variables: Mapping[str, str], hours: Mapping[str, Hours], now: datetime) -> bool:
    if isinstance(condition, VarCondition):
        value = variables.get(condition.var)
        if condition.is_set is not None:
            return (value is not None) == condition.is_set
        if value is None:
            return False
        if condition.equals is not None:
            return value == condition.equals
        if condition.one_of is not None:
            return value in condition.one_of
        return condition.matches is not None and re.fullmatch(condition.matches, value) is not None
    if isinstance(condition, OpenCondition):
        return is_open(hours[condition.open], now)
    if isinstance(condition, NotCondition):
        return not evaluate(condition.not_, variables, hours, now)
    if isinstance(condition, AllCondition):
        return all(evaluate(c, variables, hours, now) for c in condition.all)
    if isinstance(condition, AnyCondition):
        return any(evaluate(c, variables, hours, now) for c in condition.any)
    raise TypeError(f"unknown condition {condition!r}")
