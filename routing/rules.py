"""Routing rules per consult category: hard credential requirements, widening skill steps, escalation.

Rules are a Python constant (:data:`DEFAULT_RULES`) or a YAML file (:func:`load_rules`) whose top level maps
each of the seven consult categories, and ``triage`` (the nurse-triage tier: symptoms without a red flag), to
its rule::

    medication:
      required: [[pharmacist_license, physician_license]]   # one of these, valid and verified
      head_start: 30                                        # seconds of queue credit over other normal calls
      steps:
        - match: {skill: pharmacology, min: 3}
          expire_after: 60
        - match: {}                                         # anyone who meets `required`
      escalation:
        after: 600
        transfer: {number: "0215550100", trunk: pharmacy}   # or: group: pharmacy_backoffice

``required`` is a list of groups; every group must be satisfied, and a group is satisfied by any one of its
credential kinds. Steps only narrow by skill, so widening never relaxes ``required``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ground.errors import MedhotlineError
from telephony.consult import ROUTE_CATEGORIES, RouteCategory

__all__ = [
    "DEFAULT_RULES",
    "CategoryRule",
    "EscalationRule",
    "RoutingRules",
    "RulesError",
    "SkillExpr",
    "Step",
    "Transfer",
    "load_rules",
    "parse_rules",
]

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Seconds = Annotated[float, Field(gt=0, le=86_400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SkillExpr(_Strict):
    """``{skill: cardiology, min: 3}``; empty (``{}``) matches anyone."""

    skill: Name | None = None
    min: int = Field(default=1, ge=1, le=5)

    @model_validator(mode="after")
    def _min_needs_skill(self) -> SkillExpr:
        if self.skill is None and self.min != 1:
            raise ValueError("`min` needs a `skill`")
        return self

    def matches(self, skills: Mapping[str, int]) -> bool:
        return self.skill is None or skills.get(self.skill, 0) >= self.min

    def describe(self) -> str:
        return "anyone" if self.skill is None else f"{self.skill} >= {self.min}"


class Step(_Strict):
    match: SkillExpr = SkillExpr()
    # Seconds this step lasts; the last step lasts for ever and has none.
    expire_after: Seconds | None = None


class Transfer(_Strict):
    number: str = Field(pattern=r"^\+?[0-9]{1,20}$")
    trunk: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class EscalationRule(_Strict):
    """After ``after`` seconds waiting: ``transfer`` to a number over a trunk, or hand to a target ``group``."""

    after: Seconds
    transfer: Transfer | None = None
    group: Name | None = None

    @model_validator(mode="after")
    def _one_target(self) -> EscalationRule:
        if (self.transfer is None) == (self.group is None):
            raise ValueError("an escalation needs exactly one of `transfer` or `group`")
        return self


class CategoryRule(_Strict):
    required: list[Annotated[list[Name], Field(min_length=1)]] = Field(default_factory=list)
    head_start: float = Field(default=0.0, ge=0, le=86_400)
    steps: list[Step] = Field(default_factory=lambda: [Step()], min_length=1)
    escalation: EscalationRule | None = None

    @model_validator(mode="after")
    def _steps_expire_in_order(self) -> CategoryRule:
        *earlier, last = self.steps
        for index, step in enumerate(earlier):
            if step.expire_after is None:
                raise ValueError(f"steps.{index}: every step but the last needs `expire_after`")
        if last.expire_after is not None:
            raise ValueError(f"steps.{len(earlier)}: the last step never expires; remove `expire_after`")
        return self

    def step_index(self, waited: float) -> int:
        """The step in force after ``waited`` seconds in the queue."""
        elapsed = 0.0
        for index, step in enumerate(self.steps):
            if step.expire_after is None:
                return index
            elapsed += step.expire_after
            if waited < elapsed:
                return index
        return len(self.steps) - 1  # unreachable: the last step has no expire_after

    def step_ends(self, index: int) -> float | None:
        """Seconds of waiting at which step ``index`` expires (None for the last step)."""
        if self.steps[index].expire_after is None:
            return None
        return sum(s.expire_after or 0.0 for s in self.steps[: index + 1])

    def credentials_satisfied(self, kinds: frozenset[str]) -> bool:
        return all(any(kind in kinds for kind in group) for group in self.required)


class RoutingRules(_Strict):
    categories: dict[RouteCategory, CategoryRule]

    @model_validator(mode="after")
    def _all_categories(self) -> RoutingRules:
        missing = [c for c in ROUTE_CATEGORIES if c not in self.categories]
        if missing:
            raise ValueError(f"no rule for consult categories: {', '.join(missing)}")
        return self

    def rule(self, category: RouteCategory) -> CategoryRule:
        return self.categories[category]


class RulesError(MedhotlineError):
    """A routing rules file that cannot be used; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _problem(error: Any) -> str:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    message: str = error["msg"]
    if len(loc) >= 2 and loc[0] == "categories":
        category = str(loc[1])
        rest = [str(part) for part in loc[2:] if part != "[key]"]
        if "[key]" in [str(part) for part in loc[2:]]:
            return f"{category}: not a consult category (expected one of {', '.join(ROUTE_CATEGORIES)})"
        message = message.removeprefix("Value error, ")
        if not rest:
            return f"{category}: {message}"
        return f"{category}: {'.'.join(rest)}: {message}"
    return message.removeprefix("Value error, ")


