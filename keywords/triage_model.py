"""The learned second opinion beside the lexicon: a linear model over the characters of an utterance.

Why (docs/decisions.md, "A learned model beside the lexicon"): callers describe what they see in words nobody
wrote down, and every fresh test set brought phrasings the lexicon lacked (docs/triage.md, Figures). A model over
character n-grams (1–2 characters: 叫不醒 is 叫, 不, 醒, 叫不, 不醒) learns from every labelled utterance
the writers produced, not only from the words a developer copied into YAML, so it also recognises 嘴唇紫了 when
only 嘴唇发紫 and 脸紫了 were seen.

The model is data, not code: ``keywords/lexicon/triage_model.json.gz``, written by ``python -m
keywords.training`` (scikit-learn's ``TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)``
and ``LogisticRegression``), read here without scikit-learn, and part of the lexicon's version. Scoring is
sans-I/O and pure Python: an utterance's n-grams, their TF-IDF weights (``1 + ln(tf)`` × idf, L2-normalised over
the vocabulary), and per head a dot product with the weights plus the intercept.

Heads:
- ``emergency``: one logistic weight vector; :meth:`TriageModel.emergency` is the probability of a red flag.
- ``category``: the consult category of a non-emergency utterance (softmax over the categories).
- ``discriminator``: which discriminator an emergency the lexicon did not explain most resembles.
"""

from __future__ import annotations

import gzip
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ground.errors import MedhotlineError

__all__ = [
    "MODEL_FILE",
    "Head",
    "Opinion",
    "TriageModel",
    "TriageModelError",
    "load_triage_model",
    "parse_triage_model",
]

MODEL_FILE = "triage_model.json.gz"
FORMAT = 1
HEADS = ("emergency", "category", "discriminator")
_WHITESPACE = re.compile(r"\s\s+")  # scikit-learn's char analyzer collapses runs of whitespace to one space


class TriageModelError(MedhotlineError):
    """The model file is missing a part, malformed, or of another format."""


@dataclass(frozen=True)
class Head:
    """One linear head: per class an intercept, and per n-gram the weights of every class (sparse: an n-gram
    that moves no class is absent)."""

    classes: tuple[str, ...]
    intercepts: tuple[float, ...]
    weights: Mapping[str, tuple[float, ...]]

    @cached_property
    def _sparse(self) -> dict[str, tuple[tuple[int, float], ...]]:
        # The discriminator head keeps a few hundred weights per class (keywords/training.py): mostly zeros.
        rows = {g: tuple((k, w) for k, w in enumerate(row) if w) for g, row in self.weights.items()}
        return {g: row for g, row in rows.items() if row}

    def scores(self, features: Mapping[str, float]) -> list[float]:
        """One score per class; a two-class head is stored as scikit-learn stores it, one vector for the second."""
        totals = list(self.intercepts)
        sparse = self._sparse
        for gram, value in features.items():
            for index, weight in sparse.get(gram, ()):
                totals[index] += weight * value
        return [0.0, totals[0]] if len(self.classes) == 2 else totals


class Opinion:
    """What the model makes of one utterance: P(emergency) at once; the category and the features only when asked
    (most utterances need one of them or neither, and each costs as much again)."""

    def __init__(self, model: TriageModel, present: list[str], values: list[float], emergency: float) -> None:
        self._model = model
        self._present = present
        self._values = values
        self.emergency = emergency  # P(a red flag now)

    @property
    def known(self) -> int:
        """How many of the utterance's n-grams the model knows."""
        return len(self._present)

    @cached_property
    def features(self) -> Mapping[str, float]:
        """The TF-IDF vector (for the discriminator and the evidence)."""
        return dict(zip(self._present, self._values, strict=True))

    @cached_property
    def category(self) -> tuple[str, float]:
        """The most likely consult category were it not an emergency, and its probability."""
        head = self._model.heads["category"]
        # Per class, the dot product of its weights with the values, looked up and multiplied in C (the sum's
        # order is the n-grams' order, as for the emergency head).
        scores = [
            sum(map(operator.mul, map(column.__getitem__, self._present), self._values)) + b
            for column, b in zip(self._model.category_columns, head.intercepts, strict=True)
        ]
        if len(head.classes) == 2:
            scores = [0.0, scores[0]]
        top = max(scores)
        return head.classes[scores.index(top)], 1.0 / sum(math.exp(s - top) for s in scores)


