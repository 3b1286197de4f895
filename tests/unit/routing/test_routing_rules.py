"""Routing rules: eligibility table, skill steps that widen within the credential requirement, YAML loading."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from routing.model import Agent, CallRequest, Credential
from routing.router import eligible
from routing.rules import (
    DEFAULT_RULES,
    CategoryRule,
    RoutingRules,
    RulesError,
    SkillExpr,
    Step,
    load_rules,
    parse_rules,
)
from telephony.consult import ROUTE_CATEGORIES, ConsultCategory

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def cred(
    kind: str,
    *,
    status: str = "active",
    verified: datetime | None = T0 - DAY,
    valid_from: datetime = T0 - 30 * DAY,
    valid_until: datetime = T0 + 30 * DAY,
) -> Credential:
    assert status in ("active", "revoked")
    return Credential(kind, "N-1", valid_from, valid_until, verified, "active" if status == "active" else "revoked")


def agent(*credentials: Credential, skills: dict[str, int] | None = None, frozen: bool = False) -> Agent:
    return Agent("a1", "PJSIP/a1", frozenset({"clinician"}), credentials, skills or {}, frozen)


def call(category: ConsultCategory, waited: float = 0.0) -> CallRequest:
    return CallRequest("c1", category, "normal", T0 - timedelta(seconds=waited))


PHYSICIAN = cred("physician_license")
NURSE = cred("nurse_license")
PHARMACIST = cred("pharmacist_license")

CASES: list[tuple[str, Agent, CallRequest, bool]] = [
    ("valid physician, diagnosis", agent(PHYSICIAN), call("diagnosis"), True),
    ("expired", agent(cred("physician_license", valid_until=T0)), call("diagnosis"), False),
    ("expired long ago", agent(cred("physician_license", valid_until=T0 - DAY)), call("diagnosis"), False),
    ("not yet valid", agent(cred("physician_license", valid_from=T0 + DAY)), call("diagnosis"), False),
    ("revoked", agent(cred("physician_license", status="revoked")), call("diagnosis"), False),
    ("unverified", agent(cred("physician_license", verified=None)), call("diagnosis"), False),
    ("verified only later", agent(cred("physician_license", verified=T0 + DAY)), call("diagnosis"), False),
    ("frozen", agent(PHYSICIAN, frozen=True), call("diagnosis"), False),
    ("frozen, general", agent(frozen=True), call("general"), False),
    ("nurse for diagnosis", agent(NURSE), call("diagnosis"), False),
    (
        "revoked one, valid other",
        agent(cred("physician_license", status="revoked"), PHYSICIAN),
        call("diagnosis"),
        True,
    ),
    ("nurse, adverse reaction", agent(NURSE, skills={"pharmacovigilance": 2}), call("adverse_reaction"), True),
    ("physician, adverse reaction", agent(PHYSICIAN, skills={"pharmacovigilance": 5}), call("adverse_reaction"), True),
    (
        "pharmacist, adverse reaction",
        agent(PHARMACIST, skills={"pharmacovigilance": 5}),
        call("adverse_reaction"),
        False,
    ),
    ("pharmacist, medication", agent(PHARMACIST, skills={"pharmacology": 3}), call("medication"), True),
    ("physician, medication", agent(PHYSICIAN, skills={"pharmacology": 4}), call("medication"), True),
    ("nurse, medication, even late", agent(NURSE, skills={"pharmacology": 5}), call("medication", 10_000), False),
    ("anyone, appointment", agent(), call("appointment"), True),
    # Skill steps: medication asks pharmacology >= 3 for the first 60 s, then anyone qualified.
    ("skill too low, early", agent(PHARMACIST, skills={"pharmacology": 2}), call("medication", 10), False),
    ("no skill, early", agent(PHARMACIST), call("medication", 59.9), False),
    ("no skill, after widening", agent(PHARMACIST), call("medication", 60), True),
    ("widening keeps credentials", agent(skills={"pharmacology": 5}), call("medication", 10_000), False),
]


@pytest.mark.parametrize(("case", "who", "request_", "expected"), CASES, ids=[c[0] for c in CASES])
def test_eligibility_table(case: str, who: Agent, request_: CallRequest, expected: bool) -> None:
    assert eligible(who, request_, DEFAULT_RULES, T0) is expected, case


def test_every_required_group_must_be_met() -> None:
    rules = DEFAULT_RULES.model_copy(
        update={
            "categories": {
                **DEFAULT_RULES.categories,
                "diagnosis": CategoryRule(required=[["physician_license"], ["pharmacist_license", "nurse_license"]]),
            }
        }
    )
    assert not eligible(agent(PHYSICIAN), call("diagnosis"), rules, T0)
    assert not eligible(agent(NURSE, PHARMACIST), call("diagnosis"), rules, T0)
    assert eligible(agent(PHYSICIAN, NURSE), call("diagnosis"), rules, T0)
    assert not eligible(agent(PHYSICIAN, cred("nurse_license", verified=None)), call("diagnosis"), rules, T0)


def test_credential_validity_window_is_half_open() -> None:
    c = cred("nurse_license", valid_from=T0, valid_until=T0 + DAY)
    assert c.is_valid(T0)
    assert c.is_valid(T0 + DAY - timedelta(microseconds=1))
    assert not c.is_valid(T0 + DAY)
    assert not c.is_valid(T0 - timedelta(microseconds=1))


def test_agent_skill_levels_are_checked() -> None:
    with pytest.raises(ValueError, match="proficiency 6"):
        Agent("a", "PJSIP/a", skills={"cardiology": 6})


def test_default_rules_cover_every_category() -> None:
    assert set(DEFAULT_RULES.categories) == set(ROUTE_CATEGORIES)
    assert DEFAULT_RULES.rule("diagnosis").required == [["physician_license"]]
    assert DEFAULT_RULES.rule("adverse_reaction").required == [["physician_license", "nurse_license"]]
    assert DEFAULT_RULES.rule("medication").required == [["pharmacist_license", "physician_license"]]
    assert all(DEFAULT_RULES.rule(c).escalation is not None for c in ROUTE_CATEGORIES)


def test_step_index_follows_cumulative_expiry() -> None:
    rule = CategoryRule(
        steps=[
            Step(match=SkillExpr(skill="cardiology", min=4), expire_after=30),
            Step(match=SkillExpr(skill="cardiology", min=2), expire_after=60),
            Step(),
        ]
    )
    assert [rule.step_index(w) for w in (0, 29.9, 30, 89.9, 90, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert [rule.step_ends(i) for i in range(3)] == [30, 90, None]
    assert SkillExpr().matches({})
    assert SkillExpr(skill="cardiology", min=3).matches({"cardiology": 3})
    assert not SkillExpr(skill="cardiology", min=3).matches({"cardiology": 2})


def _default_yaml() -> str:
    data = {c: r.model_dump(mode="json", exclude_none=True) for c, r in DEFAULT_RULES.categories.items()}
    return yaml.safe_dump(data, sort_keys=False)


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(_default_yaml(), encoding="utf-8")
    assert load_rules(path) == DEFAULT_RULES


def test_yaml_transfer_escalation() -> None:
    data = yaml.safe_load(_default_yaml())
    data["emergency"]["escalation"] = {"after": 45, "transfer": {"number": "+8221550119", "trunk": "pstn-main"}}
    rules = parse_rules(yaml.safe_dump(data))
    escalation = rules.rule("emergency").escalation
    assert escalation is not None
    assert escalation.transfer is not None
    assert escalation.transfer.trunk == "pstn-main"


def _errors(mutate: dict[str, object], drop: str | None = None) -> list[str]:
    data = yaml.safe_load(_default_yaml())
    for key, value in mutate.items():
        category, _, field = key.partition(".")
        if field:
            data[category][field] = value
        else:
            data[category] = value
    if drop is not None:
        del data[drop]
    with pytest.raises(RulesError) as info:
        parse_rules(yaml.safe_dump(data), "routing.yaml")
    assert str(info.value).startswith("routing.yaml: ")
    return info.value.problems


def test_error_names_category_and_field() -> None:
    problems = _errors({"medication.steps": [{"match": {"skill": "pharmacology", "min": 9}, "expire_after": 5}, {}]})
    assert problems == ["medication: steps.0.match.min: Input should be less than or equal to 5"]


def test_error_missing_category() -> None:
    assert _errors({}, drop="vaccination") == ["no rule for consult categories: vaccination"]


def test_triage_is_for_clinicians_only_and_a_rules_file_must_say_so() -> None:
    # Nurse triage: symptoms without a red flag are never for the front desk.
    assert DEFAULT_RULES.rule("triage").required == [["nurse_license", "physician_license"]]
    for kinds, ok in (({"nurse_license"}, True), ({"physician_license"}, True), (set(), False)):
        assert DEFAULT_RULES.rule("triage").credentials_satisfied(frozenset(kinds)) is ok
    assert not DEFAULT_RULES.rule("triage").credentials_satisfied(frozenset({"pharmacist_license"}))
    # A site's file that predates triage is refused with the category named, never given a silent default.
    assert _errors({}, drop="triage") == ["no rule for consult categories: triage"]


def test_error_unknown_category() -> None:
    problems = _errors({"dermatology": {"required": []}})
    assert problems == [f"dermatology: not a consult category (expected one of {', '.join(ROUTE_CATEGORIES)})"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("diagnosis.steps", [{"expire_after": 5}], "diagnosis: steps.0: the last step never expires"),
        ("diagnosis.steps", [{}, {}], "diagnosis: steps.0: every step but the last needs `expire_after`"),
        ("diagnosis.steps", [], "diagnosis: steps: List should have at least 1 item"),
        ("general.escalation", {"after": 5}, "general: escalation: an escalation needs exactly one of"),
        ("general.escalation", {"after": 0, "group": "x"}, "general: escalation.after: Input should be greater"),
        ("diagnosis.required", [[]], "diagnosis: required.0: List should have at least 1 item"),
        ("diagnosis.required", [["Physician License"]], "diagnosis: required.0.0: String should match pattern"),
        ("diagnosis.priority", "high", "diagnosis: priority: Extra inputs are not permitted"),
        ("diagnosis.steps", [{"match": {"min": 3}}], "diagnosis: steps.0.match: `min` needs a `skill`"),
    ],
)
def test_field_errors(key: str, value: object, expected: str) -> None:
    problems = _errors({key: value})
    assert any(p.startswith(expected) for p in problems), problems


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(RulesError, match="not valid YAML"):
        parse_rules("diagnosis: !!python/object/apply:os.system ['true']\n")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(RulesError, match="top level must map consult categories"):
        parse_rules(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_rules_model_needs_all_categories() -> None:
    with pytest.raises(ValueError, match="no rule for consult categories"):
        RoutingRules(categories={"general": CategoryRule()})
