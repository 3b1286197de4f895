"""Where things are in a flow file: problems with ``file:line:column``, and the map from node paths to places.

Shared by the loader (YAML and schema errors) and the graph checks (``ivr.flow_graph``), which both report
:class:`FlowProblem` values pointing at the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ground.yaml_source import PathKey, SourceMap, SourceProblem, dotted
from ivr.flow_model import Flow

# A flow file's problems are the shared source problems; the name stays for readers of the flow code.
FlowProblem = SourceProblem

__all__ = ["FlowProblem", "LoadedFlow", "PathKey", "SourceMap", "dotted"]


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
