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

from ground.files import directory_fingerprint
from ground.logs import get_logger
from ivr.flow_graph import check_subflows
from ivr.flow_loader import FlowProblem, LoadedFlow, load_flow_text, load_flows_lenient

log = get_logger(__name__)


@dataclass
class FlowRegistry:
    directory: Path
    _current: Mapping[str, LoadedFlow] = field(default_factory=dict, init=False)
    _seen: tuple[tuple[str, int, int], ...] | None = field(default=None, init=False)
    # Flows that are not files (surge mode's entry flow), validated like files, kept across reloads.
    _overlay: Mapping[str, LoadedFlow] = field(default_factory=dict, init=False)
    _files: Mapping[str, LoadedFlow] = field(default_factory=dict, init=False)

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
        flows, problems = load_flows_lenient(self.directory, dict(self._files))
        self._files = dict(flows)
        problems += self._overlay_problems(self._overlay)
        flows = {**flows, **self._overlay}
        changed = {name for name, loaded in flows.items() if self._current.get(name) != loaded}
        self._current = MappingProxyType(flows)
        for problem in problems:
            log.error("flows.rejected", problem=str(problem))
        for name in sorted(changed):
            log.info("flows.loaded", flow=name, version=flows[name].version)
        return problems

    def set_overlay(self, texts: Mapping[str, str]) -> list[FlowProblem]:
        """Serve these flows (name → YAML text) beside the files, from the next call on; an empty mapping removes
        them. Each is checked like a file, its subflows against the files; with any problem nothing changes and
        the problems are returned (the hotline keeps serving what it served)."""
        overlay: dict[str, LoadedFlow] = {}
        problems: list[FlowProblem] = []
        for name, text in texts.items():
            loaded, found = load_flow_text(text, Path(f"<{name}>"))
            problems += found
            if loaded is None:
                continue
            if loaded.flow.flow != name:
                problems.append(loaded.source_map.problem(("flow",), f"expected the flow to be named {name!r}"))
            elif name in self._files:
                problems.append(loaded.source_map.problem(("flow",), f"a flow file already uses the name {name!r}"))
            else:
                overlay[name] = loaded
        problems += self._overlay_problems(overlay)
        if problems:
            for problem in problems:
                log.error("flows.overlay_rejected", problem=str(problem))
            return problems
        self._overlay = overlay
        self._current = MappingProxyType({**self._files, **overlay})
        log.info("flows.overlay", flows=sorted(overlay))
        return []

    def _overlay_problems(self, overlay: Mapping[str, LoadedFlow]) -> list[FlowProblem]:
        if not overlay:
            return []
        every = {**self._files, **overlay}
        return [p for p in check_subflows(every) if any(p.path == o.path for o in overlay.values())]
