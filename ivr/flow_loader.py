"""Load flow files: safe YAML → schema-validated model → graph checks, reporting every problem with its place.

The pipeline follows python-statemachine's io layer. The YAML loader is a :class:`yaml.SafeLoader` that only
knows ``true``/``false`` as booleans (``yes``, ``no``, ``on``, ``off``, ``y``, ``n`` stay text: a menu choice or
``say: no`` is never silently turned into a boolean), rejects duplicate keys, and remembers where every key is,
so each problem reads ``dialplans/hotline.yaml:12:5: nodes.main_menu.choices.1: node 'nowhere' is not defined``.
A file's problems are reported all at once: schema errors and graph errors together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ground.errors import MedhotlineError
from ground.yaml_source import StrictYamlLoader, parse_yaml
from ivr.flow_graph import check_flow, check_flows, check_subflows
from ivr.flow_model import CONDITION_TAGS, Flow
from ivr.flow_source import FlowProblem, LoadedFlow, PathKey, SourceMap

__all__ = [
    "FlowError",
    "FlowProblem",
    "FlowReport",
    "LoadedFlow",
    "check_flows",
    "check_paths",
    "load_flow",
    "load_flows",
    "load_flows_lenient",
    "parse_flow_yaml",
    "scan_paths",
]


class FlowError(MedhotlineError):
    """One or more flow files are unusable; ``problems`` lists every problem with its place."""

    def __init__(self, path: Path, problems: Sequence[FlowProblem | str]) -> None:
        self.path = path
        self.problems = [p if isinstance(p, FlowProblem) else FlowProblem(path, 0, 0, "", p) for p in problems]
        count = len(self.problems)
        super().__init__(
            f"{path}: {count} problem{'s' if count != 1 else ''} in flows:\n  "
            + "\n  ".join(str(p) for p in self.problems)
        )


# parse_flow_yaml is the shared strict loader; the flow-specific name is kept for callers and tests.
parse_flow_yaml = parse_yaml
FlowYamlLoader = StrictYamlLoader


# -- schema errors → places -----------------------------------------------------------------------


def _locate(data: Any, loc: tuple[int | str, ...]) -> tuple[PathKey, str | None]:
    """Pydantic's ``loc`` as a path of keys that exist in the file, dropping union tags.

    Returns (path, missing) where ``missing`` is a trailing key that the file lacks (a required key).
    """
    path: list[str] = []
    current = data
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(current, dict):
            match = next((k for k in current if str(k) == str(part)), _MISSING)
            if match is not _MISSING:
                path.append(str(part))
                current = current[match]
                continue
            if (part == current.get("type") or part in CONDITION_TAGS or part == "[key]") and not last:
                continue  # a discriminated-union tag that pydantic inserts
            if part == "[key]":
                return tuple(path), None
            return tuple(path), str(part)
        if isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(str(part))
            current = current[part]
            continue
        return tuple(path), None if last else str(part)
    return tuple(path), None


_MISSING = object()


def _schema_problem(data: Any, source: SourceMap, error: ErrorDetails) -> FlowProblem:
    path, missing = _locate(data, tuple(error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "model_type" and not path:
        message = "a flow file must be a mapping with at least `flow`, `start` and `nodes`"
    elif "[key]" in error["loc"] and path:
        message = f"invalid name {path[-1]!r}: {message}"
    elif kind == "missing" and missing is not None:
        message = f"missing required key `{missing}`"
    elif kind == "extra_forbidden":
        path = (*path, missing) if missing is not None else path
        message = f"unknown key `{path[-1]}`" if path else message
    elif kind == "union_tag_invalid":
        expected = str(ctx.get("expected_tags", "")).replace("'", "")
        message = f"unknown type {ctx.get('tag')!r}; expected one of: {expected}"
        if (*path, "type") in source.positions:
            path = (*path, "type")
    elif kind == "union_tag_not_found":
        message = f"missing required key `{ctx.get('discriminator', 'type')}`".replace("'", "")
    elif kind.endswith("_type") and kind != "model_type" and missing is None:
        message = f"{message} (got {_describe(error.get('input'))})"
    return source.problem(path, message)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- loading --------------------------------------------------------------------------------------


@dataclass
class _FileResult:
    path: Path
    loaded: LoadedFlow | None
    problems: list[FlowProblem]
    # The flow name the file declares, when it can be told even from a broken file.
    name: str | None = None


def _load_file(path: Path, sounds_dir: Path | None = None) -> _FileResult:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return _FileResult(path, None, [FlowProblem(path, 0, 0, "", f"cannot be read: {exc.strerror}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return _FileResult(path, None, [FlowProblem(path, line, 0, "", "not UTF-8 text")])
    return _load_text(text, raw, path, sounds_dir)


def load_flow_text(
    text: str, source: Path, sounds_dir: Path | None = None
) -> tuple[LoadedFlow | None, list[FlowProblem]]:
    """A flow from YAML text that is not a file in the flows directory (surge mode's generated entry flow),
    checked exactly like a file: schema and graph. ``source`` names it in problems."""
    result = _load_text(text, text.encode("utf-8"), source, sounds_dir)
    return result.loaded, result.problems


def _load_text(text: str, raw: bytes, path: Path, sounds_dir: Path | None) -> _FileResult:
    data, source, problems = parse_flow_yaml(text, path)
    name = data.get("flow") if isinstance(data, dict) and isinstance(data.get("flow"), str) else None
    if data is None and not problems:
        return _FileResult(path, None, [FlowProblem(path, 1, 1, "", "the file is empty")], name)
    if data is None:
        return _FileResult(path, None, problems, name)
    try:
        flow = Flow.model_validate(data)
    except ValidationError as exc:
        problems += [_schema_problem(data, source, error) for error in exc.errors()]
        problems += _partial_graph_checks(data, exc, source, sounds_dir)
        return _FileResult(path, None, _sorted(problems), name)
    problems += check_flow(flow, source, sounds_dir)
    if problems:
        return _FileResult(path, None, _sorted(problems), name)
    loaded = LoadedFlow(flow=flow, path=path, version=hashlib.sha256(raw).hexdigest()[:16], source=source)
    return _FileResult(path, loaded, [], name)


def _partial_graph_checks(
    data: dict[Any, Any], exc: ValidationError, source: SourceMap, sounds_dir: Path | None
) -> list[FlowProblem]:
    """Graph checks despite schema errors, so one run reports everything: invalid nodes become placeholders.

    A placeholder has no edges, so checks that need the whole graph (unreachable nodes, dead ends) are skipped
    when there is one; problems inside a placeholder are left to the schema errors already reported.
    """
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        return []
    bad_top = {str(e["loc"][0]) for e in exc.errors() if e["loc"] and e["loc"][0] != "nodes"}
    bad_nodes = {str(e["loc"][1]) for e in exc.errors() if len(e["loc"]) > 1 and e["loc"][0] == "nodes"}
    if bad_top & {"start"} or not data["nodes"]:
        return []
    nodes = {k: ({"type": "hangup"} if str(k) in bad_nodes else v) for k, v in data["nodes"].items()}
    partial = {k: v for k, v in data.items() if str(k) not in bad_top | {"nodes"}}
    partial.setdefault("flow", "partial")
    partial.setdefault("start", next(iter(nodes)))
    try:
        flow = Flow.model_validate({**partial, "nodes": nodes})
    except ValidationError:
        return []
    problems = check_flow(
        flow,
        source,
        sounds_dir,
        whole_graph=not bad_nodes,
        check_start="start" in data,
        check_hours="hours" not in bad_top,
    )
    problems = [p for p in problems if not any(p.where.startswith(f"nodes.{n}") for n in bad_nodes)]
    defined = {str(k) for k in nodes}
    for node_id, raw in data["nodes"].items():
        if str(node_id) in bad_nodes and isinstance(raw, dict):
            for keys, target in _raw_targets(raw):
                if target not in defined:
                    problems.append(source.problem(("nodes", str(node_id), *keys), f"node {target!r} is not defined"))
    return problems


def _raw_targets(raw: dict[Any, Any]) -> list[tuple[PathKey, str]]:
    """Targets of a node that failed validation, read from its plain data as far as they look like targets."""
    found: list[tuple[PathKey, str]] = []
    for key in ("next", "fallback", "default", "found", "not_found"):
        if isinstance(raw.get(key), str):
            found.append(((key,), raw[key]))
    if isinstance(raw.get("next"), dict):  # a consent node's next: {given: …, refused: …}
        found += [(("next", str(k)), v) for k, v in raw["next"].items() if isinstance(v, str)]
    triage = raw.get("triage")
    if isinstance(triage, dict):  # a listen node's triage targets
        found += [(("triage", k), triage[k]) for k in ("urgent", "emergency") if isinstance(triage.get(k), str)]
    for key in ("choices", "categories"):
        if isinstance(raw.get(key), dict):
            found += [((key, str(k)), v) for k, v in raw[key].items() if isinstance(v, str)]
    if isinstance(raw.get("cases"), list):
        found += [
            (("cases", str(i), "next"), case["next"])
            for i, case in enumerate(raw["cases"])
            if isinstance(case, dict) and isinstance(case.get("next"), str)
        ]
    return found


def _sorted(problems: Iterable[FlowProblem]) -> list[FlowProblem]:
    return sorted(dict.fromkeys(problems), key=lambda p: (str(p.path), p.line, p.column))


def load_flow(path: Path, sounds_dir: Path | None = None) -> LoadedFlow:
    """One flow file, checked on its own (schema and graph); FlowError lists all its problems."""
    result = _load_file(path, sounds_dir)
    if result.loaded is None:
        raise FlowError(path, result.problems)
    return result.loaded


def _flow_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.is_file())


def _collect(results: Iterable[_FileResult]) -> tuple[dict[str, LoadedFlow], list[FlowProblem]]:
    flows: dict[str, LoadedFlow] = {}
    problems: list[FlowProblem] = []
    for result in results:
        problems += result.problems
        if result.loaded is None:
            continue
        name = result.loaded.flow.flow
        if name in flows:
            problems.append(
                result.loaded.source_map.problem(("flow",), f"flow name {name!r} is also used by {flows[name].path}")
            )
            continue
        flows[name] = result.loaded
    return flows, problems


def load_flows(directory: Path, sounds_dir: Path | None = None) -> dict[str, LoadedFlow]:
    """Every ``*.yaml`` flow in a directory, by flow name; FlowError lists every problem of every file."""
    flows, problems = _collect(_load_file(p, sounds_dir) for p in _flow_files(directory))
    problems += check_subflows(flows)
    if problems:
        raise FlowError(directory, _sorted(problems))
    return flows


def load_flows_lenient(
    directory: Path, previous: Mapping[str, LoadedFlow], sounds_dir: Path | None = None
) -> tuple[dict[str, LoadedFlow], list[FlowProblem]]:
    """For hot reload: valid files are taken; a broken file keeps the previous good version of its flow.

    A flow whose subflows are broken (unknown, without ``return``, recursive) keeps its previous version too,
    or is left out if it has none. A flow whose file was removed is dropped. Returns (flows, problems).
    """
    results = [_load_file(p, sounds_dir) for p in _flow_files(directory)]
    flows, problems = _collect(results)
    for name, loaded in flows.items():  # unchanged files keep their object: callers can compare by identity
        old = previous.get(name)
        if old is not None and (old.path, old.version) == (loaded.path, loaded.version):
            flows[name] = old
    for result in results:
        if result.loaded is not None:
            continue
        names = {result.name} if result.name else set()
        names |= {name for name, old in previous.items() if old.path == result.path}
        for name in names:
            if name in previous and name not in flows:
                flows[name] = previous[name]
    for _ in range(len(flows) + 1):
        bad = set(check_subflows(flows))
        problems += bad
        culprits = {name for name, loaded in flows.items() if any(p.path == loaded.path for p in bad)}
        changed = False
        for name in culprits:
            old = previous.get(name)
            if old is None:
                del flows[name]
                changed = True
            elif flows[name] is not old:
                flows[name] = old
                changed = True
        if not changed:
            break
    return flows, _sorted(problems)


@dataclass
class FlowReport:
    """What ``medhotline flows check`` found: the good flows, every problem, and the files looked at."""

    flows: dict[str, LoadedFlow] = field(default_factory=dict)
    problems: list[FlowProblem] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def scan_paths(paths: Sequence[Path], sounds_dir: Path | None = None) -> FlowReport:
    """Files or directories (their ``*.yaml``) checked as one set of flows, cross-file checks included."""
    files: list[Path] = []
    for path in paths:
        files += _flow_files(path) if path.is_dir() else [path]
    files = list(dict.fromkeys(files))
    flows, problems = _collect(_load_file(p, sounds_dir) for p in files)
    problems += check_subflows(flows)
    bad_files = {p.path for p in problems}
    good = {name: loaded for name, loaded in flows.items() if loaded.path not in bad_files}
    return FlowReport(good, _sorted(problems), files)


def check_paths(paths: Sequence[Path], sounds_dir: Path | None = None) -> list[FlowProblem]:
    """Every problem of the flow files at ``paths`` (files or directories)."""
    return scan_paths(paths, sounds_dir).problems