def parse_rules(text: str, source: str = "<rules>") -> RoutingRules:
    """Rules from YAML text (``yaml.safe_load``); :class:`RulesError` names each category and field at fault."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RulesError(source, ["the top level must map consult categories to rules"])
    try:
        return RoutingRules.model_validate({"categories": data})
    except ValidationError as exc:
        raise RulesError(source, [_problem(e) for e in exc.errors()]) from None


def load_rules(path: Path) -> RoutingRules:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(str(path), [f"cannot read: {exc}"]) from None
    return parse_rules(text, str(path))


def _rule(
    required: list[list[str]],
    steps: list[Step] | None = None,
    *,
    head_start: float = 0.0,
    escalate_after: float,
    group: str,
) -> CategoryRule:
    return CategoryRule(
        required=required,
        head_start=head_start,
        steps=steps or [Step()],
        escalation=EscalationRule(after=escalate_after, group=group),
    )


def _skill(name: str, level: int, expire_after: float) -> list[Step]:
    return [Step(match=SkillExpr(skill=name, min=level), expire_after=expire_after), Step()]


# Escalation targets here are groups; transfers to outside numbers are site specific and belong in YAML.
DEFAULT_RULES = RoutingRules(
    categories={
        # No skill step for emergencies: any qualified clinician at once beats a triage specialist in 20 s.
        "emergency": _rule([["physician_license", "nurse_license"]], escalate_after=60, group="on_call_physicians"),
        "diagnosis": _rule([["physician_license"]], head_start=30, escalate_after=600, group="on_call_physicians"),
        "medication": _rule(
            [["pharmacist_license", "physician_license"]],
            _skill("pharmacology", 3, 60),
            head_start=30,
            escalate_after=600,
            group="pharmacy_backoffice",
        ),
        "adverse_reaction": _rule(
            [["physician_license", "nurse_license"]],
            _skill("pharmacovigilance", 2, 45),
            head_start=60,
            escalate_after=300,
            group="on_call_physicians",
        ),
        "vaccination": _rule(
            [["nurse_license", "physician_license"]],
            _skill("vaccination", 2, 60),
            escalate_after=900,
            group="nursing_backoffice",
        ),
        # Symptoms without a red flag (docs/triage.md): clinicians only, never the front desk, and ahead of the
        # information questions; the nurse can upgrade the call to emergency in one action (docs/routing.md).
        "triage": _rule(
            [["nurse_license", "physician_license"]],
            _skill("triage", 2, 45),
            head_start=60,
            escalate_after=300,
            group="on_call_physicians",
        ),
        "appointment": _rule([], escalate_after=900, group="front_desk"),
        "general": _rule([], escalate_after=900, group="front_desk"),
    }
)
