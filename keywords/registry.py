"""The lexicon with hot reload, like the flows: an administrator's edit reaches new calls without a restart.

A change that fails validation is rejected with its problems (logged) and the last good classifier keeps
serving. Building a classifier takes a while (jieba's dictionary plus the lexicon's user words), so callers
refresh from a housekeeping task, never per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ground.files import directory_fingerprint
from ground.logs import get_logger
from keywords.classifier import Classifier
from keywords.lexicon import DEFAULT_LEXICON_DIR, LexiconProblem, scan_lexicon

__all__ = ["LexiconRegistry"]

log = get_logger(__name__)


@dataclass
class LexiconRegistry:
    directory: Path = DEFAULT_LEXICON_DIR
    _current: Classifier | None = field(default=None, init=False)
    _seen: tuple[tuple[str, int, int], ...] | None = field(default=None, init=False)

    @property
    def current(self) -> Classifier | None:
        """The classifier of the last good lexicon (None before the first good load)."""
        return self._current

    def refresh(self) -> list[LexiconProblem] | None:
        """Reload if a lexicon file changed. Returns the problems (empty: loaded), None when nothing changed."""
        seen = directory_fingerprint(self.directory)
        if seen == self._seen:
            return None
        self._seen = seen
        report = scan_lexicon([self.directory])
        if report.lexicon is None:
            for problem in report.problems:
                log.error("keywords.lexicon_rejected", problem=str(problem))
            return report.problems
        if self._current is None or self._current.version != report.lexicon.version:
            self._current = Classifier(report.lexicon)
            log.info("keywords.lexicon_loaded", version=report.lexicon.version, terms=len(report.lexicon.terms))
        return []
