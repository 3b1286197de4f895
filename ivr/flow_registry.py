"""Versioned flows with hot reload: administrators' edits reach new calls without a restart.

A call takes a snapshot (``current``) when it starts and keeps it to the end, so an edit never changes a
call in progress. A change that fails validation is rejected with its problems and the last good version of
that flow keeps serving; nothing about a bad edit can take the hotline down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import structlog

from ground.files import directory_fingerprint
from ivr.flow_loader import FlowProblem, LoadedFlow, load_flows_lenient

log = structlog.get_logger(__name__)


@dataclass
class FlowRegistry:
    directory: Path
    _current: Mapping[str, LoadedFlow] = field(default_factory=dict, init=False)
    _seen: tuple[tuple[str, int, int], ...] | None = field(default=None, init=False)

    @property
    def current(self) -> Mapping[str, LoadedFlow]:
        """An immutable snapshot: what a call starting now runs on, to its end."""
        return self._current

    def refresh(self) -> list[FlowProblem] | None:
        """Reload if any flow file changed. Returns the problems found (empty: all good), None if unchanged."""
        seen = directory_fingerprint(self.directory)
        if seen == self._seen:
            return None
        self._seen = seen
        flows, problems = load_flows_lenient(self.directory, dict(self._current))
        changed = {name for name, loaded in flows.items() if self._current.get(name) != loaded}
        self._current = MappingProxyType(dict(flows))
        for problem in problems:
            log.error("flows.rejected", problem=str(problem))
        for name in sorted(changed):
            log.info("flows.loaded", flow=name, version=flows[name].version)
        return problems
