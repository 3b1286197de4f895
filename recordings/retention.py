"""Retention of recordings, sans I/O: which class a call's records fall in, until when they are kept, and
whether a removal is allowed now.

Call records are part of the medical record (《医疗机构病历管理规定》): kept at least 15 years after the call for
outpatient and emergency consultations, 30 years where they attach to an inpatient record. The years per class
come from ``[recordings.retention_years]``, which validation keeps at or above the 15-year floor; this module
checks the floor again, so a policy built in code can't undercut it either.

Removal is refused before the retention date and while a legal hold is on, whoever asks. The database repeats
the check in a trigger (migration ``0008_recordings``), so a bug here can't purge early.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import MAXYEAR, datetime
from typing import Final, Literal

from ground.config import RETENTION_FLOOR_YEARS, RetentionYears
from ground.errors import MedhotlineError

RetentionClass = Literal["outpatient", "emergency", "inpatient"]
RETENTION_CLASSES: Final[tuple[RetentionClass, ...]] = ("outpatient", "emergency", "inpatient")


class RetentionError(MedhotlineError):
    """A policy below the legal floor, or an unknown class."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    years: Mapping[RetentionClass, int]

    def __post_init__(self) -> None:
        for name in RETENTION_CLASSES:
            years = self.years.get(name)
            if years is None:
                raise RetentionError(f"retention class {name} has no period")
            if years < RETENTION_FLOOR_YEARS:
                raise RetentionError(
                    f"retention class {name}: {years} years is below the legal floor of {RETENTION_FLOOR_YEARS}"
                )

    @classmethod
    def from_config(cls, years: RetentionYears) -> RetentionPolicy:
        return cls({"outpatient": years.outpatient, "emergency": years.emergency, "inpatient": years.inpatient})

    def retain_until(self, retention_class: str, ended_at: datetime) -> datetime:
        """The first moment the record may go: the same calendar day ``years`` later (29 February → 1 March)."""
        if retention_class not in RETENTION_CLASSES:
            raise RetentionError(
                f"unknown retention class {retention_class!r}; classes: {', '.join(RETENTION_CLASSES)}"
            )
        if ended_at.tzinfo is None:
            raise RetentionError("retention is counted from a timezone-aware end of call")
        years = self.years[retention_class]
        year = ended_at.year + years
        if year > MAXYEAR:
            raise RetentionError(
                f"retention class {retention_class}: {years} years from {ended_at:%Y} is beyond year {MAXYEAR}"
            )
        if (ended_at.month, ended_at.day) == (2, 29) and not calendar.isleap(year):
            # 29 February into a year without one: keep until the day after, never the day before.
            return ended_at.replace(year=year, month=3, day=1)
        return ended_at.replace(year=year)


def retention_class(priority: str | None, *, inpatient: bool = False) -> RetentionClass:
    """The class of a call's records: inpatient when the patient's record is an inpatient one, emergency when the
    call was routed as an emergency, outpatient otherwise (every consultation is at least that)."""
    if inpatient:
        return "inpatient"
    return "emergency" if priority == "emergency" else "outpatient"


Refusal = Literal["retention", "legal_hold", "not_stored"]


@dataclass(frozen=True, slots=True)
class RemovalCheck:
    allowed: bool
    refusal: Refusal | None = None
    explanation: str = ""


def check_removal(*, state: str, retain_until: datetime | None, legal_hold: bool, now: datetime) -> RemovalCheck:
    """May a recording's file be removed (purged or overwritten) at ``now``?"""
    if legal_hold:
        return RemovalCheck(False, "legal_hold", "the recording is under legal hold")
    if state != "stored" or retain_until is None:
        return RemovalCheck(False, "not_stored", f"the recording is {state}, not stored")
    if now < retain_until:
        return RemovalCheck(
            False, "retention", f"the recording must be kept until {retain_until.date().isoformat()} (retention)"
        )
    return RemovalCheck(True)
