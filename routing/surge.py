"""Surge mode for a public-health event (突发公共卫生事件), sans I/O: the profile, the entry flow it makes, the
overflow agents' limits and the queues' capacity.

A surge profile is a small YAML file an operator prepares (and rehearses) before the event::

    name: respiratory-2027
    bulletin: 近期本市呼吸道传染病病例增多。发热门诊二十四小时开放，请佩戴口罩就诊。
    symptoms: {category: emergency, priority: normal}   # who takes callers with symptoms (nurses, physicians)
    faq_flow: surge_faq                                  # a flow in dialplans/ for information callers
    capacity: {general: 20, appointment: 10}            # callers waiting per queue, at most
    overflow_message: 目前来电较多，您所在的队列已满。
    overflow: callback                                   # or: hangup
    volunteer_categories: [general]                      # what surge_volunteer agents may take

:func:`entry_flow_yaml` turns it into the hotline's entry flow for the surge: the bulletin first, then
"有症状请按1，了解信息请按2" (and 0 for an emergency, as always). The text is YAML for the flow loader, so the surge
flow is validated exactly like a flow an administrator wrote.

Overflow agents hold a ``surge_volunteer`` credential. They take only the profile's volunteer categories (never
diagnosis, medication, adverse reaction, vaccination or emergency: those categories are refused here whatever a
profile says) and only while surge mode is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ground.errors import MedhotlineError
from routing.callbacks import spoken_key
from routing.model import Agent, CallRequest
from telephony.consult import CONSULT_CATEGORIES, ConsultCategory

__all__ = [
    "NEVER_VOLUNTEER",
    "SURGE_FLOW",
    "VOLUNTEER_KIND",
    "SurgeError",
    "SurgeProfile",
    "entry_flow_yaml",
    "is_volunteer",
    "load_profile",
    "over_capacity",
    "parse_profile",
    "volunteer_may_take",
]

VOLUNTEER_KIND: Final = "surge_volunteer"
# The categories an overflow agent never takes, whatever a profile says (clinical judgement or a licence needed).
NEVER_VOLUNTEER: Final[frozenset[str]] = frozenset(
    {"diagnosis", "medication", "adverse_reaction", "emergency", "vaccination"}
)
# The name of the generated entry flow (a flow file may not use it).
SURGE_FLOW: Final = "surge_entry"
SYMPTOMS_CHOICE: Final = "有症状请按1，了解信息请按2，如为急症请按0。"
DEFAULT_OVERFLOW: Final = "目前来电较多，您所在的队列已满，感谢您的耐心。"
OVERFLOW_GOODBYE: Final = "请稍后再拨，如情况危急请直接拨打120。再见。"

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
FlowName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class SurgeError(MedhotlineError):
    """A surge profile or switch that cannot be used; the message names the file, field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SymptomsRoute(_Strict):
    """Where a caller who presses 1 (symptoms) goes: a category whose rule needs a clinician's licence."""

    category: ConsultCategory = "emergency"
    # Normal by default: a caller with symptoms waits behind real emergencies (who press 0), not with them.
    priority: Literal["normal", "emergency"] = "normal"

    @field_validator("category")
    @classmethod
    def _clinical(cls, value: str) -> str:
        if value in ("general", "appointment"):
            raise ValueError("callers with symptoms must reach a clinician: use a clinical category")
        return value


def _general_only() -> list[ConsultCategory]:
    return ["general"]


class SurgeProfile(_Strict):
    name: Name
    bulletin: str = Field(min_length=1, max_length=1500)
    symptoms: SymptomsRoute = SymptomsRoute()
    faq_flow: FlowName = "surge_faq"
    capacity: dict[ConsultCategory, Annotated[int, Field(ge=1, le=100_000)]] = Field(default_factory=dict)
    overflow_message: str = Field(default=DEFAULT_OVERFLOW, min_length=1, max_length=500)
    overflow: Literal["callback", "hangup"] = "callback"
    volunteer_categories: list[ConsultCategory] = Field(default_factory=_general_only, min_length=1)

    @field_validator("volunteer_categories")
    @classmethod
    def _volunteers_limited(cls, value: list[ConsultCategory]) -> list[ConsultCategory]:
        refused = sorted(set(value) & NEVER_VOLUNTEER)
        if refused:
            raise ValueError(f"surge volunteers never take {', '.join(refused)} calls")
        return list(dict.fromkeys(value))

    @field_validator("capacity")
    @classmethod
    def _no_emergency_limit(cls, value: dict[ConsultCategory, int]) -> dict[ConsultCategory, int]:
        if "emergency" in value:
            raise ValueError("emergencies are never turned away: no capacity limit for `emergency`")
        return value

    def volunteer_categories_set(self) -> frozenset[str]:
        return frozenset(self.volunteer_categories)


