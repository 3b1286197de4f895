"""``medhotline keywords classify|check``: the classifier on stdin, and the lexicon check for administrators."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from keywords.classifier import Classifier
from keywords.lexicon import load_lexicon, scan_lexicon


def classify_stream(source: BinaryIO, out: TextIO, err: TextIO, lexicon_dir: Path | None = None) -> int:
    """One JSON object per non-blank input line. Invalid UTF-8 stops with the line number (exit 1); lines
    before it have been answered already."""
    classifier = Classifier(load_lexicon(lexicon_dir) if lexicon_dir else load_lexicon())
    for number, raw in enumerate(source, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            print(f"medhotline: stdin line {number} is not valid UTF-8 (byte {exc.start + 1} of the line)", file=err)
            return 1
        text = line.removeprefix("\ufeff") if number == 1 else line
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        out.write(json.dumps(classifier.classify(text).as_json(), ensure_ascii=False) + "\n")
        out.flush()
    return 0


def print_check(paths: Sequence[Path], out: TextIO | None = None) -> int:
    """Every problem and a count (exit 1), or the number of terms and the version (exit 0)."""
    out = out or sys.stdout
    report = scan_lexicon(list(paths))
    if report.lexicon is None:
        for problem in report.problems:
            print(problem, file=out)
        count, files = len(report.problems), len({p.path for p in report.problems})
        print(f"{count} problem{'s' if count != 1 else ''} in {files} file{'s' if files != 1 else ''}", file=out)
        return 1
    lexicon = report.lexicon
    surfaces = sum(len(t.surfaces) for t in lexicon.terms)
    print(
        f"ok: {len(lexicon.terms)} terms, {surfaces} surface forms, {len(lexicon.files)} files "
        f"(version {lexicon.version})",
        file=out,
    )
    return 0
