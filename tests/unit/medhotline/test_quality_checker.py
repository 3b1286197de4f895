"""The quality checker (sans I/O) rule by rule, the rules file's errors with their places, and the sample."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from medhotline.quality.checker import FinishedCall, check, in_sample
from medhotline.quality.rules import QualityRulesError, load_rules, parse_rules
from routing.statistics import QueueVisit

RULES_FILE = Path(__file__).parents[3] / "dialplans" / "quality" / "rules.yaml"
RULES = load_rules(RULES_FILE)
T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


def visit(**changes: object) -> QueueVisit:
    base = QueueVisit("c1", T0, "general", False, "answered", 8.0, 20.0, agent_id="ag1", answered_at=T0,
                      talk=60.0, wrap_up=30.0)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


CALM = FinishedCall("c1", "general", visit(), frozenset({"agent"}), has_note=True)

# (case, the call, the rules it must raise)
CASES: list[tuple[str, FinishedCall, set[str]]] = [
    ("a good call", CALM, set()),
    ("emergency answered in time", replace(CALM, visit=visit(emergency=True, wait=9.0, target=10.0)), set()),
    ("emergency answered late", replace(CALM, visit=visit(emergency=True, wait=11.0, target=10.0)), {"emergency_late"}),
    (
        "emergency abandoned",
        replace(CALM, visit=visit(emergency=True, end="abandoned", wait=3.0, agent_id=None, talk=None)),
        {"emergency_late"},
    ),
    ("emergency still waiting", replace(CALM, visit=visit(emergency=True, end="waiting", wait=None)), set()),
    (
        "diagnosis by a physician",
        replace(CALM, category="diagnosis", visit=visit(category="diagnosis"), agent_roles=frozenset({"physician"})),
        set(),
    ),
    (
        "diagnosis by a nurse",
        replace(CALM, category="diagnosis", visit=visit(category="diagnosis"), agent_roles=frozenset({"nurse"})),
        {"diagnosis_non_physician"},
    ),
    (
        "diagnosis by a gone account",
        replace(CALM, category="diagnosis", visit=visit(category="diagnosis"), agent_roles=frozenset()),
        {"diagnosis_non_physician"},
    ),
    ("consent asked and sealed", replace(CALM, consent_asked=True, consent_records=1), set()),
    ("consent asked, none sealed", replace(CALM, consent_asked=True), {"consent_missing"}),
    ("consent refused, call answered", replace(CALM, consent_asked=True, consent_refused=True), {"consent_missing"}),
    (
        "consent refused and honoured",
        replace(
            CALM,
            consent_asked=True,
            consent_refused=True,
            has_note=False,
            visit=visit(end="abandoned", wait=1.0, agent_id=None, talk=None),
        ),
        set(),
    ),
    (
        "abandoned after 30 s",
        replace(CALM, visit=visit(end="abandoned", wait=30.0, agent_id=None, talk=None)),
        {"abandoned_in_queue"},
    ),
    (
        "abandoned after 2 s (under min_wait)",
        replace(CALM, visit=visit(end="abandoned", wait=2.0, agent_id=None, talk=None)),
        set(),
    ),
    ("no wrap-up note", replace(CALM, has_note=False), {"note_missing"}),
    ("no note while still talking", replace(CALM, has_note=False, visit=visit(talk=None)), set()),
    ("on hold 121 s", replace(CALM, visit=visit(wait=121.0)), {"hold_too_long"}),
    ("on hold 120 s", replace(CALM, visit=visit(wait=120.0)), set()),
    ("IVR only", FinishedCall("c1", None), set()),
]


@pytest.mark.parametrize(("case", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_rule(case: str, call: FinishedCall, expected: set[str]) -> None:
    flags = check(call, RULES, emergency_target_seconds=10.0)
    assert {f.rule for f in flags} == expected, case
    assert all(f.why for f in flags)


def test_a_diagnosis_by_a_non_physician_is_critical() -> None:
    call = replace(CALM, category="diagnosis", visit=visit(category="diagnosis"), agent_roles=frozenset({"agent"}))
    (flag,) = check(call, RULES, emergency_target_seconds=10.0)
    assert flag.severity == "critical"
    assert "ag1" in flag.why
    assert "(agent)" in flag.why


def test_a_disabled_rule_raises_nothing() -> None:
    rules = replace(RULES, rules=RULES.rules.model_copy(update={
        "note_missing": RULES.rules.note_missing.model_copy(update={"enabled": False})}))  # fmt: skip
    assert check(replace(CALM, has_note=False), rules, emergency_target_seconds=10.0) == []


def test_the_rules_own_emergency_target_wins() -> None:
    text = RULES_FILE.read_text(encoding="utf-8").replace("# target_seconds: 10", "target_seconds: 30")
    rules = parse_rules(text, Path("q.yaml"))
    late = replace(CALM, visit=visit(emergency=True, wait=25.0, target=10.0))
    assert check(late, rules, emergency_target_seconds=10.0) == []


# --- the file's errors ------------------------------------------------------------------------------------------

BAD: list[tuple[str, str, str, str]] = [
    # (what, replace this, with this, expected text in the error)
    ("unknown key", "  note_missing:", "  note_mising:", "rules.note_mising: unknown key `note_mising`"),
    ("missing key", "    max_seconds: 120\n", "", "rules.hold_too_long: missing required key `max_seconds`"),
    ("bad severity", "severity: low", "severity: minor", "rules.note_missing.severity"),
    ("rate above 1", "rate: 0.05", "rate: 5", "sample.rate"),
    ("diagnosis rule weakened", "severity: critical", "severity: high", "must never happen"),
    ("inverted scale", "{min: 1, max: 5}", "{min: 5, max: 1}", "review_form.scale"),
    (
        "yes is not a boolean",
        "    severity: high\n  abandoned",
        "    severity: high\n    enabled: yes\n  abandoned",
        "rules.consent_missing.enabled",
    ),
    ("duplicate key", "  note_missing:", "  abandoned_in_queue:", "abandoned_in_queue"),
]


@pytest.mark.parametrize(("what", "old", "new", "expected"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_file_is_refused_naming_file_line_and_key(what: str, old: str, new: str, expected: str) -> None:
    text = RULES_FILE.read_text(encoding="utf-8")
    assert old in text, what
    with pytest.raises(QualityRulesError) as caught:
        parse_rules(text.replace(old, new, 1), Path("dialplans/quality/rules.yaml"))
    message = str(caught.value)
    assert expected in message
    assert all(p.line > 0 for p in caught.value.problems), message
    assert message.startswith("dialplans/quality/rules.yaml:")


def test_a_file_that_is_not_a_mapping_or_not_there_is_refused(tmp_path: Path) -> None:
    with pytest.raises(QualityRulesError, match="a quality file is a mapping"):
        parse_rules("- 1\n", Path("q.yaml"))
    with pytest.raises(QualityRulesError, match="cannot read"):
        load_rules(tmp_path / "none.yaml")


# --- the sample -------------------------------------------------------------------------------------------------


def test_the_sample_is_deterministic_and_keyed() -> None:
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    ids = [f"call-{n}" for n in range(2000)]
    first = [in_sample(i, key, 0.05) for i in ids]
    assert first == [in_sample(i, key, 0.05) for i in ids]
    assert first != [in_sample(i, other, 0.05) for i in ids]


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.25, 1.0])
def test_the_sample_takes_the_configured_share(rate: float) -> None:
    key = b"k" * 32
    n = 20_000
    taken = sum(in_sample(f"{n:08x}-{i}", key, rate) for i in range(n))
    # Binomial: 5 standard deviations either side (never flaky, still tight enough to catch a wrong rate).
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(taken - n * rate) <= 5 * sd + 1e-9
