"""Lexicon files: what administrators get told when an edit is wrong, and what a good lexicon loads as."""

from __future__ import annotations

from pathlib import Path

import pytest

from keywords import DEFAULT_LEXICON_DIR, LexiconError, LexiconRegistry, load_lexicon, scan_lexicon

GOOD = """\
terms:
  - term: 中风
    category: emergency
    severity: critical
    variants: [嘴歪, 说话不清]
    discriminator: stroke_signs
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(directory: Path) -> list[str]:
    return [str(p) for p in scan_lexicon([directory]).problems]


def test_shipped_lexicon_is_valid_and_rich() -> None:
    lexicon = load_lexicon()
    categories = {t.category for t in lexicon.terms}
    assert categories == {
        "emergency",
        "diagnosis",
        "medication",
        "adverse_reaction",
        "vaccination",
        "appointment",
        "general",
    }
    assert sum(len(t.surfaces) for t in lexicon.terms) > 300
    assert lexicon.markers.negation
    assert lexicon.markers.third_party
    assert len(lexicon.version) == 12
    assert load_lexicon(DEFAULT_LEXICON_DIR).version == lexicon.version


def test_good_file(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD)
    lexicon = load_lexicon(tmp_path)
    assert lexicon.terms[0].surfaces == ("中风", "嘴歪", "说话不清")


def test_version_follows_content(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD)
    first = load_lexicon(tmp_path).version
    path.write_text(GOOD.replace("说话不清", "说话含糊"), encoding="utf-8")
    assert load_lexicon(tmp_path).version != first


def test_bad_category(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD.replace("category: emergency", "category: urgent"))
    [problem] = _problems(tmp_path)
    assert problem.startswith(f"{path}:3:5: terms.0.category: Input should be 'emergency', ")
    assert "(got 'urgent')" in problem


def test_unknown_severity(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD.replace("severity: critical", "severity: extreme"))
    [problem] = _problems(tmp_path)
    assert problem.startswith(f"{path}:4:5: terms.0.severity: ")
    assert "'critical', 'high' or 'normal'" in problem


def test_empty_variants(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD.replace("[嘴歪, 说话不清]", "[]"))
    assert _problems(tmp_path) == [
        f"{path}:5:5: terms.0.variants: variants is empty: list at least one variant or leave the key out"
    ]


def test_blank_variant(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD.replace("[嘴歪, 说话不清]", "[嘴歪, ' ']"))
    [problem] = _problems(tmp_path)
    assert "terms.0.variants: a variant must not be empty" in problem


def test_duplicate_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD + "    severity: high\n")
    assert _problems(tmp_path) == [
        f"{path}:7:5: terms.0.severity: duplicate key 'severity' (first on line 4, again on line 7)"
    ]


def test_bad_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", "terms:\n  - term: [中风\n")
    [problem] = _problems(tmp_path)
    assert problem.startswith(f"{path}:3:1: not valid YAML: ")


def test_unknown_and_missing_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", "terms:\n  - term: 中风\n    category: emergency\n    level: 1\n")
    assert _problems(tmp_path) == [
        f"{path}:2:5: terms.0: missing required key `severity`",
        f"{path}:4:5: terms.0.level: unknown key `level`",
    ]


def test_bad_pattern(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD + "    patterns: ['(嘴歪']\n")
    [problem] = _problems(tmp_path)
    assert "terms.0.patterns: pattern '(嘴歪' is not a valid regular expression" in problem


def test_bad_pinyin(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD + "    pinyin: {中风: zhong, 脑梗: nao geng}\n")
    [problem] = _problems(tmp_path)
    assert "terms.0: pinyin 'zhong' for '中风' has 1 syllables for 2 characters" in problem


def test_variant_claimed_twice_across_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD)
    other = "terms:\n  - term: 面瘫\n    category: general\n    severity: normal\n    variants: [嘴歪]\n"
    path = _write(tmp_path, "b.yaml", other)
    assert _problems(tmp_path) == [
        f"{path}:5:5: terms.0.variants: '嘴歪' is already a variant of '中风' (a.yaml line 2)"
    ]


def test_all_problems_at_once(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD.replace("category: emergency", "category: x").replace("critical", "y"))
    _write(tmp_path, "b.yaml", "terms: [\n")
    problems = _problems(tmp_path)
    assert len(problems) == 3
    with pytest.raises(LexiconError, match="3 problems in the keyword lexicon"):
        load_lexicon(tmp_path)


def test_not_a_mapping_and_empty_directory(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", "- 中风\n")
    assert _problems(tmp_path) == [f"{path}:1:1: a lexicon file must be a mapping with `terms` and/or `markers`"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _problems(empty) == [f"{empty}: no lexicon files (*.yaml)"]


def test_registry_hot_reload_keeps_last_good(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", GOOD)
    registry = LexiconRegistry(tmp_path)
    assert registry.refresh() == []
    first = registry.current
    assert first is not None
    assert first.classify("他嘴歪了").emergency
    assert registry.refresh() is None  # unchanged
    path.write_text(GOOD.replace("severity: critical", "severity: bad"), encoding="utf-8")
    problems = registry.refresh()
    assert problems
    assert "terms.0.severity" in str(problems[0])
    assert registry.current is first
    path.write_text(GOOD.replace("说话不清", "半身不遂"), encoding="utf-8")
    assert registry.refresh() == []
    second = registry.current
    assert second is not None
    assert second is not first
    assert second.classify("他半身不遂").emergency
    assert not second.classify("他说话不清").emergency
