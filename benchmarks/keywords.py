"""Keyword classifier: quality on the labelled sets and speed next to plain ``jieba.lcut``.

Run ``python -m benchmarks.keywords``. Quality: emergency recall and precision, category accuracy on
``tests/data/keywords_eval.jsonl`` (targets 0.98 / 0.95 / 0.90) and on ``keywords_holdout.jsonl`` (phrasings
written after the lexicon, to show how it generalises). Speed: utterances per second and p50/p99 latency per
utterance for ``Classifier.classify`` and, in the same run on the same utterances, for ``jieba.lcut`` (the
baseline: segmentation alone). Target p99 under 2 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jieba

from keywords import Classifier, load_lexicon

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


@dataclass(frozen=True)
class Quality:
    recall: float
    precision: float
    accuracy: float
    size: int


@dataclass(frozen=True)
class Speed:
    per_second: float
    p50_ms: float
    p99_ms: float


def quality(classifier: Classifier, path: Path) -> Quality:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    tp = fp = fn = correct = 0
    for row in rows:
        result = classifier.classify(row["text"])
        tp += result.emergency and row["emergency"]
        fp += result.emergency and not row["emergency"]
        fn += (not result.emergency) and row["emergency"]
        correct += result.category == row["category"]
    return Quality(tp / max(1, tp + fn), tp / max(1, tp + fp), correct / len(rows), len(rows))


def speed(func: Callable[[str], object], texts: list[str], rounds: int) -> Speed:
    for text in texts:  # warm caches (pinyin readings, jieba routes)
        func(text)
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(rounds):
        for text in texts:
            t0 = time.perf_counter()
            func(text)
            samples.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return Speed(len(samples) / elapsed, statistics.median(samples) * 1000, p99 * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="passes over the utterances (default 20)")
    args = parser.parse_args()
    jieba.setLogLevel(logging.WARNING)
    started = time.perf_counter()
    classifier = Classifier(load_lexicon())
    build = time.perf_counter() - started
    print(f"lexicon {classifier.version}: classifier built in {build:.2f} s")
    for name in ("keywords_eval.jsonl", "keywords_holdout.jsonl"):
        path = DATA / name
        if path.exists():
            q = quality(classifier, path)
            print(
                f"{name:<24} n={q.size:<4} emergency recall {q.recall:.3f}  precision {q.precision:.3f}  "
                f"category accuracy {q.accuracy:.3f}"
            )
    with (DATA / "keywords_eval.jsonl").open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    jieba.initialize()
    ours = speed(classifier.classify, texts, args.rounds)
    base = speed(jieba.lcut, texts, args.rounds)
    for label, s in (("classifier", ours), ("jieba.lcut", base)):
        print(f"{label:<11} {s.per_second:>9.0f} utt/s   p50 {s.p50_ms:.3f} ms   p99 {s.p99_ms:.3f} ms")
    print(
        f"ratio       {base.per_second / ours.per_second:.1f}x slower than jieba.lcut (throughput), "
        f"p99 {ours.p99_ms / base.p99_ms:.1f}x; target p99 < 2 ms: {'met' if ours.p99_ms < 2 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
