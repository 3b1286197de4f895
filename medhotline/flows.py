"""``medhotline flows check|show|schema``: what administrators run on the flow files in ``dialplans/``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ivr.flow_graph import edges
from ivr.flow_loader import scan_paths
from ivr.flow_model import (
    TERMINAL_TYPES,
    Flow,
    MedicationConfirmNode,
    Node,
    RouteNode,
    SaveReadingsNode,
    SubflowNode,
    TransferNode,
    VaccinationBookNode,
    VerifyIdentityNode,
)
from ivr.flow_source import LoadedFlow

SCHEMA_FILE = "flow.schema.json"
SCHEMA_TITLE = "medhotline IVR flow"
SCHEMA_DESCRIPTION = (
    "One IVR flow of the medhotline patient hotline (a file in dialplans/). Generated from ivr/flow_model.py by "
    "`medhotline flows schema --write`; see docs/flows.md. Graph rules (undefined targets, unreachable nodes, dead "
    "ends, subflows) are checked by `medhotline flows check`, not by this schema."
)


def print_check(paths: Sequence[Path], sounds_dir: Path | None = None, out: TextIO | None = None) -> int:
    """Print every problem and a count (exit 1), or the checked flows and their versions (exit 0)."""
    out = out or sys.stdout
    report = scan_paths(paths, sounds_dir)
    if report.problems:
        for problem in report.problems:
            print(problem, file=out)
        count, files = len(report.problems), len({p.path for p in report.problems})
        print(f"{count} problem{'s' if count != 1 else ''} in {files} file{'s' if files != 1 else ''}", file=out)
        return 1
    if not report.files:
        print(f"no flow files (*.yaml) in {', '.join(str(p) for p in paths)}", file=out)
        return 1
    names = ", ".join(sorted(report.flows))
    versions = ", ".join(report.flows[n].version for n in sorted(report.flows))
    print(f"ok: {names} ({versions})", file=out)
    return 0


def print_show(flows_dir: Path, name: str, *, dot: bool = False, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = scan_paths([flows_dir])
    loaded = report.flows.get(name)
    if loaded is None:
        problems = [p for p in report.problems if _declares(p.path, name)]
        for problem in problems:
            print(problem, file=sys.stderr)
        known = ", ".join(sorted(report.flows)) or "none"
        print(f"medhotline: no valid flow named {name!r} in {flows_dir} (valid flows: {known})", file=sys.stderr)
        return 1
    print(render_dot(loaded.flow) if dot else render_text(loaded), file=out, end="")
    return 0


def _declares(path: Path, name: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return any(line.split("#")[0].strip() in (f"flow: {name}", f'flow: "{name}"') for line in text.splitlines())


def _abbreviate(text: str, width: int = 30) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _describe(node: Node) -> str:
    parts: list[str] = [node.type]
    if node.type in TERMINAL_TYPES:
        parts.append("(end)")
    if isinstance(node, RouteNode):
        parts.append(f"category={node.category} priority={node.effective_priority}")
    elif isinstance(node, TransferNode):
        parts.append(f"to={node.to}" + (f" trunk={node.trunk}" if node.trunk else ""))
    elif isinstance(node, SubflowNode):
        parts.append(f"flow={node.flow}")
    elif isinstance(node, VerifyIdentityNode | SaveReadingsNode):
        parts.append(f"vars={','.join(node.vars)}")
    elif isinstance(node, VaccinationBookNode):
        parts.append(f"day={node.day_var} slot={node.slot_var}")
    elif isinstance(node, MedicationConfirmNode):
        parts.append(f"key={node.key} «{_abbreviate(node.intro)}»")
    if node.say is not None:
        parts.append(f"say «{_abbreviate(node.say)}»")
    elif node.file is not None:
        parts.append(f"file {node.file}")
    return " ".join(parts)


def render_text(loaded: LoadedFlow) -> str:
    """A readable view of the graph: every node with its type, prompt and labelled edges."""
    flow = loaded.flow
    lines = [f"flow {flow.flow} ({loaded.path}, version {loaded.version})"]
    if flow.description:
        lines.append(f"  {flow.description}")
    lines.append(f"start → {flow.start}")
    width = max(len(n) for n in flow.nodes)
    for node_id, node in flow.nodes.items():
        lines.append(f"{node_id:<{width}}  {_describe(node)}")
        lines += [f"{'':<{width}}    {label} → {target}" for label, target, _keys in edges(node)]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(flow: Flow) -> str:
    """Graphviz dot: terminal nodes as double circles, edges labelled."""
    lines = [f"digraph {_quote(flow.flow)} {{", "  rankdir=LR;", "  node [shape=box];"]
    lines.append('  "__start__" [shape=point];')
    for node_id, node in flow.nodes.items():
        shape = "doublecircle" if node.type in TERMINAL_TYPES else "box"
        label = f"{node_id}\n{node.type}" + (f"\n{_abbreviate(node.say, 20)}" if node.say else "")
        lines.append(f"  {_quote(node_id)} [shape={shape}, label={_quote(label)}];")
    lines.append(f'  "__start__" -> {_quote(flow.start)};')
    for node_id, node in flow.nodes.items():
        lines += [
            f"  {_quote(node_id)} -> {_quote(target)} [label={_quote(label)}];" for label, target, _keys in edges(node)
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def flow_schema() -> dict[str, Any]:
    schema = Flow.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": SCHEMA_TITLE,
        "description": SCHEMA_DESCRIPTION,
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def schema_text() -> str:
    return json.dumps(flow_schema(), indent=2, ensure_ascii=False) + "\n"


def print_schema(write_to: Path | None = None, out: TextIO | None = None) -> int:
    text = schema_text()
    if write_to is None:
        print(text, file=out or sys.stdout, end="")
        return 0
    tmp = write_to.with_name(write_to.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, write_to)  # write-then-rename: never a half-written schema
    print(f"wrote {write_to}", file=out or sys.stdout)
    return 0
