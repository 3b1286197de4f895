"""The quality rules and the reviewers' form, from YAML (``dialplans/quality/rules.yaml``; docs/quality.md).

Loaded like the flows (``ground.yaml_source``): strict YAML, a pydantic schema that forbids unknown keys, and every
problem reported as ``file:line:column: dotted.key: message``. Nothing is half-loaded: any problem refuses the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ground.errors import MedhotlineError
from ground.yaml_source import SourceProblem, parse_yaml

__all__ = ["RULE_IDS", "QualityRules", "QualityRulesError", "ReviewForm", "Severity", "load_rules", "parse_rules"]

Severity = Literal["low", "medium", "high", "critical"]
RULE_IDS: Final = (
    "emergency_late",
    "diagnosis_non_physician",
    "consent_missing",
    "abandoned_in_queue",
    "note_missing",
    "hold_too_long",
)


class QualityRulesError(MedhotlineError):
    """The rules file is unusable; ``problems`` name each place."""

    def __init__(self, problems: list[SourceProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Strict(BaseModel):
    # strict: `enabled: yes` (kept as text by the YAML loader) or `rate: "5%"` is an error, not coerced.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Rule(_Strict):
    enabled: bool = True
    severity: Severity


class EmergencyLate(_Rule):
    # None: the configured statistics.emergency_target_seconds.
    target_seconds: float | None = Field(default=None, gt=0, le=3600)


class DiagnosisNonPhysician(_Rule):
    # The consult category that only physicians may answer (the brief's requirement 6).
    category: str = Field(default="diagnosis", min_length=1, max_length=32)

    @model_validator(mode="after")
    def _always_critical(self) -> DiagnosisNonPhysician:
        if not self.enabled or self.severity != "critical":
            raise ValueError("a diagnosis answered by a non-physician must never happen: this rule stays enabled "
                             "and critical")  # fmt: skip
        return self


class AbandonedInQueue(_Rule):
    # Callers who hung up sooner than this are not flagged (a wrong number); 0: every abandon is.
    min_wait_seconds: float = Field(default=0.0, ge=0, le=3600)


class HoldTooLong(_Rule):
    max_seconds: float = Field(gt=0, le=86400)


class Rules(_Strict):
    emergency_late: EmergencyLate
    diagnosis_non_physician: DiagnosisNonPhysician
    consent_missing: _Rule
    abandoned_in_queue: AbandonedInQueue
    note_missing: _Rule
    hold_too_long: HoldTooLong


class Sample(_Strict):
    # Share of the checked calls reviewed at random, besides every flagged call.
    rate: float = Field(ge=0, le=1)


class Scale(_Strict):
    min: int = Field(ge=0, le=100)
    max: int = Field(ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Scale:
        if self.max <= self.min:
            raise ValueError(f"max ({self.max}) must be above min ({self.min})")
        return self


class ReviewForm(_Strict):
    scale: Scale
    # criterion id → what the reviewer judges (shown with the queue).
    criteria: dict[str, str] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids(self) -> ReviewForm:
        for name in self.criteria:
            if not name.isascii() or not name.replace("_", "").isalnum() or not name[:1].isalpha():
                raise ValueError(f"criterion id {name!r}: use a-z, 0-9 and _, starting with a letter")
        return self


class QualityFile(_Strict):
    version: Literal[1]
    sample: Sample
    rules: Rules
    review_form: ReviewForm


@dataclass(frozen=True)
class QualityRules:
    """A validated rules file and where it came from."""

    path: Path
    sample_rate: float
    rules: Rules
    form: ReviewForm


def parse_rules(text: str, path: Path) -> QualityRules:
    """YAML text → the rules; QualityRulesError naming file:line:column and key of every problem."""
    data, source, problems = parse_yaml(text, path)

    def problem(loc: tuple[str, ...], message: str) -> SourceProblem:
        line, column = source.position(loc)
        return SourceProblem(path, line, column, ".".join(loc), message)

    if problems:
        raise QualityRulesError(problems)
    if not isinstance(data, dict):
        raise QualityRulesError([problem((), "a quality file is a mapping with version, sample, rules, review_form")])
    try:
        parsed = QualityFile.model_validate(data)
    except ValidationError as exc:
        found = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing":
                message, loc = f"missing required key `{loc[-1]}`", loc[:-1]
            elif error["type"] == "extra_forbidden":
                message = f"unknown key `{loc[-1]}`"
            found.append(problem(loc, message))
        raise QualityRulesError(sorted(found)) from None
    return QualityRules(path, parsed.sample.rate, parsed.rules, parsed.review_form)


def load_rules(path: Path) -> QualityRules:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QualityRulesError([SourceProblem(path, 0, 0, "", f"cannot read: {exc}")]) from None
    return parse_rules(text, path)
