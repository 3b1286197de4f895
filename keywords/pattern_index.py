"""Which characters a match of a lexicon pattern must contain: the spotter runs a pattern only on utterances that
hold them.

A pattern such as ``(胸口|心口).{0,4}(痛|疼)`` cannot match an utterance without 胸 or 心, nor one without 痛 or
疼. :func:`required_chars` reads the pattern with the standard library's own regular-expression parser and
returns those conditions, one set of characters each ("at least one of these"). They are necessary, never
sufficient: the pattern still runs wherever they hold, so skipping it elsewhere changes no match.
:func:`index_chars` picks the condition whose characters are rarest in Chinese (by jieba's dictionary counts, not
by any labelled set), so that few patterns are run per utterance. Before this, patterns were indexed by their
first characters, and a third of them started with a common one (一, 不, 头).

The parser is ``re._parser`` (private, but the one ``re.compile`` uses; it is ``sre_parse`` before Python 3.11).
Anything it yields that is not understood here adds no condition, so the worst case is running a pattern that
could have been skipped.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["index_chars", "required_chars"]

Requirement = frozenset[str]

# Imported by name: the module has no type stubs, and its public alias ``sre_parse`` warns that it is deprecated.
sre: Any = importlib.import_module("re._parser")


def required_chars(pattern: re.Pattern[str]) -> list[Requirement]:
    """Sets of characters of which every match of ``pattern`` contains at least one each (none when unknown)."""
    if pattern.flags & re.IGNORECASE:
        return []  # a case-folded match need not hold the characters as written
    try:
        parsed = sre.parse(pattern.pattern, pattern.flags)
    except (re.error, TypeError, ValueError):  # pragma: no cover - compiled patterns parse
        return []
    return _sequence(list(parsed))


def index_chars(requirements: Sequence[Requirement], commonness: Callable[[str], int]) -> Requirement | None:
    """The requirement whose characters are together least common (None when there is none)."""
    if not requirements:
        return None
    return min(requirements, key=lambda chars: (sum(commonness(c) for c in chars), len(chars), sorted(chars)))


def _sequence(items: Sequence[tuple[Any, Any]]) -> list[Requirement]:
    found: list[Requirement] = []
    for op, av in items:
        found.extend(_item(op, av))
    return found


def _item(op: Any, av: Any) -> list[Requirement]:
    if op is sre.LITERAL:
        return [frozenset(chr(av))]
    if op is sre.SUBPATTERN:
        _group, add_flags, _del_flags, sub = av
        return [] if add_flags & re.IGNORECASE else _sequence(list(sub))
    if op is sre.ATOMIC_GROUP:
        return _sequence(list(av))
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        low, _high, sub = av
        return _sequence(list(sub)) if low >= 1 else []
    if op is sre.BRANCH:
        _, alternatives = av
        options = [_sequence(list(alternative)) for alternative in alternatives]
        if not all(options):
            return []  # an alternative that needs nothing: the branch needs nothing
        # One condition per alternative, the smallest: a match holds one of them.
        return [frozenset().union(*(min(option, key=len) for option in options))]
    if op is sre.IN:
        if av and all(kind is sre.LITERAL for kind, _ in av):
            return [frozenset(chr(value) for _, value in av)]
        return []  # a negated set, a range or a category: no condition
    return []  # ANY, AT, assertions, back-references: zero-width or unknown, no condition
