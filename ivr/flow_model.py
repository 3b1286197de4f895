"""Typed model of an IVR flow: what administrators write in ``dialplans/*.yaml``, validated by pydantic.

The language is documented for administrators in ``docs/flows.md``; ``dialplans/flow.schema.json`` is
generated from these models (``medhotline flows schema``). Per-node rules live here; rules about the graph
(unreachable nodes, dead ends, loops without a way out, subflow targets) live in ``ivr.flow_graph``.
"""

from __future__ import annotations

import re
from datetime import date, time
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ground.clock import HOSPITAL_TZ_NAME
from telephony.consult import ConsultCategory, RouteCategory

NodeId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
FlowName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
VarName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Digit = Annotated[str, Field(pattern=r"^[0-9*#]$")]
Seconds = Annotated[float, Field(gt=0, le=120)]
Retries = Annotated[int, Field(ge=0, le=9)]


def _check_regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{key} is not a valid regular expression: {exc}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prompt(_Strict):
    """Something the caller hears: rendered text (``say``) or a recorded sound (``file``)."""

    say: str | None = Field(default=None, min_length=1, max_length=2000)
    # A sound as Asterisk names it, without extension, e.g. ``custom/welcome``.
    file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_/-]{1,128}$")

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        if (self.say is None) == (self.file is None):
            raise ValueError("a prompt needs exactly one of `say` (text) or `file` (sound)")
        return self


class _Node(_Strict):
    say: str | None = Field(default=None, min_length=1, max_length=2000)
    file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_/-]{1,128}$")
    # A caller may press a key during the prompt to skip it (the key then counts as input where input is read).
    barge_in: bool = True

    @model_validator(mode="after")
    def _one_prompt_source(self) -> _Node:
        if self.say is not None and self.file is not None:
            raise ValueError("give either `say` or `file`, not both")
        return self

    @property
    def prompt(self) -> Prompt | None:
        if self.say is None and self.file is None:
            return None
        return Prompt(say=self.say, file=self.file)

    def targets(self) -> dict[str, str]:
        """Outgoing edges: label → node id."""
        return {}


class _Waiting(_Node):
    """A node that waits for the caller: always a timeout, a retry count and a fallback."""

    timeout: Seconds = 6.0
    retries: Retries = 2
    invalid: Prompt | None = None
    no_input: Prompt | None = None
    fallback: NodeId


class PlayNode(_Node):
    type: Literal["play"]
    barge_in: bool = False
    next: NodeId

    @model_validator(mode="after")
    def _has_prompt(self) -> PlayNode:
        if self.prompt is None:
            raise ValueError("a play node needs `say` (text) or `file` (sound)")
        return self

    def targets(self) -> dict[str, str]:
        return {"next": self.next}


class MenuNode(_Waiting):
    type: Literal["menu"]
    choices: dict[Digit, NodeId] = Field(min_length=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _keys_as_text(cls, value: object) -> object:
        # `1: next` in YAML is an integer key; administrators should not have to quote digits.
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _has_prompt(self) -> MenuNode:
        if self.prompt is None:
            raise ValueError("a menu needs a prompt (`say` or `file`) that tells the caller the choices")
        return self

    def targets(self) -> dict[str, str]:
        return {**{f"press {d}": t for d, t in self.choices.items()}, "fallback": self.fallback}


class CollectNode(_Waiting):
    type: Literal["collect"]
    var: VarName
    min_digits: int = Field(default=1, ge=1, le=32)
    max_digits: int = Field(default=16, ge=1, le=32)
    terminator: Digit | None = "#"
    pattern: str | None = None
    # Collected digits may identify the patient (birth year, ID number): the call record keeps only whether
    # the input was valid unless an administrator states the value is not sensitive.
    sensitive: bool = True
    next: NodeId

    @model_validator(mode="after")
    def _lengths(self) -> CollectNode:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) is above max_digits ({self.max_digits})")
        if self.pattern is not None:
            _check_regex(self.pattern, "pattern")
        if self.prompt is None:
            raise ValueError("a collect node needs a prompt that asks for the digits")
        return self

    def targets(self) -> dict[str, str]:
        return {"next": self.next, "fallback": self.fallback}


