"""Keyword spotting on what a caller said (as the recognizer transcribed it): sans-I/O and deterministic.

The pipeline, for one utterance:

1. **Normalise**: full-width → half-width (NFKC), lower case, spaces and punctuation dropped (ASR output has
   characters spaced apart and little punctuation). Punctuation is remembered as a clause boundary, and every
   normalised character keeps the index of the original character, so spans point into the caller's text.
2. **Segment** with jieba's dictionary, extended by the lexicon's variants and markers as user words (on a
   :class:`jieba.Tokenizer` owned by the spotter: the global jieba dictionary is never touched), through
   :class:`keywords.segmenter.Segmenter`: jieba's tokens without HMM, faster.
3. **Match** every variant exactly (an Aho–Corasick automaton over the normalised text), then by sound: the
   toneless pinyin of each variant is indexed and compared with the readings of the text's characters, with the usual
   near-homophone confusions folded (zh/z, ch/c, sh/s, n/l, an/ang, en/eng, in/ing): 中疯 → 中风, 昏谜 → 昏迷,
   过民 → 过敏. A sound-alike must share at least half of its characters with the variant (one for two).
4. **Scope**: an emergency or adverse-reaction term is ``negated`` (没有胸痛), ``history`` (去年中风过,
   中风以后), ``hypothetical`` (如果, 万一, 的话) or a ``topic`` (中风的药) when a marker says so within its
   clause. Clauses end at punctuation and at scope breakers (但是, 现在, 突然 ...). A third party (我爸,
   孩子) keeps a report an emergency; uncertainty (不知道是不是中风) never cancels one.

:class:`Spotter` is immutable after construction; build a new one for a new lexicon (``LexiconRegistry``).
"""

from __future__ import annotations

import functools
import logging
import operator
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import ahocorasick
import jieba
from pypinyin import Style, lazy_pinyin, pinyin

from keywords.lexicon import Category, Lexicon, Severity, Term
from keywords.pattern_index import index_chars, required_chars
from keywords.segmenter import Segmenter

__all__ = ["Analysis", "Classification", "Match", "Normalised", "Rule", "Spotter", "fuzzy_syllable", "normalise"]

_V = TypeVar("_V")
Level = Literal["emergency", "urgent", "routine"]
Rule = Literal["affirmed", "third_party", "uncertain", "negated", "history", "hypothetical", "topic", "excluded"]
Via = Literal["exact", "homophone", "pattern", "grammar"]

# Rules under which a match counts towards the classification.
COUNTING_RULES: frozenset[str] = frozenset({"affirmed", "third_party", "uncertain"})
SEVERITY_RANK = {"critical": 0, "high": 1, "normal": 2}
# Scope rules apply to what can raise an alarm or a transfer; an information request stays one even when
# hedged (如果漏服了降压药怎么办 is still about medication).
SCOPED_CATEGORIES: frozenset[str] = frozenset({"emergency", "adverse_reaction"})
NEGATION_WINDOW = 8  # normalised characters between a negator and the term it denies
COMMON_WORD_RATIO = 10  # a sound-alike this much more frequent than the variant is a word in its own right
AFTER_WINDOW = 3  # a history/hypothetical/topic marker after the term must start within this many characters
# A negation inside a clause grammar's gap denies the pair (呼吸不太困难): the pair is not formed at all. A word
# test, not a character test: 特别, 非常, 不停, 不断 and 无力 are no negations (血不停地往外冒 is a pair).
_GAP_NEGATION = re.compile(r"不(?!停|断|住|时|少)|没|未|无(?!力|法)")
_TIME_AGO = re.compile(r"[0-9一二两三四五六七八九十几多半]+(?:年|个月|月|周|个星期|星期|天)(?:以|之)?前")


