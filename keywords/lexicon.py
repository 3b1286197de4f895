"""The keyword lexicon: terms, their variants and the scope markers, in YAML files administrators edit.

Files live in ``keywords/lexicon/*.yaml`` (``DEFAULT_LEXICON_DIR``). Each file holds ``terms`` (a list) and/or
``markers`` (lists of words for negation, history, hypotheticals, third parties, scope breakers ...)::

    terms:
      - term: 中风                      # the canonical term, reported in explanations
        category: emergency             # one of the seven consult categories
        severity: critical              # critical | high | normal
        variants: [脑中风, 嘴歪, 说话不清] # colloquial variants, matched like the term itself
        pinyin: {中风: zhong feng}      # optional: toneless pinyin for a term or variant (polyphonic characters)
        exclude: [中风险]               # optional: contexts in which a match does not count
        patterns: ['(一侧|半边)(手|脚)+没劲'] # optional: regular expressions over the text without spaces/punctuation
        homophones: true                # optional (default true): also match sound-alike ASR errors
        symptom: false                  # optional: a symptom (urgent tier; an adverse reaction after an exposure)

Emergency terms are **triage discriminators** (docs/triage.md): each names its ``discriminator`` id and the
``source`` (the triage scale it comes from), is a ``strong`` red flag (alone an emergency) or a ``weak`` cue
(alone the IVR asks the caller once; two weak cues, or one with a population modifier, are an emergency), and
besides variants and patterns may hold ``clauses``, a small grammar: a body part or function and a failure or
severity predicate within one clause::

      - term: 呼吸停止
        category: emergency
        severity: critical
        discriminator: not_breathing
        source: MTS inadequate breathing; CN-ED level 1
        clauses:
          - subject: [呼吸, 气, 心跳]
            predicate: [停了, 没了, 断了]
            gap: 3                      # at most this many characters between them (default 4)
            order: subject_first        # subject_first (default) | predicate_first | either

A symptom term with ``population: true`` is a red flag when the caller names a population modifier
(``markers.population``: an infant, a pregnant woman, chemotherapy, anticoagulants …).

Loading is strict like the flows: a safe YAML loader that rejects duplicate keys and remembers where every key
is, a pydantic schema, and cross-file checks (a variant claimed by two terms). Every problem is reported at
once, each naming ``file:line:column`` and the term path (``terms.3.severity``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ground.errors import MedhotlineError
from ground.yaml_source import SourceMap, SourceProblem, parse_yaml
from keywords.triage_model import MODEL_FILE, TriageModel, TriageModelError, parse_triage_model
from telephony.consult import CONSULT_CATEGORIES, ConsultCategory

__all__ = [
    "CATEGORIES",
    "DEFAULT_LEXICON_DIR",
    "Category",
    "Clause",
    "Cue",
    "Lexicon",
    "LexiconError",
    "LexiconProblem",
    "LexiconReport",
    "Markers",
    "Severity",
    "Term",
    "load_lexicon",
    "scan_lexicon",
]

DEFAULT_LEXICON_DIR = Path(__file__).resolve().parent / "lexicon"

# The consult categories are the flows' own: a category the spotter can produce is one a flow can route on.
Category = ConsultCategory
CATEGORIES: tuple[Category, ...] = CONSULT_CATEGORIES
Severity = Literal["critical", "high", "normal"]
Cue = Literal["strong", "weak"]
ClauseOrder = Literal["subject_first", "predicate_first", "either"]
_DISCRIMINATOR_ID = re.compile(r"^[a-z][a-z0-9_]*$")

_SYLLABLE = re.compile(r"^[a-z]+$")
_SPACE = re.compile(r"\s+")


def _clean_words(values: Sequence[str], what: str) -> tuple[str, ...]:
    words: list[str] = []
    for value in values:
        word = _SPACE.sub("", value)
        if not word:
            raise ValueError(f"{what} must not be empty")
        if word not in words:
            words.append(word)
    return tuple(words)


class Clause(BaseModel):
    """A small grammar: a ``subject`` (body part, function, substance) and a ``predicate`` (failure, severity,
    exposure) within one clause, at most ``gap`` characters apart, in the given order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: tuple[str, ...] = Field(min_length=1)
    predicate: tuple[str, ...] = Field(min_length=1)
    gap: int = Field(default=4, ge=0, le=12)
    order: ClauseOrder = "subject_first"

    @field_validator("subject", "predicate")
    @classmethod
    def _words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _clean_words(value, "a clause word")