def _problems(exc: ValidationError) -> list[str]:
    found = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return found


def parse_profile(text: str, source: str = "<profile>") -> SurgeProfile:
    """A profile from YAML text; :class:`SurgeError` names the source and every field at fault."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SurgeError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SurgeError(f"{source}: the top level must be a mapping (name, bulletin, …)")
    try:
        return SurgeProfile.model_validate(data)
    except ValidationError as exc:
        raise SurgeError(f"{source}: " + "; ".join(_problems(exc))) from None


def load_profile(path: Path) -> tuple[SurgeProfile, str]:
    """The profile at ``path`` and its text (stored with the switch, so what was in force is kept exactly)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SurgeError(f"{path}: cannot read: {exc}") from None
    return parse_profile(text, str(path)), text


def entry_flow_yaml(profile: SurgeProfile) -> str:
    """The surge's entry flow: bulletin and choice in one menu (a key skips the bulletin), then the routes."""
    flow: dict[str, Any] = {
        "flow": SURGE_FLOW,
        "description": f"surge mode ({profile.name}): bulletin, then symptoms or information",
        "start": "bulletin",
        "nodes": {
            "bulletin": {
                "type": "menu",
                "say": f"{profile.bulletin.strip()}{SYMPTOMS_CHOICE}",
                "barge_in": True,
                "timeout": 6,
                "retries": 1,
                "invalid": {"say": "您的输入有误。"},
                "no_input": {"say": "没有收到您的选择。"},
                "choices": {"0": "emergency", "1": "symptoms", "2": "information"},
                # A caller who can't use the menu reaches a clinician rather than nobody.
                "fallback": "symptoms",
            },
            "emergency": {
                "type": "route",
                "category": "emergency",
                "say": "正在为您优先转接急诊医护人员，请不要挂机。如情况危急，也可直接拨打120。",
            },
            "symptoms": {
                "type": "route",
                "category": profile.symptoms.category,
                "priority": profile.symptoms.priority,
                "say": "正在为您转接医护人员，请不要挂机。",
            },
            "information": {"type": "subflow", "flow": profile.faq_flow, "next": "goodbye"},
            "goodbye": {"type": "hangup", "say": "感谢您的来电，祝您健康，再见。"},
        },
    }
    return yaml.safe_dump(flow, allow_unicode=True, sort_keys=False)


def overflow_callback_text(key: str) -> str:
    """The overflow's callback offer (the caller keeps the place they would have had in the full queue)."""

    return f"如需挂机后由我们按顺序回电，请按{spoken_key(key)}；否则请稍后再拨，如情况危急请直接拨打120。"


def overflow_texts(profile: SurgeProfile, callback_key: str = "") -> list[str]:
    """What a caller turned away by a full queue hears, in order: the message, then the callback offer when the
    profile says ``overflow: callback`` and callbacks are on (``callback_key``), else the goodbye."""
    if profile.overflow == "callback" and callback_key:
        return [profile.overflow_message, overflow_callback_text(callback_key)]
    return [profile.overflow_message, OVERFLOW_GOODBYE]


def is_volunteer(agent: Agent, at: datetime) -> bool:
    """An overflow agent: holds a valid ``surge_volunteer`` credential (whatever else they hold)."""
    return VOLUNTEER_KIND in agent.valid_credential_kinds(at)


def volunteer_may_take(profile: SurgeProfile | None, category: str) -> bool:
    """Whether an overflow agent may take ``category`` now (never outside surge mode)."""
    return profile is not None and category in profile.volunteer_categories_set() and category not in NEVER_VOLUNTEER


def over_capacity(profile: SurgeProfile | None, call: CallRequest, waiting: Mapping[str, int]) -> bool:
    """A new call that would wait in a queue already holding its capacity. Emergencies are never refused."""
    if profile is None or call.priority == "emergency":
        return False
    limit = profile.capacity.get(call.category) if call.category != "triage" else None
    return limit is not None and waiting.get(call.category, 0) >= limit


def all_categories() -> tuple[str, ...]:
    return tuple(CONSULT_CATEGORIES)
