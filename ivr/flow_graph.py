"""Graph checks on validated flows: what the schema cannot see because it needs the whole graph.

Within one flow (:func:`check_flow`): undefined targets and start node, unreachable nodes, dead ends and loops
without a way out, loops that never wait for the caller, ``open:`` conditions naming undefined opening hours,
outreach nodes reading variables that no node of the flow sets, and (with a sounds directory) ``file:`` prompts
that do not exist. Across flows (:func:`check_subflows`):
subflow nodes naming an unknown flow, a subflow target without any ``return`` node, and subflow recursion.
Every problem points at the offending key of the file.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from ivr.flow_model import (
    TERMINAL_TYPES,
    WAITING_TYPES,
    AllCondition,
    AnyCondition,
    BranchNode,
    CollectNode,
    Condition,
    ConfirmNode,
    ConsentNode,
    Flow,
    ListenNode,
    LookupPatientNode,
    MedicationConfirmNode,
    MenuNode,
    NotCondition,
    OpenCondition,
    RecordSurveyNode,
    SaveReadingsNode,
    SetNode,
    SubflowNode,
    VaccinationBookNode,
    VaccinationCancelNode,
    VarCondition,
    VerifyIdentityNode,
    _Node,
    _Waiting,
)
from ivr.flow_source import FlowProblem, LoadedFlow, PathKey, SourceMap

ARROW = " → "


def edges(node: _Node) -> list[tuple[str, str, PathKey]]:
    """Outgoing edges of a node as (label, target node id, key path inside the node) — ``targets()`` with places."""
    result: list[tuple[str, str, PathKey]] = []
    if isinstance(node, MenuNode | ListenNode):
        if isinstance(node, ListenNode):
            result += [(f"heard {c}", t, ("categories", c)) for c, t in node.categories.items()]
        result += [(f"press {d}", t, ("choices", d)) for d, t in node.choices.items()]
        if isinstance(node, ListenNode):
            if node.triage is not None:
                result.append(("triage urgent", node.triage.urgent, ("triage", "urgent")))
                if node.triage.emergency is not None:
                    result.append(("triage emergency", node.triage.emergency, ("triage", "emergency")))
            result.append(("default", node.default, ("default",)))
    elif isinstance(node, BranchNode):
        result += [(f"case {i + 1}", c.next, ("cases", str(i), "next")) for i, c in enumerate(node.cases)]
        result.append(("default", node.default, ("default",)))
    elif isinstance(node, LookupPatientNode):
        result += [("found", node.found, ("found",)), ("not found", node.not_found, ("not_found",))]
    elif isinstance(node, ConsentNode):
        return [("given", node.next.given, ("next", "given")), ("refused", node.next.refused, ("next", "refused"))]
    elif isinstance(
        node,
        VerifyIdentityNode | SaveReadingsNode | MedicationConfirmNode | VaccinationBookNode | VaccinationCancelNode,
    ):
        # Their ways out are the keys of `next:`, and the edge labels are those keys.
        return [(label, target, ("next", label)) for label, target in node.targets().items()]
    else:
        labels = node.targets()
        for label, target in labels.items():
            key = "fallback" if label == "fallback" else "next"
            result.append((label, target, (key,)))
        return result
    if isinstance(node, _Waiting):
        result.append(("fallback", node.fallback, ("fallback",)))
    return result


def successors(flow: Flow) -> dict[str, list[str]]:
    """Defined targets of every node (edges to undefined nodes left out), in file order without repeats."""
    return {
        node_id: list(dict.fromkeys(t for t in node.targets().values() if t in flow.nodes))
        for node_id, node in flow.nodes.items()
    }


def reaching_terminal(flow: Flow) -> set[str]:
    """Nodes from which some terminal node (route, transfer, hangup, return) can be reached."""
    preds: dict[str, list[str]] = {n: [] for n in flow.nodes}
    for source, targets in successors(flow).items():
        for target in targets:
            preds[target].append(source)
    found = {n for n, node in flow.nodes.items() if node.type in TERMINAL_TYPES}
    queue = deque(found)
    while queue:
        for pred in preds[queue.popleft()]:
            if pred not in found:
                found.add(pred)
                queue.append(pred)
    return found


def _reachable(graph: Mapping[str, list[str]], start: str) -> set[str]:
    seen = {start}
    queue = deque([start])
    while queue:
        for nxt in graph.get(queue.popleft(), []):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def _cycle_through(graph: Mapping[str, list[str]], node: str) -> list[str] | None:
    """A shortest cycle node → … → node inside ``graph``, or None."""
    parent: dict[str, str] = {}
    queue = deque([node])
    while queue:
        current = queue.popleft()
        for nxt in graph.get(current, []):
            if nxt == node:
                path = [current]
                while path[-1] != node:
                    path.append(parent[path[-1]])
                return [*reversed(path), node]
            if nxt not in parent:
                parent[nxt] = current
                queue.append(nxt)
    return None


def _problem(source: SourceMap, node_id: str, keys: PathKey, message: str) -> FlowProblem:
    return source.problem(("nodes", node_id, *keys), message)


# The first Stasis argument is a flow name unless it is one of these: the service's own legs (snoop taps, agent
# legs, outbound calls, FastAGI calls joining the queue). A flow with such a name would be misrouted, so the
# checker refuses it. A test keeps this set equal to the constants the service dispatches on.
RESERVED_FLOW_NAMES: Final[frozenset[str]] = frozenset({"snoop", "agent", "outbound", "queue", "supervisor"})


def check_flow(
    flow: Flow,
    source: SourceMap,
    sounds_dir: Path | None = None,
    *,
    whole_graph: bool = True,
    check_start: bool = True,
    check_hours: bool = True,
) -> list[FlowProblem]:
    """Every graph problem of one flow, in file order.

    The loader turns off the checks that would mislead on a partial flow (nodes with schema errors left out).
    """
    problems: list[FlowProblem] = []
    if flow.flow in RESERVED_FLOW_NAMES:
        problems.append(
            source.problem(
                ("flow",),
                f"flow name {flow.flow!r} is reserved for the service's own Stasis legs "
                f"({', '.join(sorted(RESERVED_FLOW_NAMES))}): choose another name",
            )
        )
    if check_start and flow.start not in flow.nodes:
        problems.append(source.problem(("start",), f"start node {flow.start!r} is not defined under nodes"))
    broken: set[str] = set()
    for node_id, node in flow.nodes.items():
        for _label, target, keys in edges(node):
            if target not in flow.nodes:
                broken.add(node_id)
                problems.append(_problem(source, node_id, keys, f"node {target!r} is not defined"))
    graph = successors(flow)
    problems += _busy_loops(flow, source, graph)
    if check_hours:
        problems += _hours_references(flow, source)
    if sounds_dir is not None:
        problems += _missing_sounds(flow, source, sounds_dir)
    if not whole_graph:
        return sorted(problems, key=lambda p: (p.line, p.column))
    if flow.start in flow.nodes:
        reachable = _reachable(graph, flow.start)
        problems += [
            _problem(source, n, (), f"node {n!r} is unreachable from start {flow.start!r}")
            for n in flow.nodes
            if n not in reachable
        ]
    problems += _dead_ends(flow, source, graph, broken)
    problems += _unset_variables(flow, source)
    return sorted(problems, key=lambda p: (p.line, p.column))


def _dead_ends(flow: Flow, source: SourceMap, graph: dict[str, list[str]], broken: set[str]) -> list[FlowProblem]:
    alive = reaching_terminal(flow)
    dead = {n: [t for t in graph[n] if t not in alive] for n in flow.nodes if n not in alive}
    problems = []
    for node_id in dead:
        cycle = _cycle_through(dead, node_id)
        if cycle is not None:
            problems.append(_problem(source, node_id, (), f"loop without a way out: {ARROW.join(cycle)}"))
        elif node_id not in broken:  # an undefined target is reported as such
            problems.append(
                _problem(source, node_id, (), "dead end: no route, transfer, hangup or return can be reached from here")
            )
    return problems


def _set_variables(flow: Flow) -> set[str]:
    """Every variable some node of the flow sets."""
    names: set[str] = set()
    for node in flow.nodes.values():
        if isinstance(node, CollectNode):
            names.add(node.var)
        elif isinstance(node, ListenNode):
            names |= {node.var, "priority"}
        elif isinstance(node, SetNode):
            names |= set(node.vars)
        elif isinstance(node, LookupPatientNode):
            names.add("patient_ref")
    return names


def _unset_variables(flow: Flow, source: SourceMap) -> list[FlowProblem]:
    """Variables an outreach node reads that no node of this flow sets: a typo would otherwise only show as an
    error in a live call (and an identity check or a reading lost). Only checked on a whole flow: a node left out
    for a schema error may be the one that sets it."""
    known = _set_variables(flow)
    problems = []
    for node_id, node in flow.nodes.items():
        used: list[tuple[PathKey, str]] = []
        if isinstance(node, VerifyIdentityNode | SaveReadingsNode):
            used = [(("vars", str(i)), name) for i, name in enumerate(node.vars)]
        elif isinstance(node, VaccinationBookNode):
            used = [(("day_var",), node.day_var), (("slot_var",), node.slot_var)]
        elif isinstance(node, RecordSurveyNode):
            used = [(("var",), node.var)]
        problems += [
            _problem(
                source, node_id, keys, f"variable {name!r} is not set by any collect, listen or set node of this flow"
            )
            for keys, name in used
            if name not in known
        ]
    return problems


def _busy_loops(flow: Flow, source: SourceMap, graph: dict[str, list[str]]) -> list[FlowProblem]:
    """Cycles made only of nodes that never wait for the caller: the call would spin forever."""
    busy = {
        n: [t for t in graph[n] if flow.nodes[t].type not in WAITING_TYPES | TERMINAL_TYPES]
        for n, node in flow.nodes.items()
        if node.type not in WAITING_TYPES | TERMINAL_TYPES
    }
    problems = []
    reported: set[str] = set()
    for node_id in busy:
        if node_id in reported:
            continue
        cycle = _cycle_through(busy, node_id)
        if cycle is not None:
            reported.update(cycle)
            problems.append(
                _problem(
                    source,
                    node_id,
                    (),
                    f"loop that never waits for the caller: {ARROW.join(cycle)} "
                    "(put a menu, collect, listen or confirm node in it)",
                )
            )
    return problems


def _conditions(condition: Condition, path: PathKey) -> Iterator[tuple[Condition, PathKey]]:
    yield condition, path
    if isinstance(condition, NotCondition):
        yield from _conditions(condition.not_, (*path, "not"))
    elif isinstance(condition, AllCondition):
        for i, inner in enumerate(condition.all):
            yield from _conditions(inner, (*path, "all", str(i)))
    elif isinstance(condition, AnyCondition):
        for i, inner in enumerate(condition.any):
            yield from _conditions(inner, (*path, "any", str(i)))
    else:
        assert isinstance(condition, OpenCondition | VarCondition)


def _hours_references(flow: Flow, source: SourceMap) -> list[FlowProblem]:
    problems = []
    for node_id, node in flow.nodes.items():
        if not isinstance(node, BranchNode):
            continue
        for i, case in enumerate(node.cases):
            for condition, path in _conditions(case.when, ("cases", str(i), "when")):
                if isinstance(condition, OpenCondition) and condition.open not in flow.hours:
                    defined = ", ".join(sorted(flow.hours)) or "none"
                    problems.append(
                        _problem(
                            source,
                            node_id,
                            (*path, "open"),
                            f"opening hours {condition.open!r} are not defined under hours (defined: {defined})",
                        )
                    )
    return problems


def _missing_sounds(flow: Flow, source: SourceMap, sounds_dir: Path) -> list[FlowProblem]:
    problems = []
    for node_id, node in flow.nodes.items():
        prompts: list[tuple[PathKey, str | None]] = [(("file",), node.file)]
        if isinstance(node, MenuNode | CollectNode | ListenNode | ConfirmNode):
            prompts += [
                ((key, "file"), getattr(node, key).file) for key in ("invalid", "no_input") if getattr(node, key)
            ]
        elif isinstance(node, ConsentNode) and node.no_input is not None:
            prompts.append((("no_input", "file"), node.no_input.file))
        for keys, name in prompts:
            if name is None:
                continue
            sound = sounds_dir / name
            if not any(sound.parent.glob(f"{sound.name}.*")):
                problems.append(_problem(source, node_id, keys, f"sound {name!r} not found in {sounds_dir}"))
    return problems


# -- across flows ---------------------------------------------------------------------------------


def check_subflows(flows: Mapping[str, LoadedFlow]) -> list[FlowProblem]:
    """Subflow nodes naming an unknown flow or a flow without ``return``, and subflow recursion."""
    problems: list[FlowProblem] = []
    calls: dict[str, list[tuple[str, str]]] = {}  # flow → [(node id, called flow)]
    for name, loaded in flows.items():
        source = loaded.source_map
        for node_id, node in loaded.flow.nodes.items():
            if not isinstance(node, SubflowNode):
                continue
            target = flows.get(node.flow)
            if target is None:
                problems.append(
                    _problem(
                        source,
                        node_id,
                        ("flow",),
                        f"flow {node.flow!r} is not defined (no file has `flow: {node.flow}`)",
                    )
                )
                continue
            calls.setdefault(name, []).append((node_id, node.flow))
            if not any(n.type == "return" for n in target.flow.nodes.values()):
                problems.append(
                    _problem(
                        source,
                        node_id,
                        ("flow",),
                        f"flow {node.flow!r} has no `return` node, so the call never comes back to this flow",
                    )
                )
    graph = {name: list(dict.fromkeys(t for _n, t in called)) for name, called in calls.items()}
    for name, called in calls.items():
        for node_id, callee in called:
            path = _cycle_path(graph, callee, name)
            if path is not None:
                cycle = [name, *path]
                problems.append(
                    _problem(flows[name].source_map, node_id, ("flow",), f"subflow recursion: {ARROW.join(cycle)}")
                )
    return problems


def _cycle_path(graph: Mapping[str, list[str]], start: str, goal: str) -> list[str] | None:
    """A shortest path start → … → goal in ``graph``, or None."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        if current == goal:
            path = [current]
            while (prev := parent[path[-1]]) is not None:
                path.append(prev)
            return path[::-1]
        for nxt in graph.get(current, []):
            if nxt not in parent:
                parent[nxt] = current
                queue.append(nxt)
    return None


def check_flows(flows: Mapping[str, LoadedFlow], sounds_dir: Path | None = None) -> list[FlowProblem]:
    """Per-flow and cross-flow graph checks of a set of loaded flows."""
    problems: list[FlowProblem] = []
    for loaded in flows.values():
        problems += check_flow(loaded.flow, loaded.source_map, sounds_dir)
    problems += check_subflows(flows)
    return sorted(problems, key=lambda p: (str(p.path), p.line, p.column))
