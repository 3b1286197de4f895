"""Emergency triage: quality on every labelled set and speed next to plain ``jieba.lcut``, in one run.

Run ``python -m benchmarks.keywords`` (``--quick`` for the CI smoke, ``--misses`` to list a development set's
errors). Quality, per set: emergency recall and precision, consult-category accuracy, triage-level accuracy,
and how many missed emergencies were at least asked about (the confirmation question); then recall per
discriminator. A set is scored only when git shows it was committed *before* the lexicon's last change (or the
lexicon has uncommitted changes): a set written after the lexicon could have been written to flatter it.
``tests/data/triage/sets.json`` says which sets are blind (never read by the developers: their misses are never
printed) and which are development sets; a blind set scored once for an earlier lexicon shows as ``seen``, and
a set the learned model was trained on as ``trained`` (its figures are in-sample). Each set is also scored by the
lexicon alone, without the model: the baseline of the same run.
Speed: p50/p99 per utterance of ``Classifier.classify`` and, on the same utterances in the same run, of
``jieba.lcut`` (segmentation alone, the baseline) and of the lexicon alone; target p99 within 3× jieba's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jieba

from keywords import Classifier, Lexicon, load_lexicon

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TRIAGE = DATA / "triage"
LEXICON = ROOT / "keywords" / "lexicon"


@dataclass
class Quality:
    size: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    correct: int = 0
    level_correct: int = 0
    levels: int = 0
    asked: int = 0
    by_discriminator: Counter[str] = field(default_factory=Counter)
    found_by_discriminator: Counter[str] = field(default_factory=Counter)
    misses: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.tp / max(1, self.tp + self.fn)

    @property
    def precision(self) -> float:
        return self.tp / max(1, self.tp + self.fp)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.size)


@dataclass(frozen=True)
class Speed:
    per_second: float
    p50_ms: float
    p99_ms: float


def load_rows(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def quality(classifier: Classifier, rows: Sequence[dict[str, object]]) -> Quality:
    q = Quality(size=len(rows))
    for row in rows:
        result = classifier.classify(str(row["text"]))
        truth = bool(row["emergency"])
        q.tp += result.emergency and truth
        q.fp += result.emergency and not truth
        q.fn += (not result.emergency) and truth
        q.correct += result.category == row["category"]
        if "level" in row:
            q.levels += 1
            q.level_correct += result.level == row["level"]
        if truth:
            discriminator = str(row.get("discriminator") or "unlabelled")
            q.by_discriminator[discriminator] += 1
            q.found_by_discriminator[discriminator] += result.emergency
            q.asked += (not result.emergency) and result.confirm
        if result.emergency != truth or result.category != row["category"]:
            q.misses.append((str(row["category"]), result.category, str(row["text"])))
    return q


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def eligibility(path: Path) -> str:
    """Empty when the set may be scored; otherwise why not (see the module docstring)."""
    relative = str(path.relative_to(ROOT))
    added = _git("log", "--diff-filter=A", "--format=%H", "--", relative).splitlines()
    if not added:
        return "not committed yet"
    if _git("status", "--porcelain", "--", str(LEXICON.relative_to(ROOT))):
        return ""  # the lexicon is being changed now, after every committed set
    lexicon = _git("log", "-1", "--format=%H", "--", str(LEXICON.relative_to(ROOT)))
    set_commit = added[-1]
    if not lexicon or set_commit == lexicon:
        return f"committed with the lexicon's last change ({set_commit[:10]})"
    before = subprocess.run(
        ["git", "merge-base", "--is-ancestor", set_commit, lexicon], cwd=ROOT, capture_output=True, check=False
    )
    if before.returncode != 0:
        return f"committed after the lexicon's last change ({lexicon[:10]})"
    return ""


def speed(funcs: Sequence[Callable[[str], object]], texts: Sequence[str], rounds: int) -> list[Speed]:
    """Each function on each utterance in turn (interleaved, so that the shared machine's noise falls on both
    alike), after one warm-up pass (pinyin readings, jieba routes). Times are this thread's CPU time
    (``time.thread_time``): on a shared machine, time spent waiting for the CPU is other processes' and is not
    counted against either function. Each round is one block; the p99 reported is the median of the blocks'."""
    for func in funcs:
        for text in texts:
            func(text)
    blocks: list[list[list[float]]] = []
    elapsed = [0.0 for _ in funcs]
    for _ in range(max(1, rounds)):
        block: list[list[float]] = [[] for _ in funcs]
        for text in texts:
            for index, func in enumerate(funcs):
                t0 = time.thread_time()
                func(text)
                took = time.thread_time() - t0
                block[index].append(took)
                elapsed[index] += took
        blocks.append(block)
    result = []
    for index in range(len(funcs)):
        p99s = []
        everything: list[float] = []
        for block in blocks:
            taken = sorted(block[index])
            p99s.append(taken[min(len(taken) - 1, int(len(taken) * 0.99))])
            everything.extend(taken)
        result.append(
            Speed(
                len(everything) / elapsed[index], statistics.median(everything) * 1000, statistics.median(p99s) * 1000
            )
        )
    return result


