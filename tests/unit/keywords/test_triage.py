"""Triage by discriminators (docs/triage.md): the grammar, the levels, the labelled sets and the benchmark smoke.

Correctness only; quality figures and speed come from ``python -m benchmarks.keywords``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import keywords as bench
from keywords import CATEGORIES, Classifier, Lexicon, Markers, Term, load_lexicon
from keywords.lexicon import Clause

ROOT = Path(__file__).resolve().parents[3]
TRIAGE = ROOT / "tests" / "data" / "triage"
DISCRIMINATOR_ROW = re.compile(r"^\| `([a-z_]+)` \|", re.MULTILINE)
NON_EMERGENCY_TAGS = {
    "urgent_symptom", "negated", "history", "hypothetical", "topic", "drug_question", "vaccine_question",
    "lab_value", "seriousness_question", "appointment", "adverse_mild", "info", "other",
    "",  # untagged: sets from dev-16 on name a discriminator for emergencies only
}  # fmt: skip


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_lexicon())


def _documented() -> set[str]:
    return set(DISCRIMINATOR_ROW.findall((ROOT / "docs" / "triage.md").read_text(encoding="utf-8")))


def test_every_emergency_term_is_a_documented_discriminator_with_a_source() -> None:
    documented = _documented()
    emergency = [t for t in load_lexicon().terms if t.category == "emergency"]
    assert {t.discriminator for t in emergency} <= documented
    assert all(t.source for t in emergency)


@pytest.mark.parametrize("path", sorted(TRIAGE.glob("*.jsonl")), ids=lambda p: p.name)
def test_triage_sets_are_well_formed_and_described(path: Path) -> None:
    manifest = json.loads((TRIAGE / "sets.json").read_text(encoding="utf-8"))
    assert manifest[path.name]["kind"] in ("dev", "blind")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 300
    assert len({r["text"] for r in rows}) == len(rows)
    documented = _documented()
    for row in rows:
        assert set(row) == {"text", "emergency", "category", "level", "discriminator"}
        assert row["category"] in CATEGORIES
        assert row["level"] in ("emergency", "urgent", "routine")
        assert row["emergency"] == (row["level"] == "emergency") == (row["category"] == "emergency")
        assert row["discriminator"] in (documented if row["emergency"] else NON_EMERGENCY_TAGS)


def _lexicon(*terms: Term, markers: Markers | None = None) -> Classifier:
    return Classifier(Lexicon.from_terms(terms, markers or Markers(negation=("没有", "不"))))


BREATH = Term(
    term="呼吸困难",
    category="emergency",
    severity="critical",
    discriminator="breathing_difficulty",
    source="MTS",
    clauses=(Clause(subject=("呼吸",), predicate=("困难", "急促"), gap=3),),
)


def test_a_clause_grammar_pairs_subject_and_predicate_within_one_clause() -> None:
    triage = _lexicon(BREATH)
    hit = triage.classify("他呼吸特别急促")
    assert (hit.level, hit.discriminator, hit.emergency) == ("emergency", "breathing_difficulty", True)
    assert hit.deciding[0].via == "grammar"
    assert not triage.classify("呼吸，急促").emergency  # two clauses
    assert not triage.classify("呼吸还行就是心里有点急促感").emergency  # too far apart
    assert not triage.classify("呼吸不太困难").emergency  # a negation between them forms no pair
    assert not triage.classify("没有呼吸困难").emergency  # negated like any term


def test_weak_cues_ask_once_and_two_cues_or_a_population_make_an_emergency() -> None:
    weak = {"category": "emergency", "severity": "high", "cue": "weak", "source": "MTS shock"}
    triage = _lexicon(
        Term(term="冷汗", discriminator="shock", variants=("出冷汗",), **weak),
        Term(term="脸色苍白", discriminator="shock", **weak),
        markers=Markers(negation=("没有",), population=("孕妇",)),
    )
    one = triage.classify("我出冷汗")
    assert (one.level, one.confirm, one.emergency, one.discriminator) == ("urgent", True, False, "shock")
    two = triage.classify("出冷汗，脸色苍白")
    assert (two.level, two.confirm, two.emergency) == ("emergency", False, True)
    raised = triage.classify("孕妇出冷汗")
    assert (raised.level, raised.emergency) == ("emergency", True)
    assert not triage.classify("没有出冷汗").confirm


def test_symptoms_are_urgent_and_a_risk_population_raises_fever(classifier: Classifier) -> None:
    fever = classifier.classify("我发烧两天了，浑身没劲")
    assert (fever.level, fever.confirm, fever.emergency) == ("urgent", False, False)
    infant = classifier.classify("宝宝才一个月大，发烧三十八度")
    assert (infant.level, infant.discriminator) == ("emergency", "high_risk_population")
    assert classifier.classify("华法林一天吃几片").level == "routine"
    asked = classifier.classify("胸口有点不舒服")
    assert (asked.level, asked.confirm, asked.discriminator) == ("urgent", True, "cardiac_chest_pain")


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("空腹血糖7.2是糖尿病吗", "diagnosis"),  # a lab value: a physician's answer
        ("络活喜和氨氯地平是不是一个药", "medication"),  # a generic question about a named drug
        ("我想取消下周三的预约", "appointment"),
        ("不用叫救护车，我只是想问问停车场在哪", "general"),  # a negated request is no emergency
        ("我去年心梗过，想挂个复诊号", "appointment"),  # history
    ],
)
def test_categories_that_know_the_domain(classifier: Classifier, text: str, category: str) -> None:
    result = classifier.classify(text)
    assert (result.category, result.emergency) == (category, False), result.rules


def test_a_decimal_point_between_digits_stays_in_the_number(classifier: Classifier) -> None:
    result = classifier.classify("血糖2.1，手抖出虚汗")
    assert result.emergency, result.rules
    assert result.discriminator == "hypoglycaemia"


def test_benchmark_smoke_scores_sets_and_never_prints_a_blind_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick", "--misses"])
    out = capsys.readouterr().out
    assert "jieba.lcut" in out
    assert "ratio" in out
    blind = [p for p in TRIAGE.glob("blind-*.jsonl")]
    for path in blind:
        for line in path.read_text(encoding="utf-8").splitlines()[:50]:
            assert json.loads(line)["text"] not in out


def test_a_single_character_word_heard_wrong_is_read_as_the_medical_character(classifier: Classifier) -> None:
    heard = classifier.classify("他割到手流雪流得满地都是")  # 雪 for 血
    assert heard.emergency, heard.rules
    assert heard.discriminator == "major_haemorrhage"
    assert any(m.via == "homophone" and m.category == "emergency" for m in heard.matched)
    # A character inside a word of its own is not re-read: 学校 stays a school.
    assert not classifier.classify("孩子在学校流了好多汗").emergency


def test_sound_alikes_are_checked(tmp_path: Path) -> None:
    from keywords import scan_lexicon

    (tmp_path / "a.yaml").write_text("sound_alikes:\n  血: [雪]\n  晕: [雪]\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("sound_alikes:\n  血: [xue]\n", encoding="utf-8")
    problems = [str(p) for p in scan_lexicon([tmp_path]).problems]
    assert any("'xue' is not one Chinese character" in p for p in problems), problems
    report = scan_lexicon([tmp_path / "a.yaml"])
    assert [p.message for p in report.problems] == ["'雪' already stands for '血'"]


@pytest.mark.parametrize(
    "text",
    [
        "一氧化碳报警器响了 老人在屋里头晕吐了",  # a sounding alarm is the report itself, not a topic
        "家里燃气报警器一直叫 孩子叫不醒",
        "我爸心梗的样子又来了 胸口疼得直冒汗",  # 的 followed by no topic word
    ],
)
def test_a_device_or_a_possessive_does_not_make_a_report_a_topic(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert result.emergency, result.rules


@pytest.mark.parametrize("text", ["心梗的前兆都有哪些", "中风的表现一般有什么", "心脏骤停的抢救黄金时间是几分钟"])
def test_a_topic_word_after_de_makes_a_question_about_the_condition(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert not result.emergency, result.rules
    assert any(r.startswith("topic:") for r in result.rules), result.rules
