"""The learned second opinion: the model reader, its combination with the lexicon, and what it may learn from."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from keywords import Classification, Classifier, Lexicon, Markers, Match, Term, load_lexicon, scan_lexicon
from keywords.classifier import MODEL_ASK, MODEL_EMERGENCY, VETO_CONTEXT, second_opinion
from keywords.lexicon import DEFAULT_LEXICON_DIR
from keywords.training import MAX_DRIFT, train, training_sets
from keywords.triage_model import MODEL_FILE, TriageModelError, load_triage_model, parse_triage_model

ROOT = Path(__file__).resolve().parents[3]
TRIAGE = ROOT / "tests" / "data" / "triage"
CATEGORY_CLASSES = ["appointment", "general", "medication"]
# The test utterances' characters, known to the test models with no weight: the model speaks only about an
# utterance whose n-grams it knows (MODEL_MIN_GRAMS).
KNOWN_CHARACTERS = "我奶早上在床怎么叫不醒了爸刚才没有昏迷过想挂号看他今天起来以后点太舒服请问明午可吗一下那个办"


def _document(weights: dict[str, float], intercept: float = -3.0, **changes: Any) -> dict[str, object]:
    """A model over 1–2 character n-grams whose emergency head weighs ``weights`` (idf 1 everywhere)."""
    vocabulary = sorted(set(weights) | {"挂", "号", "挂号", "药"} | set(KNOWN_CHARACTERS))
    category = {"挂号": [8.0, 0.0, 0.0], "药": [0.0, 0.0, 8.0]}
    document: dict[str, object] = {
        "format": 1,
        "ngram_range": [1, 2],
        "trained_on": ["dev-x.jsonl"],
        "version": "test",
        "vocabulary": vocabulary,
        "idf": [1.0] * len(vocabulary),
        "heads": {
            "emergency": {
                "classes": ["emergency"],
                "intercepts": [intercept],
                "weights": {g: [w] for g, w in weights.items()},
            },
            "category": {"classes": CATEGORY_CLASSES, "intercepts": [0.0, 0.5, 0.0], "weights": category},
            "discriminator": {"classes": ["unresponsive"], "intercepts": [0.0], "weights": {}},
        },
    }
    document.update(changes)
    return document


def _bytes(document: dict[str, object]) -> bytes:
    return gzip.compress(json.dumps(document, ensure_ascii=False).encode(), mtime=0)


def _model_lexicon(tmp_path: Path, weights: dict[str, float], *terms: Term, intercept: float = -3.0) -> Classifier:
    """A lexicon built in code with a model beside it."""
    model = parse_triage_model(tmp_path / MODEL_FILE, _bytes(_document(weights, intercept)))
    lexicon = Lexicon.from_terms(terms, Markers(negation=("没有", "不")))
    return Classifier(Lexicon(lexicon.terms, lexicon.markers, lexicon.version, (), {}, model))


COMA = Term(term="昏迷", category="emergency", severity="critical", discriminator="unresponsive", source="CN-ED")


def test_features_are_sublinear_tf_idf_normalised_like_scikit_learn() -> None:
    document = _document({"醒": 1.0})
    document["vocabulary"], document["idf"] = ["叫", "醒", "叫叫"], [1.0, 2.0, 1.5]
    document["heads"] = {
        "emergency": {"classes": ["emergency"], "intercepts": [0.0], "weights": {"醒": [1.0]}},
        "category": {"classes": ["general"], "intercepts": [0.0], "weights": {}},
        "discriminator": {"classes": ["unresponsive"], "intercepts": [0.0], "weights": {}},
    }
    model = parse_triage_model(Path("m"), _bytes(document))
    features = model.features("叫叫  醒X")  # whitespace runs collapse to one space; X is lowercased, not known
    raw = {"叫": (1 + math.log(2)) * 1.0, "醒": 1 * 2.0, "叫叫": 1 * 1.5}
    norm = math.sqrt(sum(v * v for v in raw.values()))
    assert features == pytest.approx({g: v / norm for g, v in raw.items()})
    assert model.emergency(features) == pytest.approx(1 / (1 + math.exp(-raw["醒"] / norm)))
    assert model.features("") == {}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"format": 2}, "format 1"),
        ({"idf": [1.0]}, "`vocabulary` and `idf`"),
        ({"ngram_range": [3, 1]}, "`ngram_range`"),
        ({"heads": {}}, "head 'emergency'"),
        ({"trained_on": "dev-1.jsonl"}, "`trained_on`"),
    ],
)
def test_a_malformed_model_is_refused_naming_the_file_and_the_part(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    path = tmp_path / MODEL_FILE
    path.write_bytes(_bytes(_document({"醒": 1.0}, **change)))
    with pytest.raises(TriageModelError) as caught:
        load_triage_model(path)
    assert str(path) in str(caught.value)
    assert named in str(caught.value)


def test_weights_for_an_unknown_ngram_or_of_the_wrong_width_are_refused(tmp_path: Path) -> None:
    document = _document({"醒": 1.0})
    heads = document["heads"]
    assert isinstance(heads, dict)
    heads["emergency"]["weights"]["不在"] = [1.0]
    with pytest.raises(TriageModelError, match="'不在' is not in the vocabulary"):
        parse_triage_model(tmp_path / MODEL_FILE, _bytes(document))
    document = _document({"醒": 1.0})
    heads = document["heads"]
    assert isinstance(heads, dict)
    heads["category"]["weights"]["药"] = [1.0]
    with pytest.raises(TriageModelError, match="weights of '药' must be 3 numbers"):
        parse_triage_model(tmp_path / MODEL_FILE, _bytes(document))
    with pytest.raises(TriageModelError, match="not a gzipped JSON model"):
        parse_triage_model(tmp_path / MODEL_FILE, b"{}")


def test_the_model_is_part_of_the_lexicon_and_its_version(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_LEXICON_DIR, tmp_path / "lexicon")
    shipped = load_lexicon(tmp_path / "lexicon")
    assert shipped.model is not None
    (tmp_path / "lexicon" / MODEL_FILE).write_bytes(_bytes(_document({"醒": 1.0})))
    changed = load_lexicon(tmp_path / "lexicon")
    assert changed.version != shipped.version
    (tmp_path / "lexicon" / MODEL_FILE).write_bytes(b"not gzip")
    report = scan_lexicon(tmp_path / "lexicon")
    assert report.lexicon is None
    assert [p.path.name for p in report.problems] == [MODEL_FILE]
    assert "not a gzipped JSON model" in str(report.problems[0])
    (tmp_path / "lexicon" / MODEL_FILE).unlink()
    assert load_lexicon(tmp_path / "lexicon").model is None


def test_the_model_finds_an_emergency_the_lexicon_has_no_word_for(tmp_path: Path) -> None:
    classifier = _model_lexicon(tmp_path, {"叫不": 9.0, "不醒": 9.0}, COMA)
    text = "我奶奶早上在床上怎么叫不醒了"
    assert len(text) >= VETO_CONTEXT
    result = classifier.classify(text)
    assert result.emergency
    assert result.level == result.category == "emergency"
    assert result.discriminator == "unresponsive"
    assert result.confidence >= MODEL_EMERGENCY
    assert any(r.startswith("emergency: model: P(emergency)") and "不醒" in r for r in result.rules)


def test_the_model_never_overrides_what_the_lexicon_ruled_out(tmp_path: Path) -> None:
    classifier = _model_lexicon(tmp_path, {"昏": 9.0, "迷": 9.0}, COMA)
    denied = classifier.classify("我爸爸刚才没有昏迷过，想挂号看看")
    assert not denied.emergency
    assert not denied.confirm
    assert not any("model: P" in r for r in denied.rules)


def test_a_short_utterance_or_an_unsure_model_gets_the_question(tmp_path: Path) -> None:
    classifier = _model_lexicon(tmp_path, {"叫不": 9.0, "不醒": 9.0, "有点": 13.0}, COMA)
    short = classifier.classify("叫不醒了")
    assert not short.emergency
    assert short.confirm
    assert short.level == "urgent"
    unsure = classifier.classify("他今天早上起来以后有点不太舒服")  # 有点 alone: P between ask and emergency
    assert not unsure.emergency
    assert unsure.confirm
    assert any(r.startswith("ask: model: P(emergency)") for r in unsure.rules)


def test_the_model_has_no_opinion_on_what_it_knows_no_ngrams_of(tmp_path: Path) -> None:
    # With nothing known, P(emergency) would be the intercept: with this one 0.62, enough to ask everybody.
    classifier = _model_lexicon(tmp_path, {"醒": 1.0}, COMA, intercept=0.5)
    assert classifier.lexicon.model is not None
    assert classifier.lexicon.model.opinion("안녕하세요 저는 괜찮아요").emergency > MODEL_ASK
    korean = classifier.classify("안녕하세요 저는 괜찮아요")
    assert not korean.emergency
    assert not korean.confirm
    assert korean.level == "routine"
    assert not any("model" in r for r in korean.rules)


def test_a_red_flag_heard_only_by_sound_alike_is_asked_when_the_model_doubts_it(tmp_path: Path) -> None:
    text = "我今天拉肚子了有点没力气但水还能喝"
    heard = Match(
        "但水", "淹水", "emergency", "critical", 12, 14, "affirmed", "homophone", "淹水", False, "", "not_breathing"
    )
    said = dataclasses.replace(heard, via="exact")
    found = Classification(
        text, True, "emergency", (heard,), ("emergency: 淹水",), "", "emergency", 0.8, "not_breathing"
    )
    model = parse_triage_model(tmp_path / MODEL_FILE, _bytes(_document({"拉": 0.0}, intercept=-1.8)))  # P ≈ 0.14
    doubted = second_opinion(found, model)
    assert not doubted.emergency
    assert doubted.confirm
    assert doubted.level == "urgent"
    assert any("a sound-alike says emergency" in r for r in doubted.rules)
    # Said in so many words, the lexicon's red flag needs a model far surer it is not one (P < VETO).
    kept = second_opinion(dataclasses.replace(found, matched=(said,)), model)
    assert kept.emergency


def test_the_model_category_replaces_the_lexicons_when_sure(tmp_path: Path) -> None:
    classifier = _model_lexicon(tmp_path, {"醒": 1.0})
    assert classifier.classify("请问明天上午可以挂号吗").category == "appointment"
    assert classifier.classify("请问一下那个怎么办").category == "general"


def test_the_shipped_model_learned_from_no_blind_set_not_yet_scored() -> None:
    model = load_lexicon().model
    assert model is not None
    manifest = json.loads((TRIAGE / "sets.json").read_text(encoding="utf-8"))
    unscored = {
        name for name, entry in manifest.items() if entry["kind"] == "blind" and not entry.get("scored_once_for")
    }
    assert set(model.trained_on) <= set(manifest)  # every set it learned from is described
    assert not set(model.trained_on) & unscored
    assert set(model.trained_on) <= {p.name for p in training_sets(TRIAGE)}


def test_the_reader_reproduces_scikit_learn(tmp_path: Path) -> None:
    rows = [
        {"text": t, "emergency": e, "category": c, "level": "emergency" if e else "routine", "discriminator": d}
        for t, e, c, d in [
            ("我爸叫不醒了，怎么喊都没反应", True, "emergency", "unresponsive"),
            ("孩子嘴唇发紫喘不上气", True, "emergency", "breathing_difficulty"),
            ("老人突然倒在地上叫不醒", True, "emergency", "unresponsive"),
            ("喘不上气，嘴唇都紫了", True, "emergency", "breathing_difficulty"),
            ("我想挂个号看看皮肤科", False, "appointment", ""),
            ("这个药一天吃几次", False, "medication", ""),
            ("明天上午还能挂号吗", False, "appointment", ""),
            ("药吃完了想再开一点", False, "medication", ""),
        ]
    ]
    (tmp_path / "dev-x.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (tmp_path / "blind-y.jsonl").write_text((tmp_path / "dev-x.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "sets.json").write_text(
        json.dumps({"dev-x.jsonl": {"kind": "dev"}, "blind-y.jsonl": {"kind": "blind"}})
    )
    paths = training_sets(tmp_path)
    assert [p.name for p in paths] == ["dev-x.jsonl"]  # the blind set not yet scored is never learned from
    data, drift = train(paths)
    assert drift <= MAX_DRIFT
    model = parse_triage_model(tmp_path / MODEL_FILE, data)
    assert model.trained_on == ("dev-x.jsonl",)
    assert model.emergency(model.features("我妈叫不醒了")) > model.emergency(model.features("我想挂号"))
    assert train(paths)[0] == data  # deterministic: a retrain with nothing new changes no byte
