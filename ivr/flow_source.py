"""Where things are in a flow file: problems with ``file:line:column``, and the map from node paths to places.

Shared by the loader (YAML and schema errors) and the graph checks (``ivr.flow_graph``), which both report
:class:`FlowProblem` values pointing at the offending key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ivr.flow_model import Flow

PathKey = tuple[str, ...]


@dataclass(frozen=True, order=True)
class FlowProblem:
    """One thing wrong with a flow file, e.g. ``dialplans/hotline.yaml:12:5: nodes.menu.choices.1: ...``.

    ``line`` and ``column`` count from 1; 0 means the place is unknown (an unreadable file, say). ``where``
    is the dotted path of the offending key, empty for the file as a whole.
    """

    path: Path
    line: int
    column: int
    where: str
    message: str

    def __str__(self) -> str:
        place = f"{self.path}:{self.line}:{self.column}" if self.line else str(self.path)
        return f"{place}: {self.where}: {self.message}" if self.where else f"{place}: {self.message}"


def dotted(path: Iterable[object]) -> str:
    return ".".join(str(part) for part in path)


@dataclass(frozen=True)
class SourceMap:
    """Positions (1-based line, column) of every mapping key and sequence item of a YAML document.

    Keys are paths of strings: ``("nodes", "menu", "choices", "1")``; list indexes are written as digits.
    """

    path: Path
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Iterable[object]) -> tuple[int, int]:
        """The place of ``path``, or of its nearest ancestor that exists in the file (a missing key)."""
        key = tuple(str(part) for part in path)
        while key:
            if key in self.positions:
                return self.positions[key]
            key = key[:-1]
        return self.positions.get((), (1, 1))

    def problem(self, path: Iterable[object], message: str) -> FlowProblem:
        parts = tuple(str(part) for part in path)
        line, column = self.position(parts)
        return FlowProblem(self.path, line, column, dotted(parts), message)


@dataclass(frozen=True)
class LoadedFlow:
    flow: Flow
    path: Path
    # Content hash: the call record stores it so a call can be tied to the exact flow text it ran.
    version: str
    source: SourceMap | None = field(default=None, compare=False, repr=False)

    @property
    def source_map(self) -> SourceMap:
        return self.source if self.source is not None else SourceMap(self.path)