_DOCUMENT = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_KEY = re.compile(r"^[0-9*#]$")


def _key_as_text(value: object) -> object:
    # `key: 1` in YAML is an integer; administrators should not have to quote digits.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _one_key(value: str) -> str:
    if not _KEY.match(value):
        raise ValueError(f"key must be one key of the phone: 0-9, * or # (got {value!r})")
    return value


# The question a ``listen`` node's triage asks once when the classifier found a single weak red-flag cue.
CONFIRM_QUESTION = "是否需要急救？需要请按1"


class TriageConfirm(_Strict):
    """The one question asked on a single weak red-flag cue: ``key`` (or a spoken yes) means emergency."""

    say: str = Field(default=CONFIRM_QUESTION, min_length=1, max_length=2000)
    key: str = Field(default="1", json_schema_extra={"pattern": _KEY.pattern})
    # Seconds to wait for the key after the question (and after the short speech pass).
    timeout: Seconds = 6.0
    # The short speech pass for "需要 / 是的 / 要" (only where speech recognition is available).
    max_seconds: Seconds = 4.0

    @field_validator("key", mode="before")
    @classmethod
    def _key_as_text(cls, value: object) -> object:
        return _key_as_text(value)

    @field_validator("key")
    @classmethod
    def _one_key(cls, value: str) -> str:
        return _one_key(value)


class ListenTriage(_Strict):
    """Triage levels on a ``listen`` node (docs/triage.md): where urgent callers and confirmed emergencies go."""

    # Symptoms without a red flag (level "urgent"): the nurse-triage route.
    urgent: NodeId
    # A red flag, or a weak cue the caller confirmed: default the node of ``categories.emergency``.
    emergency: NodeId | None = None
    # Categories whose own route already reaches clinicians: an urgent caller in one of them keeps that route.
    clinical_categories: list[ConsultCategory] = Field(default_factory=list)
    confirm: TriageConfirm = Field(default_factory=TriageConfirm)


class ListenNode(_Waiting):
    """Speech: transcript → consult category; a recognizer that is unavailable leads to ``fallback``."""

    type: Literal["listen"]
    var: VarName = "transcript"
    max_seconds: Seconds = 10.0
    categories: dict[ConsultCategory, NodeId] = Field(min_length=1)
    # Speech understood but no category matched.
    default: NodeId
    # Keys pressed while the caller is asked to speak are honoured as in a menu.
    choices: dict[Digit, NodeId] = Field(default_factory=dict)
    # Triage levels; without it the node routes by category only (emergency included).
    triage: ListenTriage | None = None

    @field_validator("choices", mode="before")
    @classmethod
    def _keys_as_text(cls, value: object) -> object:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _triage_has_emergency(self) -> ListenNode:
        if self.triage is not None and self.triage.emergency is None and "emergency" not in self.categories:
            raise ValueError(
                "triage needs an emergency target: give `triage.emergency` or a `categories.emergency` node"
            )
        return self

    @property
    def emergency_target(self) -> str | None:
        """Where a red flag or a confirmed weak cue goes (only with ``triage``)."""
        if self.triage is None:
            return None
        return self.triage.emergency or self.categories.get("emergency")

    def targets(self) -> dict[str, str]:
        edges = {f"heard {c}": t for c, t in self.categories.items()}
        edges.update({f"press {d}": t for d, t in self.choices.items()})
        if self.triage is not None:
            edges["triage urgent"] = self.triage.urgent
            if self.triage.emergency is not None:
                edges["triage emergency"] = self.triage.emergency
        return {**edges, "default": self.default, "fallback": self.fallback}


class ConfirmNode(_Waiting):
    """Press 1 to confirm, 2 to hear it again."""

    type: Literal["confirm"]
    confirm_digit: Digit = "1"
    repeat_digit: Digit = "2"
    next: NodeId

    @model_validator(mode="after")
    def _distinct(self) -> ConfirmNode:
        if self.confirm_digit == self.repeat_digit:
            raise ValueError("confirm_digit and repeat_digit must differ")
        if self.prompt is None:
            raise ValueError("a confirm node needs a prompt that says what is being confirmed")
        return self

    def targets(self) -> dict[str, str]:
        return {"confirmed": self.next, "fallback": self.fallback}


