"""The labelled evaluation set (tests/data/keywords_eval.jsonl) meets the issue's quality targets.

Correctness only; speed is measured by ``python -m benchmarks.keywords``, never asserted in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from keywords import CATEGORIES, Classifier, load_lexicon

DATA = Path(__file__).resolve().parents[2] / "data"


def _load(name: str) -> list[dict[str, object]]:
    with (DATA / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_eval_set_is_well_formed() -> None:
    rows = _load("keywords_eval.jsonl")
    assert len(rows) >= 220
    assert len({str(r["text"]) for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"text", "emergency", "category"}
        assert row["category"] in CATEGORIES
        assert row["emergency"] == (row["category"] == "emergency")
    assert {r["category"] for r in rows} == set(CATEGORIES)


def test_eval_set_meets_targets() -> None:
    classifier = Classifier(load_lexicon())
    rows = _load("keywords_eval.jsonl")
    tp = fp = fn = correct = 0
    misses = []
    for row in rows:
        result = classifier.classify(str(row["text"]))
        tp += result.emergency and bool(row["emergency"])
        fp += result.emergency and not row["emergency"]
        fn += (not result.emergency) and bool(row["emergency"])
        correct += result.category == row["category"]
        if result.category != row["category"]:
            misses.append((row["text"], row["category"], result.category, result.rules))
    recall = tp / (tp + fn)
    precision = tp / (tp + fp)
    accuracy = correct / len(rows)
    assert recall >= 0.98, misses
    assert precision >= 0.95, misses
    assert accuracy >= 0.90, misses