def sets(version: str = "", trained: Sequence[str] = ()) -> list[tuple[str, Path, str]]:
    """(name, path, kind) of every labelled set: the first release's sets, then the triage sets. ``kind`` is dev,
    blind, seen (a blind set already scored once for another lexicon ``version``) or trained (the model learned
    from it: ``trained`` names those sets)."""
    manifest = json.loads((TRIAGE / "sets.json").read_text(encoding="utf-8")) if (TRIAGE / "sets.json").exists() else {}
    found = [(p.name, p, "dev") for p in (DATA / "keywords_eval.jsonl", DATA / "keywords_holdout.jsonl") if p.exists()]
    for path in sorted(TRIAGE.glob("*.jsonl")):
        entry = manifest.get(path.name, {})
        kind = str(entry.get("kind", "blind"))  # unknown sets are treated as blind
        if kind == "blind" and entry.get("scored_once_for") and entry["scored_once_for"] != version:
            kind = "seen"  # its figures were seen for an earlier lexicon: a regression check, no longer blind
        if path.name in trained:
            kind = "trained"
        found.append((path.name, path, kind))
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="passes over the utterances for speed (default 20)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: one speed round")
    parser.add_argument("--misses", action="store_true", help="list the errors of development sets (never blind)")
    args = parser.parse_args(argv)
    jieba.setLogLevel(logging.WARNING)
    started = time.perf_counter()
    lexicon = load_lexicon()
    classifier = Classifier(lexicon)
    alone = Classifier(Lexicon(lexicon.terms, lexicon.markers, lexicon.version, lexicon.files, lexicon.sound_alikes))
    print(f"lexicon {classifier.version}: classifier built in {time.perf_counter() - started:.2f} s")
    trained = lexicon.model.trained_on if lexicon.model is not None else ()
    if lexicon.model is not None:
        print(f"learned model: {lexicon.model.version}; sets it learned from show as `trained` (in-sample)")
    scored: list[tuple[str, str, Quality]] = []
    texts: list[str] = []
    for name, path, kind in sets(classifier.version, trained):
        rows = load_rows(path)
        texts.extend(str(r["text"]) for r in rows)
        why_not = eligibility(path)
        if why_not:
            print(f"{name:<28} not scored: {why_not}")
            continue
        q = quality(classifier, rows)
        scored.append((name, kind, q))
        level = f"  level {q.level_correct / q.levels:.3f}" if q.levels else ""
        print(
            f"{name:<28} {kind:<5} n={q.size:<4} emergencies {q.tp + q.fn:<4} recall {q.recall:.3f}  "
            f"precision {q.precision:.3f}  category {q.accuracy:.3f}{level}  missed-but-asked {q.asked}/{q.fn}"
        )
        if lexicon.model is not None:
            b = quality(alone, rows)
            print(
                f"{'':<28} {'':<5} lexicon alone: recall {b.recall:.3f}  precision {b.precision:.3f}  category "
                f"{b.accuracy:.3f}"
            )
    triage_sets = [
        (name, q) for name, _kind, q in scored if q.by_discriminator and "unlabelled" not in q.by_discriminator
    ]
    if triage_sets:
        print("\nrecall per discriminator (found/emergencies per set)")
        names = sorted({d for _, q in triage_sets for d in q.by_discriminator})
        print(f"{'discriminator':<24}" + "".join(f"{n[:26]:>28}" for n, _ in triage_sets))
        for d in names:
            cells = "".join(f"{q.found_by_discriminator[d]:>24}/{q.by_discriminator[d]:<3}" for _, q in triage_sets)
            print(f"{d:<24}{cells}")
    if args.misses:
        for name, kind, q in scored:
            if kind not in ("dev", "trained") or (kind == "trained" and name.startswith("blind")):
                continue  # a blind (or seen) set's sentences are never shown: no lexicon change may see them
            print(f"\n{name}: {len(q.misses)} errors (expected category, got, text)")
            for miss in q.misses:
                print("  ", *miss)
    jieba.initialize()
    rounds = 1 if args.quick else args.rounds  # blocks of all utterances; p99 = the median block's
    ours, base, lexicon_only = speed([classifier.classify, jieba.lcut, alone.classify], texts, rounds)
    print()
    for label, s in (("classifier", ours), ("jieba.lcut", base), ("lexicon", lexicon_only)):
        print(f"{label:<11} {s.per_second:>9.0f} utt/s   p50 {s.p50_ms:.3f} ms   p99 {s.p99_ms:.3f} ms")
    ratio = ours.p99_ms / base.p99_ms
    print(f"ratio       p99 {ratio:.1f}x jieba.lcut's p99 (target ≤ 3x: {'met' if ratio <= 3 else 'MISSED'})")


if __name__ == "__main__":
    main()