class ConsentNext(_Strict):
    """Both ways out of a consent node are required: a flow must say what happens after a refusal too."""

    given: NodeId
    refused: NodeId


class ConsentNode(_Node):
    """The patient's explicit, recorded consent to a named consent form (e.g. a remote consultation).

    ``text`` is read in full (no barge-in, no type-ahead), then one key is read; if it is ``key``,
    ``confirm_again`` is read and one more key is read; ``key`` again means consent is given. Any other key at
    either question means refused at once (the patient is not pressed to say yes). No key within ``timeout``
    replays ``no_input`` (if any) and the exchange from the start, up to ``retries`` times, then counts as
    refused. The exact texts are part of the signed consent record, so they are text only (never a ``file``
    whose words nobody can check) and the node has no ``say``/``file`` of its own.
    """

    type: Literal["consent"]
    # Names the consent form the record is filed under; a code, never free text. The patterns are checked by
    # the validators below (for a message an administrator understands) and stated in the JSON schema.
    document: str = Field(json_schema_extra={"pattern": _DOCUMENT.pattern})
    text: str = Field(min_length=1, max_length=2000)
    confirm_again: str = Field(min_length=1, max_length=2000)
    key: str = Field(default="1", json_schema_extra={"pattern": _KEY.pattern})
    # The exchange (the texts and the patient's answers) is recorded from before the text to the last answer.
    record: bool = True
    timeout: Seconds = 6.0
    retries: Retries = 2
    no_input: Prompt | None = None
    barge_in: bool = False
    next: ConsentNext

    @field_validator("key", mode="before")
    @classmethod
    def _key_as_text(cls, value: object) -> object:
        return _key_as_text(value)

    @field_validator("key")
    @classmethod
    def _one_key(cls, value: str) -> str:
        return _one_key(value)

    @field_validator("document")
    @classmethod
    def _document_code(cls, value: str) -> str:
        if not _DOCUMENT.match(value):
            raise ValueError(
                f"document must name a consent form with lower-case letters, digits and _, starting with a letter, "
                f"at most 48 characters (got {value[:60]!r})"
            )
        return value

    @model_validator(mode="after")
    def _heard_in_full(self) -> ConsentNode:
        if self.say is not None or self.file is not None:
            raise ValueError(
                "a consent node reads `text` and `confirm_again`; put any other announcement in a play node before it"
            )
        if self.barge_in:
            raise ValueError("a consent text is always heard in full: barge_in can't be true on a consent node")
        return self

    def targets(self) -> dict[str, str]:
        return {"given": self.next.given, "refused": self.next.refused}


# -- outreach: nodes that ask the scheduler's outreach port ---------------------------------------------------------


class _PortNode(_Node):
    """A node whose work is done by the outreach port (``telephony.ports.OutreachPort``). It has no prompt of its own:
    an announcement goes into a play node before it, so what the caller hears is always in one obvious place."""

    barge_in: bool = False

    @model_validator(mode="after")
    def _no_prompt(self) -> _PortNode:
        kind = getattr(self, "type", "outreach")
        if self.say is not None or self.file is not None:
            raise ValueError(f"a {kind} node has no prompt of its own; put any announcement in a play node before it")
        if self.barge_in:
            raise ValueError(f"a {kind} node has no prompt, so barge_in can't be true")
        return self


def _distinct_vars(value: list[str]) -> list[str]:
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise ValueError(f"variables named more than once: {', '.join(repeated)}")
    return value


class VerifiedNext(_Strict):
    verified: NodeId
    not_verified: NodeId


class VerifyIdentityNode(_PortNode):
    """The values of ``vars`` (collected earlier, e.g. a birth year) are compared with the patient's record by
    the port. The call record keeps only the edge taken, never the values."""

    type: Literal["verify_identity"]
    vars: list[VarName] = Field(min_length=1, max_length=8)
    next: VerifiedNext

    _distinct = field_validator("vars")(_distinct_vars)

    def targets(self) -> dict[str, str]:
        return {"verified": self.next.verified, "not_verified": self.next.not_verified}


