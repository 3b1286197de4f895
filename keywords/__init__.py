"""Chinese keyword spotting for the hotline: lexicon, spotter (negation, history, homophones), classifier.

Sans-I/O and deterministic: ``Classifier(load_lexicon()).classify("我爸胸口疼得厉害喘不上气")`` gives a
:class:`Classification` with the consult category, the emergency flag and the matches that explain them.
"""

from keywords.classifier import Classifier, decide
from keywords.lexicon import (
    CATEGORIES,
    DEFAULT_LEXICON_DIR,
    Category,
    Lexicon,
    LexiconError,
    LexiconProblem,
    Markers,
    Severity,
    Term,
    load_lexicon,
    scan_lexicon,
)
from keywords.registry import LexiconRegistry
from keywords.spotter import Classification, Match, Spotter, normalise

__all__ = [
    "CATEGORIES",
    "DEFAULT_LEXICON_DIR",
    "Category",
    "Classification",
    "Classifier",
    "Lexicon",
    "LexiconError",
    "LexiconProblem",
    "LexiconRegistry",
    "Markers",
    "Match",
    "Severity",
    "Spotter",
    "Term",
    "decide",
    "load_lexicon",
    "normalise",
    "scan_lexicon",
]