class Term(BaseModel):
    """One lexicon entry: a canonical term and the ways callers (and the recognizer) say it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    term: str = Field(min_length=1)
    category: Category
    severity: Severity
    variants: tuple[str, ...] | None = None
    pinyin: dict[str, str] | None = None
    exclude: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    homophones: bool = True
    symptom: bool = False
    discriminator: str = ""
    source: str = ""
    cue: Cue = "strong"
    clauses: tuple[Clause, ...] = ()
    population: bool = False

    @field_validator("term")
    @classmethod
    def _term(cls, value: str) -> str:
        term = _SPACE.sub("", value)
        if not term:
            raise ValueError("term must not be empty")
        return term

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("variants is empty: list at least one variant or leave the key out")
        return _clean_words(value, "a variant")

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _clean_words(value, "an exclude context")

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
            if compiled.match(""):
                raise ValueError(f"pattern {pattern!r} matches empty text")
        return value

    @model_validator(mode="after")
    def _check_triage(self) -> Term:
        if self.category == "emergency":
            if not self.discriminator:
                raise ValueError("an emergency term needs its `discriminator` (an id from docs/triage.md)")
            if not _DISCRIMINATOR_ID.match(self.discriminator):
                raise ValueError(f"discriminator {self.discriminator!r} is not an id (lower case, digits, _)")
        elif self.discriminator or self.cue != "strong" or self.clauses:
            raise ValueError("`discriminator`, `cue` and `clauses` belong to emergency terms only")
        if self.population and not self.symptom:
            raise ValueError("`population: true` is for symptom terms (`symptom: true`)")
        return self

    @model_validator(mode="after")
    def _check_pinyin(self) -> Term:
        for surface, reading in (self.pinyin or {}).items():
            if surface not in self.surfaces:
                raise ValueError(f"pinyin is given for {surface!r}, which is neither the term nor one of its variants")
            syllables = reading.split()
            if len(syllables) != len(surface):
                raise ValueError(
                    f"pinyin {reading!r} for {surface!r} has {len(syllables)} syllables for {len(surface)} characters"
                )
            bad = [s for s in syllables if not _SYLLABLE.match(s)]
            if bad:
                raise ValueError(f"pinyin {reading!r}: {bad[0]!r} is not toneless pinyin (letters a-z, ü as v)")
        return self

    @property
    def surfaces(self) -> tuple[str, ...]:
        """The term and its variants, each once, term first."""
        return (self.term, *(v for v in self.variants or () if v != self.term))


class Markers(BaseModel):
    """Words that put a term in or out of scope. Lists from several files are merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Before a term in the same clause: the term is denied (没有, 不, 并非 ...).
    negation: tuple[str, ...] = ()
    # Look like a negation but are not one (不知道, 不确定): a caller unsure of a stroke is an emergency.
    uncertainty: tuple[str, ...] = ()
    # Before a term in the same clause: the past (以前, 去年 ...); after it: 过, 已经好了, 以后 ...
    history_before: tuple[str, ...] = ()
    history_after: tuple[str, ...] = ()
    # Before a term in the same clause: 如果, 万一, 预防 ...; after it: 的话.
    hypothetical_before: tuple[str, ...] = ()
    hypothetical_after: tuple[str, ...] = ()
    # Right before a term: a future (会抽风, 担心会中风).
    hypothetical_adjacent: tuple[str, ...] = ()
    # Right after a term: the term is a topic, not an event (中风的药, 中风后遗症, 心梗的症状).
    topic_after: tuple[str, ...] = ()
    # Before a term in its clause: a question about it (什么是过敏性休克).
    topic_before: tuple[str, ...] = ()
    # Anywhere after a term, with no other such term after it: it is over (胸口疼了一下，今天已经完全好了).
    resolved_after: tuple[str, ...] = ()
    # Someone else is the patient (我爸, 孩子, 同事): a report about them is as urgent as one's own.
    third_party: tuple[str, ...] = ()
    # Start a new clause where ASR left out the punctuation (但是, 现在, 突然, 刚才).
    scope_breakers: tuple[str, ...] = ()
    # Carry a negation over to the next term (和, 或者, 也).
    coordinators: tuple[str, ...] = ()
    # Between an exposure (a vaccine, a drug) and a symptom: the symptom came after it (了, 完, 后).
    exposure_after: tuple[str, ...] = ()
    # Population modifiers that raise a weak cue to a red flag (新生儿, 孕妇, 华法林, 糖尿病).
    population: tuple[str, ...] = ()
    # The few in which a `population: true` symptom (fever) alone is a red flag (新生儿, 化疗, 透析).
    symptom_risk: tuple[str, ...] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return _clean_words(value, "a marker")
        return value

    def merged(self, other: Markers) -> Markers:
        data = {
            name: tuple(dict.fromkeys((*getattr(self, name), *getattr(other, name))))
            for name in type(self).model_fields
        }
        return Markers.model_validate(data)

    def words(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w for name in type(self).model_fields for w in getattr(self, name)))


class LexiconFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    terms: tuple[Term, ...] = ()
    markers: Markers = Field(default_factory=Markers)
    # A medical character and the characters a recognizer writes for it (血: [雪, 学]): a single-character word
    # of the utterance that is one of them is also read as the medical character (流雪 → 流血, 头云 → 头晕).
    sound_alikes: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("sound_alikes")
    @classmethod
    def _sound_alikes(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for target, heard in value.items():
            for char in (target, *heard):
                if len(char) != 1 or not ("\u4e00" <= char <= "\u9fff"):
                    raise ValueError(f"{char!r} is not one Chinese character (sound_alikes.{target})")
            if target in heard:
                raise ValueError(f"{target!r} is listed as its own sound-alike")
        return value


# A lexicon file's problems are the shared source problems (``file:line:column: path: message``).
LexiconProblem = SourceProblem


class LexiconError(MedhotlineError):
    """The lexicon is unusable; ``problems`` lists every problem with its place."""

    def __init__(self, problems: Sequence[LexiconProblem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} in the keyword lexicon:\n  "
            + "\n  ".join(str(p) for p in self.problems)
        )


@dataclass(frozen=True)
class Lexicon:
    """A validated lexicon. ``version`` is a hash of the files' names and contents (which lexicon decided)."""

    terms: tuple[Term, ...]
    markers: Markers
    version: str
    files: tuple[Path, ...] = ()
    # Heard character → the medical character it stands for (see ``LexiconFile.sound_alikes``).
    sound_alikes: Mapping[str, str] = field(default_factory=dict)
    # The learned second opinion (keywords/triage_model.py), when the directory holds one: part of the version.
    model: TriageModel | None = None

    @classmethod
    def from_terms(
        cls, terms: Iterable[Term], markers: Markers | None = None, sound_alikes: Mapping[str, str] | None = None
    ) -> Lexicon:
        """A lexicon built in code (tests); its version hashes the terms, markers and sound-alikes."""
        terms = tuple(terms)
        markers = markers or Markers()
        digest = hashlib.sha256()
        for term in terms:
            digest.update(term.model_dump_json().encode())
        digest.update(markers.model_dump_json().encode())
        digest.update(repr(sorted((sound_alikes or {}).items())).encode())
        return cls(terms, markers, digest.hexdigest()[:12], (), dict(sound_alikes or {}))


@dataclass
class LexiconReport:
    lexicon: Lexicon | None
    problems: list[LexiconProblem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@dataclass
class _Parsed:
    path: Path
    data: LexiconFile | None
    source: SourceMap
    problems: list[LexiconProblem]
    text: bytes = b""

    def problem(self, path: tuple[str, ...], message: str) -> LexiconProblem:
        return self.source.problem(path, message)


def _parse_file(path: Path) -> _Parsed:
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        return _Parsed(
            path, None, SourceMap(path), [LexiconProblem(path, 0, 0, "", f"cannot read: {exc.strerror or exc}")]
        )
    except UnicodeDecodeError as exc:
        return _Parsed(path, None, SourceMap(path), [LexiconProblem(path, 0, 0, "", f"not UTF-8 (byte {exc.start})")])
    data, source, problems = parse_yaml(text, path)
    if data is None and problems:
        return _Parsed(path, None, source, problems)
    parsed = _Parsed(path, None, source, list(problems), raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        parsed.problems.append(parsed.problem((), "a lexicon file must be a mapping with `terms` and/or `markers`"))
        return parsed
    try:
        parsed.data = LexiconFile.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "missing":
                message = f"missing required key `{loc[-1]}`"
                loc = loc[:-1]
            elif error["type"] == "extra_forbidden":
                message = f"unknown key `{loc[-1]}`"
            elif error["type"] == "literal_error":
                message = f"{message} (got {error.get('input')!r})"
            parsed.problems.append(parsed.problem(loc, message))
    return parsed


def _model(paths: Sequence[Path]) -> tuple[Path | None, bytes, TriageModel | None, list[LexiconProblem]]:
    """The triage model of the first directory in ``paths`` that holds one (its path, bytes and parse)."""
    for path in paths:
        candidate = path / MODEL_FILE
        if path.is_dir() and candidate.is_file():
            try:
                data = candidate.read_bytes()
                return candidate, data, parse_triage_model(candidate, data), []
            except OSError as exc:
                return candidate, b"", None, [LexiconProblem(candidate, 0, 0, "", f"cannot read: {exc.strerror}")]
            except TriageModelError as exc:
                message = str(exc).removeprefix(f"{candidate}: ")
                return candidate, b"", None, [LexiconProblem(candidate, 0, 0, "", message)]
    return None, b"", None, []


def _lexicon_files(paths: Sequence[Path]) -> tuple[list[Path], list[LexiconProblem]]:
    files: list[Path] = []
    problems: list[LexiconProblem] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.yaml") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            problems.append(LexiconProblem(path, 0, 0, "", "no such file or directory"))
    return files, problems


def scan_lexicon(paths: Sequence[Path] | Path = DEFAULT_LEXICON_DIR) -> LexiconReport:
    """Load and check lexicon files or directories; the report has every problem, and the lexicon if none."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    files, problems = _lexicon_files(paths)
    model_path, model_bytes, model, model_problems = _model(paths)
    problems.extend(model_problems)
    parsed = [_parse_file(path) for path in files]
    for item in parsed:
        problems.extend(item.problems)
    # Cross-file: each surface form (term or variant) belongs to one term.
    owner: dict[str, tuple[str, _Parsed, int]] = {}
    defined: dict[str, tuple[_Parsed, int]] = {}
    for item in parsed:
        if item.data is None:
            continue
        for index, term in enumerate(item.data.terms):
            if term.term in defined:
                first_file, first_index = defined[term.term]
                line, _ = first_file.source.position(("terms", str(first_index)))
                problems.append(
                    item.problem(
                        ("terms", str(index), "term"),
                        f"term {term.term!r} is already defined ({first_file.path.name} line {line})",
                    )
                )
                continue
            defined[term.term] = (item, index)
            for surface in term.surfaces:
                if surface in owner and owner[surface][0] != term.term:
                    first_term, first_file, first_index = owner[surface]
                    line, _ = first_file.source.position(("terms", str(first_index)))
                    problems.append(
                        item.problem(
                            ("terms", str(index), "variants"),
                            f"{surface!r} is already a variant of {first_term!r} ({first_file.path.name} line {line})",
                        )
                    )
                else:
                    owner.setdefault(surface, (term.term, item, index))
    if not files and not problems:
        problems.append(LexiconProblem(paths[0] if paths else Path(), 0, 0, "", "no lexicon files (*.yaml)"))
    report = LexiconReport(None, sorted(problems), files)
    if report.problems:
        return report
    terms: dict[str, Term] = {}
    markers = Markers()
    digest = hashlib.sha256()
    heard: dict[str, str] = {}
    for item in parsed:
        assert item.data is not None
        for target, alikes in item.data.sound_alikes.items():
            for char in alikes:
                if heard.setdefault(char, target) != target:
                    report.problems.append(
                        item.problem(("sound_alikes", target), f"{char!r} already stands for {heard[char]!r}")
                    )
    if report.problems:
        return report
    for item in parsed:
        assert item.data is not None
        digest.update(item.path.name.encode() + b"\0" + item.text + b"\0")
        markers = markers.merged(item.data.markers)
        for term in item.data.terms:
            terms[term.term] = term
    if model_path is not None:
        digest.update(model_path.name.encode() + b"\0" + model_bytes + b"\0")
    report.lexicon = Lexicon(tuple(terms.values()), markers, digest.hexdigest()[:12], tuple(files), heard, model)
    return report


def load_lexicon(paths: Sequence[Path] | Path = DEFAULT_LEXICON_DIR) -> Lexicon:
    """The lexicon in ``paths`` (files or directories), or :class:`LexiconError` with every problem."""
    report = scan_lexicon(paths)
    if report.lexicon is None:
        raise LexiconError(report.problems)
    return report.lexicon