class ReadingsNext(_Strict):
    normal: NodeId
    abnormal: NodeId


class SaveReadingsNode(_PortNode):
    """The values of ``vars`` (keypad readings; ``*`` typed as a decimal point) are stored by the port, which
    checks them against the patient's plan; ``abnormal`` when any is outside its thresholds. The call record
    keeps only the edge taken, never a reading."""

    type: Literal["save_readings"]
    vars: list[VarName] = Field(min_length=1, max_length=8)
    next: ReadingsNext

    _distinct = field_validator("vars")(_distinct_vars)

    def targets(self) -> dict[str, str]:
        return {"normal": self.next.normal, "abnormal": self.next.abnormal}


class MedicationNext(_Strict):
    confirmed: NodeId
    not_confirmed: NodeId


class MedicationConfirmNode(_PortNode):
    """A medication reminder the patient confirms twice (a wrong answer here can become a medication error).

    ``intro``, the port's medication sound and ``ask`` are heard in full, then one key is read; if it is ``key``,
    ``repeat``, the medication sound again and ``ask_again`` are heard and one more key is read; ``key`` again is
    confirmed. Anything else (another key, no key within ``timeout``, a hang-up after the first key) is not
    confirmed, without a second chance inside the call: the scheduler calls again. The port hears every answer.
    """

    type: Literal["medication_confirm"]
    intro: str = Field(min_length=1, max_length=2000)
    ask: str = Field(min_length=1, max_length=2000)
    repeat: str = Field(min_length=1, max_length=2000)
    ask_again: str = Field(min_length=1, max_length=2000)
    key: str = Field(default="1", json_schema_extra={"pattern": _KEY.pattern})
    timeout: Seconds = 6.0
    next: MedicationNext

    @field_validator("key", mode="before")
    @classmethod
    def _key_as_text(cls, value: object) -> object:
        return _key_as_text(value)

    @field_validator("key")
    @classmethod
    def _one_key(cls, value: str) -> str:
        return _one_key(value)

    def texts(self) -> list[str]:
        return [self.intro, self.ask, self.repeat, self.ask_again]

    def targets(self) -> dict[str, str]:
        return {"confirmed": self.next.confirmed, "not_confirmed": self.next.not_confirmed}


class BookingNext(_Strict):
    booked: NodeId
    full: NodeId
    # No slot that day, caller not identified, or the booking failed for another reason.
    not_booked: NodeId


class VaccinationBookNode(_PortNode):
    """Books the day (``day_var``: 1-7, 1 = tomorrow) and half-day slot (``slot_var``: morning/afternoon) chosen
    earlier; the port's sound (date and time of the booking) is played when it gives one."""

    type: Literal["vaccination_book"]
    day_var: VarName = "vaccination_day"
    slot_var: VarName = "vaccination_slot"
    next: BookingNext

    @model_validator(mode="after")
    def _two_vars(self) -> VaccinationBookNode:
        if self.day_var == self.slot_var:
            raise ValueError("day_var and slot_var must name different variables")
        return self

    def targets(self) -> dict[str, str]:
        return {"booked": self.next.booked, "full": self.next.full, "not_booked": self.next.not_booked}


class CancelNext(_Strict):
    cancelled: NodeId
    # The patient had no booking to cancel.
    none: NodeId


class VaccinationCancelNode(_PortNode):
    """Cancels the patient's next vaccination booking."""

    type: Literal["vaccination_cancel"]
    next: CancelNext

    def targets(self) -> dict[str, str]:
        return {"cancelled": self.next.cancelled, "none": self.next.none}


class ReportAdverseReactionNode(_PortNode):
    """Reports an adverse reaction after a vaccination: the port makes a task for medical staff and schedules a
    follow-up call."""

    type: Literal["report_adverse_reaction"]
    next: NodeId

    def targets(self) -> dict[str, str]:
        return {"next": self.next}


