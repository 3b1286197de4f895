"""jieba's dictionary segmentation (``Tokenizer.lcut(text, HMM=False)``): the same tokens, in about 40% of the time.

The spotter segments every utterance once, and that was a quarter of its time (jieba's ``get_DAG`` builds a
dict of lists, ``calc`` takes a logarithm per edge through a generator, and ``cut`` is a generator of
generators). :class:`Segmenter` does the same dynamic programme over the same dictionary, right to left in one
pass, with each word's ``log(freq) - log(total)`` computed once when it is built. It gives the same tokens, down
to ties: they go to the longer word, as in jieba's ``max`` over ``(score, end)``. The blocks, the single
characters outside them and the runs of Latin letters and digits are jieba's. ``tests/unit/keywords/
test_segmenter.py`` compares the two on random text and on every labelled utterance.

Build it after the last ``add_word``: it reads the tokenizer's dictionary once and does not follow later
changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jieba

__all__ = ["Segmenter"]

# jieba's own patterns (jieba.re_han_default, jieba.re_skip_default): the same blocks as Tokenizer.cut.
_HAN = jieba.re_han_default
_SKIP = jieba.re_skip_default


class Segmenter:
    """Segments text as ``jieba.Tokenizer.lcut(text, HMM=False)`` does on the dictionary it was built from."""

    def __init__(self, freq: Mapping[str, int], total: int) -> None:
        log_total = math.log(total)
        # Every key of jieba's FREQ, words and their prefixes alike: a prefix (frequency 0) continues the walk
        # but ends no word, so it maps to None. A word's value is what jieba adds per edge.
        self._weights: dict[str, float | None] = {
            word: (math.log(count) - log_total if count else None) for word, count in freq.items()
        }
        # A single character that is no word of the dictionary: jieba takes frequency 1 (log 1 = 0).
        self._unknown = math.log(1) - log_total

    def lcut(self, text: str) -> list[str]:
        """The tokens of ``text``."""
        tokens: list[str] = []
        for block in _HAN.split(text):
            if not block:
                continue
            if _HAN.match(block):
                tokens.extend(self._cut_block(block))
                continue
            for piece in _SKIP.split(block):
                if _SKIP.match(piece):
                    tokens.append(piece)
                else:
                    tokens.extend(piece)  # one token per character, as jieba yields them
        return tokens

    def _cut_block(self, block: str) -> list[str]:
        weights = self._weights
        n = len(block)
        score = [0.0] * (n + 1)  # best log-probability of block[k:]
        end = list(range(n + 1))  # where the first word of that best route ends (inclusive)
        for k in range(n - 1, -1, -1):
            best: float | None = None
            best_end = k
            i = k
            fragment = block[k]
            while fragment in weights:
                weight = weights[fragment]
                if weight is not None:
                    value = weight + score[i + 1]
                    if best is None or value >= best:  # >=: ties go to the longer word, as in jieba
                        best, best_end = value, i
                i += 1
                if i == n:
                    break
                fragment = block[k : i + 1]
            if best is None:
                best = self._unknown + score[k + 1]
            score[k] = best
            end[k] = best_end
        tokens: list[str] = []
        run = ""  # single Latin letters and digits are joined, as jieba does (re_eng)
        x = 0
        while x < n:
            y = end[x] + 1
            word = block[x:y]
            if y - x == 1 and word.isascii() and word.isalnum():
                run += word
            else:
                if run:
                    tokens.append(run)
                    run = ""
                tokens.append(word)
            x = y
        if run:
            tokens.append(run)
        return tokens
