"""The characters a pattern's match must hold: necessary conditions only, so indexing patterns by them skips no
match."""

from __future__ import annotations

import random
import re

import pytest

from keywords import load_lexicon
from keywords.pattern_index import index_chars, required_chars


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("胸痛", [{"胸"}, {"痛"}]),
        ("(胸口|心口).{0,4}(痛|疼)", [{"胸", "心"}, {"痛", "疼"}]),
        ("[痛疼]得?厉害", [{"痛", "疼"}, {"厉"}, {"害"}]),
        ("(?<=需要)(120|急救)", [{"1", "急"}]),  # the look-behind is zero-width: no condition from it
        ("(一直)?吐", [{"吐"}]),  # an optional group needs nothing
        ("(吐|)血", [{"血"}]),  # an empty alternative: the branch needs nothing
        ("[^不]吐", [{"吐"}]),  # a negated set needs nothing
        ("(?:喘)+", [{"喘"}]),
        ("(?i)abc", []),  # case-folded: no condition
        ("(3[89]|4[01])\\.[0-9]度", [{"3", "4"}, {"."}, {"度"}]),
    ],
)
def test_required_chars(pattern: str, expected: list[set[str]]) -> None:
    assert [set(r) for r in required_chars(re.compile(pattern))] == expected


def test_index_chars_prefers_the_rarest_condition() -> None:
    counts = {"一": 1000, "直": 50, "吐": 5, "血": 7}
    rarest = index_chars(required_chars(re.compile("一直吐血")), lambda c: counts.get(c, 0))
    assert rarest == frozenset("吐")
    assert index_chars([], lambda c: 0) is None


def test_no_lexicon_pattern_matches_without_its_conditions() -> None:
    """Every pattern of the shipped lexicon, on random text made of its own characters and others: wherever it
    matches, each condition holds (so an utterance lacking one could never have matched)."""
    lexicon = load_lexicon()
    patterns = [re.compile(p) for term in lexicon.terms for p in term.patterns]
    assert patterns
    rng = random.Random(20261206)
    filler = "我他她的了不没是有一直很突然现在昨天今天在吃药医生请问"
    checked = 0
    for pattern in patterns:
        requirements = required_chars(pattern)
        alphabet = (
            "".join({c for r in requirements for c in r})
            + filler
            + "".join(c for c in pattern.pattern if "\u4e00" <= c <= "\u9fff")
        )
        for _ in range(60):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
            if pattern.search(text):
                checked += 1
                assert all(not r.isdisjoint(text) for r in requirements), (pattern.pattern, text)
    assert checked > 100  # the random texts did match: the property was exercised