class RecordSurveyNode(_PortNode):
    """The satisfaction score the caller typed (``var``, one key 1-5, collected earlier) is written back by the port
    to what the call is about (a 12320 complaint's answer call: the task is marked answered with it). A value that
    is not 1-5 is an error and nothing is written; the call record keeps only the edge, never the score."""

    type: Literal["record_survey"]
    var: VarName
    next: NodeId

    def targets(self) -> dict[str, str]:
        return {"next": self.next}


# -- conditions -----------------------------------------------------------------------------------


class VarCondition(_Strict):
    var: VarName
    equals: str | None = None
    one_of: list[str] | None = None
    matches: str | None = None
    is_set: bool | None = None

    @model_validator(mode="after")
    def _one_test(self) -> VarCondition:
        given = [k for k in ("equals", "one_of", "matches", "is_set") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a var condition needs exactly one of equals, one_of, matches, is_set")
        if self.matches is not None:
            _check_regex(self.matches, "matches")
        return self


class OpenCondition(_Strict):
    """True while the named opening hours (under ``hours:``) are open and today is not a holiday."""

    open: str


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1)


def _condition_kind(value: object) -> str | None:
    """Which kind of condition a mapping is, told by its keys, so an error names the right fields only."""
    if isinstance(value, BaseModel):
        return type(value).__name__
    if isinstance(value, dict):
        for key, tag in (("var", "VarCondition"), ("open", "OpenCondition"), ("not", "NotCondition")):
            if key in value:
                return tag
        for key, tag in (("all", "AllCondition"), ("any", "AnyCondition")):
            if key in value:
                return tag
    return None


# The tags pydantic puts into an error's location; the loader drops them to find the place in the file.
CONDITION_TAGS = frozenset({"VarCondition", "OpenCondition", "NotCondition", "AllCondition", "AnyCondition"})

Condition = Annotated[
    Annotated[VarCondition, Tag("VarCondition")]
    | Annotated[OpenCondition, Tag("OpenCondition")]
    | Annotated[NotCondition, Tag("NotCondition")]
    | Annotated[AllCondition, Tag("AllCondition")]
    | Annotated[AnyCondition, Tag("AnyCondition")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message="a condition needs one of the keys var, open, not, all, any",
    ),
]


class Case(_Strict):
    when: Condition
    next: NodeId


class BranchNode(_Node):
    type: Literal["branch"]
    cases: list[Case] = Field(min_length=1)
    default: NodeId

    def targets(self) -> dict[str, str]:
        return {**{f"case {i + 1}": c.next for i, c in enumerate(self.cases)}, "default": self.default}


class SetNode(_Node):
    type: Literal["set"]
    vars: dict[VarName, str] = Field(min_length=1)
    next: NodeId

    @field_validator("vars", mode="before")
    @classmethod
    def _values_as_text(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: str(v) for k, v in value.items()}
        return value

    def targets(self) -> dict[str, str]:
        return {"next": self.next}


class LookupPatientNode(_Node):
    """Caller number → patient record (pluggable directory); the number never becomes a flow variable."""

    type: Literal["lookup_patient"]
    found: NodeId
    not_found: NodeId

    def targets(self) -> dict[str, str]:
        return {"found": self.found, "not found": self.not_found}


class SubflowNode(_Node):
    type: Literal["subflow"]
    flow: FlowName
    next: NodeId

    def targets(self) -> dict[str, str]:
        return {"after subflow": self.next}


# -- terminal nodes: the flow's work ends here -----------------------------------------------------


class RouteNode(_Node):
    """Hand the call to routing: a consult category (which decides the credentials required) and priority."""

    type: Literal["route"]
    category: RouteCategory
    priority: Literal["normal", "emergency"] | None = None

    @property
    def effective_priority(self) -> str:
        return self.priority or ("emergency" if self.category == "emergency" else "normal")


class TransferNode(_Node):
    type: Literal["transfer"]
    # An internal extension, or an external number dialled through ``trunk``.
    to: str = Field(pattern=r"^[0-9*#+]{2,20}$")
    trunk: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$")


class HangupNode(_Node):
    type: Literal["hangup"]


class ReturnNode(_Node):
    """Ends a subflow: the calling flow continues at its subflow node's ``next``."""

    type: Literal["return"]


