"""The spotter and classifier on Chinese text as a recognizer transcribes callers: each scope rule, sound-alikes,
spacing, spans, determinism."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keywords import Classification, Classifier, Lexicon, Match, Term, load_lexicon, normalise
from keywords.spotter import fuzzy_syllable


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_lexicon())


def _rules(result: Classification) -> dict[str, str]:
    return {m.canonical: m.rule for m in result.matched}


def _check_spans(result: Classification) -> None:
    for match in result.matched:
        assert result.text[match.start : match.end] == match.term


# -- the issue's two sentences ------------------------------------------------------------------------------


def test_issue_examples(classifier: Classifier) -> None:
    urgent = classifier.classify("我爸胸口疼得厉害，喘不上气")
    assert urgent.emergency
    assert urgent.category == "emergency"
    assert [(m.term, m.start, m.end) for m in urgent.deciding] == [("胸口疼", 2, 5), ("喘不上气", 9, 13)]
    calm = classifier.classify("没有胸痛，想问降压药怎么吃")
    assert not calm.emergency
    assert calm.category == "medication"
    assert _rules(calm)["胸痛"] == "negated"
    assert any(r.startswith("negation: 没有") for r in calm.rules)


# -- negation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["没有胸痛", "我没有胸口疼", "无胸痛无呼吸困难", "并非中风只是面瘫", "孩子没抽风", "他不是心梗", "不胸闷也不喘"],
)
def test_negation(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert not result.emergency, result.rules
    assert all(m.rule == "negated" for m in result.matched if m.category == "emergency")


def test_negation_scope_ends_at_clause_breakers(classifier: Classifier) -> None:
    assert classifier.classify("没有发烧 但是胸口疼得厉害").emergency
    assert classifier.classify("没有发烧，胸口疼得厉害").emergency  # punctuation
    assert classifier.classify("不是我是我爸昏迷了").emergency  # a third party between negator and term


def test_words_with_negation_characters_are_no_negation(classifier: Classifier) -> None:
    # 不停, 不行, 不省人事, 没劲: the character is part of a word, or of the term itself.
    assert classifier.classify("孩子不停地抽搐").emergency
    assert classifier.classify("老人不省人事").emergency
    assert classifier.classify("我妈一边没劲").emergency


def test_uncertainty_is_an_emergency(classifier: Classifier) -> None:
    result = classifier.classify("我不知道是不是中风")
    assert result.emergency
    assert _rules(result)["中风"] == "uncertain"
    assert classifier.classify("会不会是心梗").emergency


# -- history, hypotheticals, topics ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["我爸去年中风过", "以前心梗过", "三年前心梗", "之前胸闷 已经好了", "我爸中风以后吃的药", "他晕倒过"],
)
def test_history(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert not result.emergency, result.rules
    assert "history" in {m.rule for m in result.matched}


def test_history_then_current(classifier: Classifier) -> None:
    result = classifier.classify("以前中风过 现在又说话不清了")
    assert result.emergency
    assert [m.rule for m in result.matched if m.category == "emergency"] == ["history", "affirmed"]


@pytest.mark.parametrize("text", ["如果胸口疼该怎么办", "万一孩子抽搐了怎么处理", "怎么预防中风", "中风的话有什么症状"])
def test_hypothetical(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert not result.emergency, result.rules
    assert "hypothetical" in {m.rule for m in result.matched}


def test_topic(classifier: Classifier) -> None:
    result = classifier.classify("治中风的药多少钱")
    assert not result.emergency
    assert _rules(result)["中风"] == "topic"


# -- third parties -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["我爸叫不醒了", "孩子抽风了", "同事晕倒了", "老人摔了一跤不省人事"])
def test_third_party_reports_are_emergencies(classifier: Classifier, text: str) -> None:
    result = classifier.classify(text)
    assert result.emergency
    assert "third_party" in {m.rule for m in result.matched}
    assert any(r.startswith("third party: ") for r in result.rules)


# -- sound-alikes and spacing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "surface"),
    [
        ("我爸中疯了", "中风", "中疯"),
        ("奶奶昏谜了", "昏迷", "昏谜"),
        ("我爸好像中分了", "中风", "中分"),  # near-homophone: fen / feng
        ("我爸心机梗塞", "胸痛", "心机梗塞"),  # 心肌梗塞 belongs to the cardiac chest pain discriminator
        ("说话不亲楚", "中风", "说话不亲楚"),  # qin / qing (说话不清楚)
    ],
)
def test_homophones(classifier: Classifier, text: str, canonical: str, surface: str) -> None:
    result = classifier.classify(text)
    assert result.emergency
    [match] = [m for m in result.matched if m.canonical == canonical]
    assert (match.term, match.via) == (surface, "homophone")
    assert any(r.startswith(f"homophone: {surface} → ") for r in result.rules)


def test_homophone_of_a_non_emergency_term(classifier: Classifier) -> None:
    result = classifier.classify("打了疫苗有点过民")
    assert result.category == "adverse_reaction"
    assert [m.variant for m in result.matched if m.via == "homophone"] == ["过敏"]


def test_common_words_are_not_taken_for_sound_alikes(classifier: Classifier) -> None:
    # 不是 sounds like 不适, 烧三 like 烧伤: a common word, or one that cuts through words, is no ASR error.
    assert not classifier.classify("不是心梗 想问胃药怎么吃").emergency
    assert not classifier.classify("孩子发烧三十八度").emergency
    assert classifier.classify("我的号挂不上").category == "appointment"


def test_fuzzy_syllables() -> None:
    assert fuzzy_syllable("zhong") == fuzzy_syllable("zong")
    assert fuzzy_syllable("feng") == fuzzy_syllable("fen")
    assert fuzzy_syllable("ning") == fuzzy_syllable("lin")
    assert fuzzy_syllable("shang") == fuzzy_syllable("san")
    assert fuzzy_syllable("gou") != fuzzy_syllable("guo")


def test_spaced_characters_and_full_width(classifier: Classifier) -> None:
    result = classifier.classify("我 爸 胸 口 疼 ， 喘 不 上 气")
    assert result.emergency
    assert [m.term for m in result.deciding] == ["胸 口 疼", "喘 不 上 气"]
    _check_spans(result)
    assert classifier.classify("ＨＰＶ疫苗多大能打").category == "vaccination"


def test_normalise_keeps_a_map_to_the_original() -> None:
    norm = normalise("我 爸，Ｈ中 风！")
    assert norm.text == "我爸h中风"
    assert norm.index == (0, 2, 4, 5, 7)
    assert norm.span(3, 5) == (5, 8)
    assert 2 in norm.breaks


# -- categories ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("打完疫苗后发烧了", "adverse_reaction"),
        ("孩子发烧了还能打疫苗吗", "vaccination"),  # the symptom came before: a question about vaccinating
        ("吃了头孢以后身上起疹子", "adverse_reaction"),
        ("我对青霉素过敏 能吃头孢吗", "medication"),
        ("我最近老是头疼 是不是得了什么病", "diagnosis"),
        ("降压药漏服了怎么办", "medication"),
        ("我想预约下周六给宝宝打疫苗", "vaccination"),
        ("复诊要不要重新挂号", "appointment"),
        ("停车场在哪", "general"),
        ("如果喘不上气是不是要马上去医院", "general"),
    ],
)
def test_categories(classifier: Classifier, text: str, category: str) -> None:
    assert classifier.classify(text).category == category


def test_recognition_fields(classifier: Classifier) -> None:
    result = classifier.classify("没有胸痛，我爸中疯了")
    assert result.as_recognition_fields() == ("emergency", True, ("中风",))
    assert classifier.classify("").as_recognition_fields() == ("general", False, ())


def test_lexicon_from_code() -> None:
    lexicon = Lexicon.from_terms(
        [Term(term="中风", category="emergency", severity="critical", discriminator="stroke_signs", variants=("嘴歪",))]
    )
    result = Classifier(lexicon).classify("他嘴歪")
    assert result.emergency
    assert result.matched == (
        Match("嘴歪", "中风", "emergency", "critical", 1, 3, "affirmed", variant="嘴歪", discriminator="stroke_signs"),
    )
    assert result.lexicon_version == lexicon.version


# -- properties -------------------------------------------------------------------------------------------


_ALPHABET = st.sampled_from(list("我爸胸口疼得厉害没有不以前如果中风疯昏迷谜抽风孩子 ，,。！ 　Ａ1过敏民打疫苗后发烧"))


@settings(max_examples=150, deadline=None)
@given(st.text(_ALPHABET, max_size=30))
def test_spans_map_back_and_results_are_deterministic(classifier: Classifier, text: str) -> None:
    first = classifier.classify(text)
    _check_spans(first)
    assert classifier.classify(text) == first
    assert all(0 <= m.start < m.end <= len(text) for m in first.matched)
    assert first.emergency == (first.category == "emergency")


def test_separate_instances_agree(classifier: Classifier) -> None:
    other = Classifier(load_lexicon())
    text = "我爸去年中风过 现在又嘴歪了 说话不亲楚"
    assert other.classify(text) == classifier.classify(text)
