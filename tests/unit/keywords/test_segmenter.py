"""The segmenter gives jieba's own tokens (``lcut(text, HMM=False)``), so the spotter's word boundaries, and with
them every decision, stay what they were with jieba."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jieba
import pytest

from keywords.segmenter import Segmenter

DATA = Path(__file__).resolve().parents[2] / "data"


@pytest.fixture(scope="module")
def tokenizer() -> jieba.Tokenizer:
    jieba.setLogLevel(logging.WARNING)
    tok = jieba.Tokenizer()
    tok.initialize()
    # Words of the kind the spotter adds (lexicon variants and markers), some of them new to jieba.
    for word in ("喊不醒", "嘴唇发紫", "没反应", "止不住", "一氧化碳", "不答应", "胸口痛"):
        tok.add_word(word)
    return tok


@pytest.fixture(scope="module")
def segmenter(tokenizer: jieba.Tokenizer) -> Segmenter:
    return Segmenter(tokenizer.FREQ, tokenizer.total)


def _utterances() -> list[str]:
    texts: list[str] = []
    for path in sorted(DATA.glob("*.jsonl")) + sorted((DATA / "triage").glob("*.jsonl")):
        if "blind" in path.name:
            continue  # blind sets are read by the benchmark alone: a failure here would print their sentences
        with path.open(encoding="utf-8") as handle:
            texts.extend(str(json.loads(line)["text"]) for line in handle if line.strip())
    return texts


@pytest.mark.parametrize(
    "text",
    [
        "",
        "我爸喊不醒了嘴唇发紫",
        "血糖2.1mmol他说胡话",
        "abc123 胸口痛 x",  # Latin letters and digits joined into runs; a space is a token of its own
        "心梗的前兆\n是什么\r\n",
        "가나다 头晕",  # characters outside jieba's blocks come one by one
        "𠀀㐀鿿",  # outside the CJK range jieba's pattern covers
        "a-b+c#d&e_f%g.h",
        "的的的的的的的",
    ],
)
def test_examples_match_jieba(segmenter: Segmenter, tokenizer: jieba.Tokenizer, text: str) -> None:
    assert segmenter.lcut(text) == tokenizer.lcut(text, HMM=False)


def test_every_labelled_utterance_matches_jieba(segmenter: Segmenter, tokenizer: jieba.Tokenizer) -> None:
    texts = _utterances()
    assert len(texts) > 1000
    different = [t for t in texts if segmenter.lcut(t) != tokenizer.lcut(t, HMM=False)]
    assert different == []


def test_random_text_matches_jieba(segmenter: Segmenter, tokenizer: jieba.Tokenizer) -> None:
    rng = random.Random(20261206)
    alphabet = "".join(sorted(set("".join(_utterances())))) + "abcXYZ0189.%-+#&_ \t\n가"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50)))
        assert segmenter.lcut(text) == tokenizer.lcut(text, HMM=False), text


def test_built_after_add_word_only(tokenizer: jieba.Tokenizer) -> None:
    """The segmenter reads the dictionary once: a word added later is not known to it (build it last)."""
    segmenter = Segmenter(dict(tokenizer.FREQ), tokenizer.total)
    local = jieba.Tokenizer()
    local.FREQ, local.total, local.initialized = dict(tokenizer.FREQ), tokenizer.total, True
    local.add_word("咳咳咳咳")
    assert local.lcut("咳咳咳咳", HMM=False) == ["咳咳咳咳"]
    assert segmenter.lcut("咳咳咳咳") != ["咳咳咳咳"]