Node = Annotated[
    PlayNode
    | MenuNode
    | CollectNode
    | ListenNode
    | ConfirmNode
    | ConsentNode
    | MedicationConfirmNode
    | BranchNode
    | SetNode
    | LookupPatientNode
    | VerifyIdentityNode
    | SaveReadingsNode
    | VaccinationBookNode
    | VaccinationCancelNode
    | ReportAdverseReactionNode
    | RecordSurveyNode
    | SubflowNode
    | RouteNode
    | TransferNode
    | HangupNode
    | ReturnNode,
    Field(discriminator="type"),
]
TERMINAL_TYPES = frozenset({"route", "transfer", "hangup", "return"})
WAITING_TYPES = frozenset({"menu", "collect", "listen", "confirm", "consent", "medication_confirm"})
# Nodes that need the outreach port (FlowRunner's ``outreach``); without it they end the flow with an error.
OUTREACH_TYPES = frozenset(
    {
        "verify_identity",
        "save_readings",
        "medication_confirm",
        "vaccination_book",
        "vaccination_cancel",
        "report_adverse_reaction",
        "record_survey",
    }
)

# -- opening hours --------------------------------------------------------------------------------

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPAN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class Hours(_Strict):
    """Weekly opening hours plus holiday dates, e.g. ``weekly: {mon-fri: ["08:00-12:00", "13:30-17:30"]}``."""

    timezone: str = HOSPITAL_TZ_NAME
    weekly: dict[str, list[str]] = Field(min_length=1)
    holidays: list[date] = Field(default_factory=list)
    # Working days that fall on a weekend (调休), open with the given weekday's hours.
    workdays: dict[date, str] = Field(default_factory=dict)

    @field_validator("weekly")
    @classmethod
    def _spans(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, spans in value.items():
            _expand_days(key)
            for span in spans:
                match = _SPAN.match(span)
                if not match or span[:5] >= span[6:]:
                    raise ValueError(f"{key}: {span!r} is not a time span like '08:00-12:00'")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    def spans_for(self, weekday: str) -> list[tuple[time, time]]:
        result = []
        for key, spans in self.weekly.items():
            if weekday in _expand_days(key):
                for span in spans:
                    start, end = span.split("-")
                    result.append((_parse_time(start), _parse_time(end)))
        return result


def _parse_time(text: str) -> time:
    hour, minute = (int(part) for part in text.split(":"))
    return time.max if hour == 24 else time(hour, minute)  # "24:00" closes the day


def _expand_days(key: str) -> tuple[str, ...]:
    days: list[str] = []
    for raw in key.split(","):
        part = raw.strip()
        if "-" in part:
            first, last = part.split("-", 1)
            if first not in _DAYS or last not in _DAYS or _DAYS.index(first) > _DAYS.index(last):
                raise ValueError(f"{key!r}: day range must look like 'mon-fri'")
            days.extend(_DAYS[_DAYS.index(first) : _DAYS.index(last) + 1])
        elif part in _DAYS:
            days.append(part)
        else:
            raise ValueError(f"{key!r}: days are mon, tue, wed, thu, fri, sat, sun or a range like mon-fri")
    return tuple(days)


class Flow(_Strict):
    flow: FlowName
    description: str = ""
    start: NodeId
    hours: dict[str, Hours] = Field(default_factory=dict)
    nodes: dict[NodeId, Node] = Field(min_length=1)

    def prompt_texts(self) -> list[str]:
        """Every text a caller may hear, for ``prompts build``."""
        texts: list[str] = []
        for node in self.nodes.values():
            if node.say:
                texts.append(node.say)
            if isinstance(node, _Waiting):
                texts.extend(p.say for p in (node.invalid, node.no_input) if p is not None and p.say)
            if isinstance(node, ConsentNode):
                texts += [node.text, node.confirm_again]
                if node.no_input is not None and node.no_input.say:
                    texts.append(node.no_input.say)
            if isinstance(node, MedicationConfirmNode):
                texts += node.texts()
            if isinstance(node, ListenNode) and node.triage is not None:
                texts.append(node.triage.confirm.say)
        return texts