@dataclass(frozen=True)
class Match:
    """One term found in the text. ``term`` is the text as said (``text[start:end]`` of the original),
    ``canonical`` the lexicon term, ``rule`` what the scope analysis decided, ``via`` how it was found."""

    term: str
    canonical: str
    category: Category
    severity: Severity
    start: int
    end: int
    rule: Rule
    via: Via = "exact"
    variant: str = ""
    symptom: bool = False
    reason: str = ""
    discriminator: str = ""
    cue: str = "strong"
    population: bool = False

    @property
    def counts(self) -> bool:
        return self.rule in COUNTING_RULES

    def as_dict(self) -> dict[str, object]:
        return {"term": self.term, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Classification:
    """The decision for one utterance and why: every match with its rule, and the rules that fired."""

    text: str
    emergency: bool
    category: Category
    matched: tuple[Match, ...]
    rules: tuple[str, ...]
    lexicon_version: str = ""
    # Triage (docs/triage.md): the level, how sure, which discriminator fired, and whether the IVR should ask
    # the caller once (a single weak red-flag cue: never decided silently, never a silent emergency either).
    level: Level = "routine"
    confidence: float = 1.0
    discriminator: str = ""
    confirm: bool = False

    @property
    def counted(self) -> tuple[Match, ...]:
        """The matches that took part in the decision (not denied, past, hypothetical or a topic)."""
        return tuple(m for m in self.matched if m.counts)

    @property
    def deciding(self) -> tuple[Match, ...]:
        """The matches that explain the decision: for an emergency its emergency terms, otherwise all counted."""
        if self.emergency:
            return tuple(m for m in self.counted if m.category == "emergency")
        return self.counted

    def as_recognition_fields(self) -> tuple[Category, bool, tuple[str, ...]]:
        """(category, emergency, matched terms) for ``telephony.ports.Recognition``: canonical terms that decided."""
        return self.category, self.emergency, tuple(dict.fromkeys(m.canonical for m in self.deciding))

    def triage_fields(self) -> tuple[Level, float, str, bool]:
        """(level, confidence, discriminator, confirm) for ``telephony.ports.Recognition``."""
        return self.level, self.confidence, self.discriminator, self.confirm

    def as_json(self) -> dict[str, object]:
        """The ``medhotline keywords classify`` line: matches that counted, with spans into ``text``."""
        return {
            "text": self.text,
            "emergency": self.emergency,
            "category": self.category,
            "matched": [m.as_dict() for m in self.deciding],
            "level": self.level,
            "confidence": self.confidence,
            "discriminator": self.discriminator,
            "confirm": self.confirm,
        }


# -- normalisation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalised:
    """``text`` without spaces and punctuation; ``index[i]`` is the original index of ``text[i]``;
    ``breaks`` are the normalised positions where a punctuation mark (a clause boundary) stood before."""

    original: str
    text: str
    index: tuple[int, ...]
    breaks: frozenset[int]
    # Where a sentence (not just a clause) ended: 。？！；— a hypothetical (如果 X，Y) holds to here.
    sentences: frozenset[int] = frozenset()

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original (start, end) of normalised ``[start, end)``."""
        return self.index[start], self.index[end - 1] + 1


_SENTENCE_ENDS = frozenset("。.？?！!；;")


def _is_han(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def normalise(text: str) -> Normalised:
    chars: list[str] = []
    index: list[int] = []
    breaks: set[int] = set()
    sentences: set[int] = set()
    for position, char in enumerate(text):
        if "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf":  # _is_han, inlined: once per character
            chars.append(char)
            index.append(position)
            continue
        for folded in unicodedata.normalize("NFKC", char):
            if folded.isspace():
                continue
            if folded == "." and chars and chars[-1].isdigit() and text[position + 1 : position + 2].isdigit():
                chars.append(folded)  # a decimal point (血糖2.1) is part of the number, not a clause boundary
                index.append(position)
                continue
            kind = unicodedata.category(folded)
            if kind[0] in "PSZC":
                breaks.add(len(chars))
                if folded in _SENTENCE_ENDS:
                    sentences.add(len(chars))
                continue
            chars.append(folded.lower())
            index.append(position)
    return Normalised(text, "".join(chars), tuple(index), frozenset(breaks), frozenset(sentences))


# -- pinyin ---------------------------------------------------------------------------------------------------

_INITIALS = (("zh", "z"), ("ch", "c"), ("sh", "s"), ("n", "l"))
_FINALS = (("iang", "ian"), ("uang", "uan"), ("ang", "an"), ("eng", "en"), ("ing", "in"))


@functools.lru_cache(maxsize=4096)
def fuzzy_syllable(syllable: str) -> str:
    """Fold the confusions of southern Mandarin and of recognizers: zh/z, ch/c, sh/s, n/l, -ang/-an, -eng/-en,
    -ing/-in. ``zhong`` and ``zong`` fold alike; ``ong`` is kept (it is not confused with ``on``)."""
    for long, short in _INITIALS:
        if syllable.startswith(long):
            syllable = short + syllable[len(long) :]
            break
    for long, short in _FINALS:
        if syllable.endswith(long):
            return syllable[: -len(long)] + short
    return syllable


@functools.lru_cache(maxsize=16384)
def _char_readings(char: str) -> tuple[str, ...]:
    if not _is_han(char):
        return ()
    readings = pinyin(char, style=Style.NORMAL, heteronym=True, errors="ignore")
    return tuple(sorted({fuzzy_syllable(r) for r in readings[0]})) if readings else ()


# -- tries ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    term: Term
    variant: str


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    entries: list[_Entry] = field(default_factory=list)


def _automaton(words: Mapping[str, _V]) -> ahocorasick.Automaton | None:
    """An Aho–Corasick automaton over ``words``, each found with its value (None when there are none)."""
    if not words:
        return None
    automaton = ahocorasick.Automaton()
    for word, value in words.items():
        automaton.add_word(word, value)
    automaton.make_automaton()
    return automaton


def _occurrences(automaton: ahocorasick.Automaton | None, text: str) -> Iterator[tuple[int, Any]]:
    """(index of the last character, value) of every occurrence of the automaton's words in ``text``."""
    if automaton is None or not text:
        return iter(())
    found: Iterator[tuple[int, Any]] = automaton.iter(text)
    return found


def _insert(root: _Node, keys: Iterable[str], entry: _Entry) -> None:
    node = root
    for key in keys:
        node = node.children.setdefault(key, _Node())
    node.entries.append(entry)


@dataclass(frozen=True)
class _Candidate:
    start: int  # normalised
    end: int
    entry: _Entry
    via: Via

    def key(self) -> tuple[int, int, int, int, int, str]:
        # A strong red flag is never displaced by an overlapping weak cue (突然…晕倒 keeps 晕倒); otherwise the
        # longest match first.
        return (
            0 if self.entry.term.cue == "strong" else 1,
            -(self.end - self.start),
            0 if self.via != "homophone" else 1,
            SEVERITY_RANK[self.entry.term.severity],
            self.start,
            self.entry.variant,
        )


@dataclass(frozen=True)
class _Marker:
    kind: str
    word: str
    start: int
    end: int


_FUNCTION_CHARS = frozenset("了的得着不没地过吗呢啊吧呀都也就")
# The sound trie of grammar words holds their words under this stand-in term (only ``variant`` is read).
_CLAUSE_WORD = Term(term="clause-word", category="general", severity="normal")


@dataclass(frozen=True)
class _ClauseWord:
    rule: int  # index into Spotter._clause_rules
    role: Literal["subject", "predicate"]


@dataclass(frozen=True)
class Analysis:
    """Every term found in an utterance (with its scope), and the population modifiers named in it."""

    matches: tuple[Match, ...]
    population: tuple[str, ...] = ()
    symptom_risk: tuple[str, ...] = ()


@functools.cache
def _base_dictionary() -> tuple[dict[str, int], int]:
    """jieba's own dictionary, loaded once per process (its cache file makes that ~0.3 s)."""
    logging.getLogger("jieba").setLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return dict(tokenizer.FREQ), int(tokenizer.total)


class Spotter:
    """Finds lexicon terms in an utterance and decides their scope. Thread-safe after construction."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon
        self.markers = lexicon.markers
        freq, total = _base_dictionary()
        self._frequency = freq  # jieba's own word frequencies (read-only): common words are no ASR errors
        # jieba's tokenizer is needed to add the lexicon's words (add_word fixes their frequencies); after that the
        # segmenter does the work (the same tokens in less time) and the tokenizer's copy of the dictionary goes.
        tokenizer = jieba.Tokenizer()
        tokenizer.FREQ = dict(freq)
        tokenizer.total = total
        tokenizer.initialized = True
        self._sound = _Node()
        self._index_terms(lexicon, tokenizer)
        self._index_patterns(lexicon)
        self._index_clauses(lexicon)
        self._index_markers(tokenizer)
        self._segmenter = Segmenter(tokenizer.FREQ, tokenizer.total)
        self._sound_alikes = dict(lexicon.sound_alikes)
        self._third_party = frozenset(normalise(w).text for w in self.markers.third_party)

    def _index_terms(self, lexicon: Lexicon, tokenizer: jieba.Tokenizer) -> None:
        """Every surface form in the exact automaton, its sound in the sound trie, and in the tokenizer as a word."""
        exact: dict[str, list[_Entry]] = {}  # variant → its entries, in the lexicon's order
        for term in lexicon.terms:
            for surface in term.surfaces:
                variant = normalise(surface).text
                if not variant:
                    continue
                entry = _Entry(term, variant)
                exact.setdefault(variant, []).append(entry)
                if term.homophones and len(variant) >= 2 and all(_is_han(c) for c in variant):
                    override = (term.pinyin or {}).get(surface)
                    syllables = override.split() if override else lazy_pinyin(variant, style=Style.NORMAL)
                    _insert(self._sound, (fuzzy_syllable(s) for s in syllables), entry)
                if len(variant) >= 2:
                    tokenizer.add_word(variant)
        self._exact_automaton = _automaton({variant: tuple(entries) for variant, entries in exact.items()})

    def _index_patterns(self, lexicon: Lexicon) -> None:
        """Patterns by the characters a match must hold (the rarest such condition, :mod:`keywords.pattern_index`):
        an utterance runs only the patterns indexed under its characters, and the few with no condition."""
        self._patterns = [(re.compile(p), term) for term in lexicon.terms for p in term.patterns]
        self._patterns_by_char: dict[str, list[int]] = {}
        self._patterns_always: list[int] = []
        for number, (pattern, _term) in enumerate(self._patterns):
            chars = index_chars(required_chars(pattern), lambda c: self._frequency.get(c, 0))
            if chars is None:
                self._patterns_always.append(number)
            else:
                for char in chars:
                    self._patterns_by_char.setdefault(char, []).append(number)

    def _index_clauses(self, lexicon: Lexicon) -> None:
        """Clause grammars: one table of every subject and predicate word, scanned once per utterance; their sound
        shares the variants' sound trie (one pass), under the stand-in term ``_CLAUSE_WORD``."""
        self._clause_rules = [(term, clause) for term in lexicon.terms for clause in term.clauses]
        self._clause_trie: dict[str, list[_ClauseWord]] = {}
        self._clause_prefixes: set[str] = set()
        for index, (_term, clause) in enumerate(self._clause_rules):
            for role, words in (("subject", clause.subject), ("predicate", clause.predicate)):
                for word in words:
                    variant = normalise(word).text
                    if not variant:
                        continue
                    self._clause_trie.setdefault(variant, []).append(_ClauseWord(index, role))  # type: ignore[arg-type]
                    self._clause_prefixes.update(variant[:n] for n in range(1, len(variant)))
                    if len(variant) >= 2 and all(_is_han(c) for c in variant):
                        # Grammar words are heard wrong too (新跳 for 心跳): their sound, as for variants.
                        keys = (fuzzy_syllable(x) for x in lazy_pinyin(variant, style=Style.NORMAL))
                        _insert(self._sound, keys, _Entry(_CLAUSE_WORD, variant))
        self._clause_max = max((len(w) for w in self._clause_trie), default=0)

    def _index_markers(self, tokenizer: jieba.Tokenizer) -> None:
        self._marker_kinds: dict[str, list[str]] = {}
        for kind in type(self.markers).model_fields:
            for word in getattr(self.markers, kind):
                variant = normalise(word).text
                if variant:
                    self._marker_kinds.setdefault(variant, []).append(kind)
        for word in sorted(self._marker_kinds):
            if len(word) >= 2:
                tokenizer.add_word(word)
        self._marker_automaton = _automaton({word: word for word in self._marker_kinds})

    # -- public ------------------------------------------------------------------------------------------------

    def tokens(self, text: str) -> list[str]:
        """The spotter's jieba segmentation of normalised ``text`` (dictionary only, no HMM: deterministic)."""
        return self._segmenter.lcut(text)

    def spot(self, text: str) -> tuple[Match, ...]:
        """Every lexicon term in ``text``, ordered by position, each with its scope rule."""
        return self.analyse(text).matches

    def analyse(self, text: str) -> Analysis:
        """:meth:`spot`, and the population modifiers (an infant, a pregnant woman ...) the caller named."""
        norm = normalise(text)
        if not norm.text:
            return Analysis(())
        tokens = self.tokens(norm.text)
        starts: set[int] = set()
        ends: set[int] = set()
        position = 0
        for token in tokens:
            starts.add(position)
            position += len(token)
            ends.add(position)
        markers = self._markers(norm.text, starts, ends)
        clause_starts = sorted({0, *norm.breaks, *(m.end for m in markers if m.kind == "scope_breakers")})
        sound = self._sound_candidates(norm.text)
        candidates = (
            self._exact_candidates(norm.text)
            + self._pattern_candidates(norm.text, norm.breaks)
            + self._clause_candidates(norm.text, clause_starts, starts, ends, sound)
            + [
                c
                for c in sound
                if c.entry.term is not _CLAUSE_WORD and self._plausible_error(norm.text, c, starts, ends)
            ]
            + self._heard_as(norm.text, tokens, norm.breaks, clause_starts)
        )
        chosen = self._choose(norm.text, candidates)
        matches = []
        for candidate in chosen:
            rule, reason = self._scope(norm, candidate, chosen, markers, clause_starts)
            start, end = norm.span(candidate.start, candidate.end)
            term = candidate.entry.term
            matches.append(
                Match(
                    term=text[start:end],
                    canonical=term.term,
                    category=term.category,
                    severity=term.severity,
                    start=start,
                    end=end,
                    rule=rule,
                    via=candidate.via,
                    variant=candidate.entry.variant,
                    symptom=term.symptom,
                    reason=reason,
                    discriminator=term.discriminator,
                    cue=term.cue,
                    population=term.population,
                )
            )
        population = tuple(dict.fromkeys(m.word for m in markers if m.kind == "population"))
        risk = tuple(dict.fromkeys(m.word for m in markers if m.kind == "symptom_risk"))
        return Analysis(tuple(matches), population, risk)

    # -- matching ----------------------------------------------------------------------------------------------

    def _exact_candidates(self, text: str) -> list[_Candidate]:
        """Every variant wherever it occurs, overlaps included, by start and then end (one pass in C)."""
        occurrences = _occurrences(self._exact_automaton, text)
        hits = sorted((end + 1 - len(entries[0].variant), end + 1, entries) for end, entries in occurrences)
        return [_Candidate(start, end, entry, "exact") for start, end, entries in hits for entry in entries]

    def _pattern_candidates(self, text: str, breaks: frozenset[int] = frozenset()) -> list[_Candidate]:
        """Matches of the terms' patterns. A pattern without an explicit gap (``.{0,n}``) describes one phrase, so
        its match may not run across punctuation (发烧，浑身酸疼 is no 烧…浑身 burn)."""
        numbers = set(self._patterns_always)
        for char in set(text):
            numbers.update(self._patterns_by_char.get(char, ()))
        return [
            _Candidate(m.start(), m.end(), _Entry(term, m.group()), "pattern")
            for pattern, term in (self._patterns[n] for n in sorted(numbers))
            for m in pattern.finditer(text)
            if m.end() > m.start()
            and not _cue_denied(text, m)
            and (".{" in pattern.pattern or not any(m.start() < b < m.end() for b in breaks))
        ]

    def _heard_as(
        self, text: str, tokens: list[str], breaks: frozenset[int], clause_starts: list[int]
    ) -> list[_Candidate]:
        """Terms found once every single-character word that a recognizer writes for a medical character (雪 for
        血, 云 for 晕: the lexicon's ``sound_alikes``) is read as that character. Only words of one character are
        read so (学 in 学校 stays 学), and only candidates that rest on such a reading are new; they count as
        sound-alikes. The positions do not move, so spans stay spans of the caller's text."""
        if not self._sound_alikes:
            return []
        chars = list(text)
        changed: list[int] = []
        position = 0
        for token in tokens:
            if len(token) == 1 and token in self._sound_alikes:
                chars[position] = self._sound_alikes[token]
                changed.append(position)
            position += len(token)
        if not changed:
            return []
        heard = "".join(chars)
        found = (
            self._exact_candidates(heard)
            + self._pattern_candidates(heard, breaks)
            + self._clause_candidates(heard, clause_starts)
        )
        return [
            _Candidate(c.start, c.end, _Entry(c.entry.term, c.entry.variant), "homophone")
            for c in found
            if any(c.start <= i < c.end for i in changed)
        ]

    def _clause_candidates(
        self,
        text: str,
        clause_starts: list[int],
        starts: set[int] | None = None,
        ends: set[int] | None = None,
        sound: list[_Candidate] | None = None,
    ) -> list[_Candidate]:
        """Subject × predicate pairs of one clause grammar, within its gap, in its order, in one clause, with no
        negation in between. For each word the nearest partner is taken. Words are found as said or, standing as
        words of their own (``starts``/``ends``: token boundaries), by their sound."""
        if not self._clause_rules:
            return []
        found: dict[int, list[tuple[str, int, int]]] = {}
        for start in range(len(text)):
            for end in range(start + 1, min(len(text), start + self._clause_max) + 1):
                piece = text[start:end]
                for word in self._clause_trie.get(piece, ()):
                    found.setdefault(word.rule, []).append((word.role, start, end))
                if piece not in self._clause_prefixes:
                    break
        if starts is not None and ends is not None:
            heard = self._sound_candidates(text) if sound is None else sound
            for candidate in (c for c in heard if c.entry.term is _CLAUSE_WORD):
                said = text[candidate.start : candidate.end]
                shared = [a for a, b in zip(said, candidate.entry.variant, strict=True) if a == b]
                # Grammar words are short: a sound-alike must share a content character (新跳 → 心跳), not just
                # a particle (吃了 is not 气了).
                if all(c in _FUNCTION_CHARS for c in shared):
                    continue
                if self._plausible_error(text, candidate, starts, ends):
                    for word in self._clause_trie.get(candidate.entry.variant, ()):
                        found.setdefault(word.rule, []).append((word.role, candidate.start, candidate.end))
        candidates: list[_Candidate] = []
        for index, occurrences in found.items():
            term, clause = self._clause_rules[index]
            subjects = [(s, e) for role, s, e in occurrences if role == "subject"]
            predicates = [(s, e) for role, s, e in occurrences if role == "predicate"]
            for subject in subjects:
                best: tuple[int, int, int] | None = None  # (distance, start, end)
                for predicate in predicates:
                    pairs = []
                    if clause.order in ("subject_first", "either"):
                        pairs.append((subject, predicate))
                    if clause.order in ("predicate_first", "either"):
                        pairs.append((predicate, subject))
                    for first, second in pairs:
                        gap = second[0] - first[1]
                        if gap < 0 or gap > clause.gap:
                            continue
                        if any(first[0] < b <= second[0] for b in clause_starts):
                            continue
                        if _GAP_NEGATION.search(text[first[1] : second[0]]):
                            continue
                        if best is None or gap < best[0]:
                            best = (gap, first[0], second[1])
                if best is not None:
                    _, start, end = best
                    candidates.append(_Candidate(start, end, _Entry(term, text[start:end]), "grammar"))
        return candidates

    def _sound_candidates(self, text: str) -> list[_Candidate]:
        readings = [_char_readings(c) for c in text]
        found: list[_Candidate] = []
        top = self._sound.children
        n = len(text)
        for start in range(n):
            # The first step from the root is a plain lookup: most characters start no variant's sound.
            frontier = [top[r] for r in readings[start] if r in top]
            end = start
            while frontier:
                # Most nodes on the way hold no variant: the surface and the threshold only where one ends.
                entries = [entry for node in frontier for entry in node.entries]
                if entries:
                    surface = text[start : end + 1]
                    # At least half the characters the same, and two of three or more (行不行 is not 喊不醒); all
                    # the same is the exact match, not a sound-alike. (Counted with map in C: this loop is the
                    # spotter's hottest.)
                    need = max(1, (len(surface) + 1) // 2)
                    for entry in entries:
                        if entry.variant != surface and sum(map(operator.eq, surface, entry.variant)) >= need:
                            found.append(_Candidate(start, end + 1, entry, "homophone"))
                end += 1
                if end == n:
                    break
                frontier = [child for node in frontier for r in readings[end] if (child := node.children.get(r))]
        return found

    def _plausible_error(self, text: str, candidate: _Candidate, starts: set[int], ends: set[int]) -> bool:
        """Whether a sound-alike is plausibly the recognizer's error for the variant: it stands as words of its
        own (烧三 in 发烧三十八 does not) and is not a far more common word (不是 is not 不适 misheard)."""
        aligned = (candidate.start in starts) + (candidate.end in ends)
        # Two-character sound-alikes must stand as a word; longer ones may lean on a neighbour at one end
        # (凶口痛 in 凶口痛痛到下巴: the recognizer's error need not fall on jieba's boundaries).
        if aligned < (2 if candidate.end - candidate.start < 3 else 1):
            return False
        surface = text[candidate.start : candidate.end]
        said = self._frequency.get(surface) or 0
        meant = self._frequency.get(candidate.entry.variant) or 1
        return said <= COMMON_WORD_RATIO * meant

    @staticmethod
    def _choose(text: str, candidates: list[_Candidate]) -> list[_Candidate]:
        """Longest first, exact before sound-alike, per category without overlaps; excluded contexts dropped."""
        chosen: list[_Candidate] = []
        taken: dict[str, list[tuple[int, int]]] = {}
        for candidate in sorted(candidates, key=_Candidate.key):
            term = candidate.entry.term
            if any(_covers(text, context, candidate.start, candidate.end) for context in term.exclude):
                continue
            spans = taken.setdefault(term.category, [])
            if any(candidate.start < e and s < candidate.end for s, e in spans):
                continue
            spans.append((candidate.start, candidate.end))
            chosen.append(candidate)
        chosen.sort(key=lambda c: (c.start, c.end, c.entry.term.category))
        return chosen

    def _markers(self, text: str, starts: set[int], ends: set[int]) -> list[_Marker]:
        """Marker words that stand as words: they start at a token boundary, and a single character is a
        token of its own (不 in 不停 or 不行 is no negation)."""
        found: list[_Marker] = []
        hits = sorted((end + 1 - len(word), end + 1, word) for end, word in _occurrences(self._marker_automaton, text))
        for start, end, word in hits:
            if start not in starts or (len(word) == 1 and end not in ends):
                continue
            found.extend(_Marker(kind, word, start, end) for kind in self._marker_kinds[word])
        for match in _TIME_AGO.finditer(text):  # 三年前, 两个月前
            found.append(_Marker("history_before", match.group(), match.start(), match.end()))
        return found

    # -- scope -------------------------------------------------------------------------------------------------

    def _scope(
        self,
        norm: Normalised,
        candidate: _Candidate,
        chosen: list[_Candidate],
        markers: list[_Marker],
        clause_starts: list[int],
    ) -> tuple[Rule, str]:
        term = candidate.entry.term
        text = norm.text
        third_party = next((m for m in markers if m.kind == "third_party" and m.end <= candidate.start), None)
        if term.category not in SCOPED_CATEGORIES:
            return "affirmed", ""
        clause_start = max(s for s in clause_starts if s <= candidate.start)
        following = [s for s in (*clause_starts, *sorted(norm.breaks)) if s > candidate.start]
        clause_end = min(following, default=len(text))
        # Marker words inside another clinical term are part of that term (不 in 不适); inside a question or a
        # drug name they still speak (是什么 in 是什么病 makes 主动脉夹层 a topic).
        other_spans = [
            (c.start, c.end) for c in chosen if c is not candidate and c.entry.term.category in SCOPED_CATEGORIES
        ]

        def inside_other(marker: _Marker) -> bool:
            return any(s <= marker.start and marker.end <= e for s, e in other_spans) or (
                candidate.start <= marker.start < candidate.end
            )

        before = [m for m in markers if clause_start <= m.start and m.end <= candidate.start and not inside_other(m)]
        after = [
            m
            for m in markers
            if candidate.end <= m.start < min(clause_end, candidate.end + AFTER_WINDOW) and not inside_other(m)
        ]
        uncertain = [m for m in before if m.kind == "uncertainty"]
        uncertain_spans = [(m.start, m.end) for m in uncertain]

        # Negation: the nearest negator before the term, within the window, not part of an uncertainty
        # (不知道), with no third party in between (不是我 是我爸昏迷了), and not separated by another term unless
        # a coordinator joins them (没有胸痛和呼吸困难) or neither is critical.
        negators = [
            m
            for m in before
            if m.kind == "negation"
            and candidate.start - m.end <= NEGATION_WINDOW
            and not any(s <= m.start and m.end <= e for s, e in uncertain_spans)
        ]
        if negators:
            negator = max(negators, key=lambda m: (m.end, m.end - m.start))
            between_party = any(
                m.kind == "third_party" and negator.end <= m.start and m.end <= candidate.start for m in markers
            )
            blocked = between_party or self._separated(text, negator, candidate, chosen, markers)
            if not blocked:
                return "negated", f"negation: {negator.word} → {text[candidate.start : candidate.end]}"
        # A hypothetical (如果, 万一, 怕) holds to the end of its sentence: a scope breaker after it (如果老人突然
        # 晕倒了) starts no new report, nor does the consequent after a comma (万一喘不上气了，是打120还是…).
        punct_start = max((b for b in (0, *norm.sentences) if b <= candidate.start), default=0)
        hypothetical_before = [
            m
            for m in markers
            if m.kind == "hypothetical_before" and punct_start <= m.start and m.end <= candidate.start
            and not inside_other(m)
        ]  # fmt: skip
        scoped: tuple[tuple[str, Rule], ...] = (("history", "history"), ("hypothetical", "hypothetical"))
        for kind, rule in scoped:
            marker = next((m for m in before if m.kind == f"{kind}_before"), None)
            if marker is None and kind == "hypothetical":
                marker = next(iter(hypothetical_before), None)
            if marker is None:
                marker = next((m for m in after if m.kind == f"{kind}_after" and self._adjacent(m, candidate)), None)
            if marker is None and kind == "hypothetical":
                marker = next(
                    (m for m in before if m.kind == "hypothetical_adjacent" and m.end == candidate.start), None
                )
            if marker is not None:
                return rule, f"{rule}: {marker.word} + {text[candidate.start : candidate.end]}"
        # At once, or after one 的 (心梗的前兆, 中风的表现): a report about the condition, not of it.
        topic = next(
            (
                m
                for m in after
                if m.kind == "topic_after"
                and (m.start == candidate.end or (m.start == candidate.end + 1 and text[candidate.end] == "的"))
            ),
            None,
        )
        if topic is None:
            topic = self._coordinated_topic(text, candidate, chosen, markers)
        if topic is None:
            topic = next((m for m in before if m.kind == "topic_before"), None)
        if topic is not None:
            return "topic", f"topic: {text[candidate.start : candidate.end]}{topic.word}"
        resolved = next(
            (m for m in markers if m.kind == "resolved_after" and m.start >= candidate.end and not inside_other(m)),
            None,
        )
        if resolved is not None and not any(
            c.entry.term.category == term.category and c.start >= resolved.end for c in chosen
        ):
            return "history", f"history: {text[candidate.start : candidate.end]} … {resolved.word}"
        if uncertain and term.category == "emergency":
            return "uncertain", f"uncertain: {uncertain[-1].word} {text[candidate.start : candidate.end]}"
        if third_party is not None and term.category == "emergency":
            return "third_party", f"third party: {third_party.word}"
        return "affirmed", ""

    @staticmethod
    def _coordinated_topic(
        text: str, candidate: _Candidate, chosen: list[_Candidate], markers: list[_Marker]
    ) -> _Marker | None:
        """A topic marker after a coordinated term covers this one too (中暑和热射病有什么区别)."""
        after = text[candidate.end : candidate.end + 1]
        if after in ("和", "跟", "与", "或"):
            # X和Y有什么区别 where Y is no lexicon term (中暑和感冒有什么区别): the marker within a few words.
            chain = next(
                (m for m in markers if m.kind == "topic_after" and candidate.end + 1 < m.start <= candidate.end + 6),
                None,
            )
            if chain is not None:
                return chain
        for other in chosen:
            if other.start <= candidate.end or other.start - candidate.end > 2:
                continue
            joined = any(
                m.kind == "coordinators" and m.start == candidate.end and m.end == other.start for m in markers
            ) or text[candidate.end : other.start] in ("和", "跟", "与", "或", "还是")
            if joined:
                return next((m for m in markers if m.kind == "topic_after" and m.start == other.end), None)
        return None

    @staticmethod
    def _adjacent(marker: _Marker, candidate: _Candidate) -> bool:
        """A marker after the term belongs to it when it follows at once or after 了 (中风过, 中风了的话)."""
        return marker.start == candidate.end or (marker.start == candidate.end + 1 and marker.word != "过")

    def _separated(
        self, text: str, negator: _Marker, candidate: _Candidate, chosen: list[_Candidate], markers: list[_Marker]
    ) -> bool:
        """Whether another term stands between the negator and this one without a coordinator joining them."""
        for other in chosen:
            if other is candidate or not (negator.end <= other.start and other.end <= candidate.start):
                continue
            gap = text[other.end : candidate.start]
            joined = any(
                m.kind == "coordinators" and other.end <= m.start and m.end <= candidate.start for m in markers
            )
            if gap and not joined:
                return True
            if not gap and "critical" in (candidate.entry.term.severity, other.entry.term.severity):
                return True
        return False


_CUE_DENIAL = re.compile(r"没有|没|不(?!退|停|断|住|下)|未|无|如果|万一|要是|假如|假设")


def _cue_denied(text: str, match: re.Match[str]) -> bool:
    """A co-occurrence pattern names its second finding ``(?P<cue>…)`` (摔到头 … 吐): a negation or a hypothetical
    in the few characters before it (磕到头了，没吐; 也没有吃抗凝药; 如果突然流血) denies the finding, so the
    pattern does not apply."""
    if "cue" not in match.re.groupindex or match.start("cue") < 0:
        return False
    before = text[max(match.start(), match.start("cue") - 4) : match.start("cue")]
    return _CUE_DENIAL.search(before) is not None


def _covers(text: str, context: str, start: int, end: int) -> bool:
    """Whether an occurrence of ``context`` in ``text`` overlaps ``[start, end)``."""
    position = text.find(context, max(0, start - len(context) + 1))
    while position != -1 and position < end:
        if position + len(context) > start:
            return True
        position = text.find(context, position + 1)
    return False