@dataclass(frozen=True)
class TriageModel:
    """A trained model: the vocabulary's idf, the n-gram range, the heads, and what it was trained on."""

    ngram_range: tuple[int, int]
    idf: Mapping[str, float]
    heads: Mapping[str, Head]
    trained_on: tuple[str, ...]
    version: str

    @cached_property
    def emergency_weights(self) -> dict[str, float]:
        """Per known n-gram its emergency weight (0 where none): one lookup each."""
        weights = self.heads["emergency"].weights
        return {g: weights.get(g, (0.0,))[0] for g in self.idf}

    @cached_property
    def category_columns(self) -> tuple[dict[str, float], ...]:
        """Per category class, every known n-gram's weight (0 where none): one lookup per n-gram and class."""
        weights = self.heads["category"].weights
        width = len(self.heads["category"].intercepts)
        zeros = (0.0,) * width
        return tuple({g: weights.get(g, zeros)[k] for g in self.idf} for k in range(width))

    def opinion(self, text: str) -> Opinion:
        """P(emergency) of ``text`` (the category and the features follow from the :class:`Opinion` when asked).
        The classifier asks this of every utterance, so the loops are comprehensions and ``map``."""
        low, high = self.ngram_range
        doc = _WHITESPACE.sub(" ", text.lower())
        idf = self.idf
        counts: Counter[str] = Counter()
        for n in range(low, min(high, len(doc)) + 1):
            # Characters and character pairs are cut in C; the keys keep the order of the generator this replaced
            # (all of one length, then the next), so the sums below add in the same order.
            if n == 1:
                counts.update(doc)
            elif n == 2:
                counts.update(map(operator.add, doc, doc[1:]))
            else:
                counts.update(doc[i : i + n] for i in range(len(doc) - n + 1))
        present = [g for g in counts if g in idf]
        raw = [idf[g] if counts[g] == 1 else (1.0 + math.log(counts[g])) * idf[g] for g in present]
        norm = math.sqrt(sum(map(operator.mul, raw, raw))) or 1.0
        values = [v / norm for v in raw]
        weights = self.emergency_weights
        score = sum(map(operator.mul, [weights[g] for g in present], values)) + self.heads["emergency"].intercepts[0]
        return Opinion(self, present, values, 1.0 / (1.0 + math.exp(-score)) if score > -500 else 0.0)

    def features(self, text: str) -> Mapping[str, float]:
        """The utterance's TF-IDF vector over the vocabulary, as scikit-learn computes it (sublinear tf, l2)."""
        return self.opinion(text).features

    def emergency(self, features: Mapping[str, float]) -> float:
        """The probability that the utterance reports a red flag now."""
        (score,) = self.heads["emergency"].scores(features)
        return 1.0 / (1.0 + math.exp(-score)) if score > -500 else 0.0

    def category(self, features: Mapping[str, float]) -> tuple[str, float]:
        """The most likely consult category of a non-emergency utterance and its probability."""
        return _best(self.heads["category"], features)

    def discriminator(self, features: Mapping[str, float]) -> str:
        """The discriminator an emergency utterance most resembles."""
        return _best(self.heads["discriminator"], features)[0]

    def evidence(self, features: Mapping[str, float], count: int = 3) -> list[str]:
        """The n-grams that pushed most towards emergency (longest first among equals): the model's 'why'."""
        weights = self.heads["emergency"].weights
        pushes = [(weights[g][0] * v, g) for g, v in features.items() if g in weights and weights[g][0] > 0]
        pushes.sort(key=lambda p: (-p[0], -len(p[1])))
        return [g for _, g in pushes[:count]]


def _best(head: Head, features: Mapping[str, float]) -> tuple[str, float]:
    scores = head.scores(features)
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    index = scores.index(top)
    return head.classes[index], exps[index] / sum(exps)


def _head(path: Path, name: str, raw: object, vocabulary: Mapping[str, float]) -> Head:
    if not isinstance(raw, dict):
        raise TriageModelError(f"{path}: head {name!r} is missing or not a mapping")
    classes, intercepts, weights = raw.get("classes"), raw.get("intercepts"), raw.get("weights")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise TriageModelError(f"{path}: head {name!r}: `classes` must be a non-empty list of names")
    width = 1 if name == "emergency" or len(classes) == 2 else len(classes)
    if not isinstance(intercepts, list) or len(intercepts) != width:
        raise TriageModelError(f"{path}: head {name!r}: `intercepts` must have {width} numbers")
    if not isinstance(weights, dict):
        raise TriageModelError(f"{path}: head {name!r}: `weights` must map n-grams to weights")
    rows: dict[str, tuple[float, ...]] = {}
    for gram, row in weights.items():
        if gram not in vocabulary:
            raise TriageModelError(f"{path}: head {name!r}: n-gram {gram!r} is not in the vocabulary")
        if not isinstance(row, list) or len(row) != width or not all(isinstance(w, (int, float)) for w in row):
            raise TriageModelError(f"{path}: head {name!r}: the weights of {gram!r} must be {width} numbers")
        rows[gram] = tuple(float(w) for w in row)
    return Head(tuple(classes), tuple(float(i) for i in intercepts), rows)


def parse_triage_model(path: Path, data: bytes) -> TriageModel:
    """The model in ``data`` (the gzipped JSON of ``path``), or :class:`TriageModelError` naming what is wrong."""
    try:
        document = json.loads(gzip.decompress(data))
    except (OSError, EOFError, ValueError) as exc:
        raise TriageModelError(f"{path}: not a gzipped JSON model ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TriageModelError(f"{path}: not a triage model of format {FORMAT}")
    grams, idf = document.get("vocabulary"), document.get("idf")
    if not isinstance(grams, list) or not isinstance(idf, list) or len(grams) != len(idf) or not grams:
        raise TriageModelError(f"{path}: `vocabulary` and `idf` must be lists of the same, non-zero length")
    vocabulary = {str(g): float(i) for g, i in zip(grams, idf, strict=True)}
    ngram_range = document.get("ngram_range")
    if not (isinstance(ngram_range, list) and len(ngram_range) == 2 and 1 <= ngram_range[0] <= ngram_range[1]):
        raise TriageModelError(f"{path}: `ngram_range` must be [low, high] with 1 ≤ low ≤ high")
    heads = document.get("heads")
    if not isinstance(heads, dict):
        raise TriageModelError(f"{path}: `heads` is missing")
    trained_on = document.get("trained_on", [])
    if not isinstance(trained_on, list):
        raise TriageModelError(f"{path}: `trained_on` must list the sets the model learned from")
    return TriageModel(
        (int(ngram_range[0]), int(ngram_range[1])),
        vocabulary,
        {name: _head(path, name, heads.get(name), vocabulary) for name in HEADS},
        tuple(str(t) for t in trained_on),
        str(document.get("version", "")),
    )


def load_triage_model(path: Path) -> TriageModel:
    """The model file at ``path``, or :class:`TriageModelError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TriageModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_triage_model(path, data)
