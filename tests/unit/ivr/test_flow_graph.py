"""Graph checks: each kind of problem with its exact place; the CLI; the dot output; the shipped schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivr.flow_graph import check_flow
from ivr.flow_loader import FlowError, check_paths, load_flow, load_flows
from ivr.flow_model import Flow
from ivr.flow_source import SourceMap
from medhotline.cli import main
from medhotline.flows import SCHEMA_FILE, render_dot, schema_text

REPO = Path(__file__).resolve().parents[3]

HEAD = "flow: t\nstart: a\nnodes:\n"
BYE = "  bye:\n    type: hangup\n"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "  a:\n    type: menu\n    say: 请按1\n    choices:\n      1: nowhere\n    fallback: bye\n" + BYE,
            ["8:7: nodes.a.choices.1: node 'nowhere' is not defined"],
            id="unknown-target",
        ),
        pytest.param(
            "  b:\n    type: hangup\n",
            ["2:1: start: start node 'a' is not defined under nodes"],
            id="start-not-defined",
        ),
        pytest.param(
            "  a:\n    type: hangup\n  lost:\n    type: hangup\n  lost2:\n    type: hangup\n",
            [
                "6:3: nodes.lost: node 'lost' is unreachable from start 'a'",
                "8:3: nodes.lost2: node 'lost2' is unreachable from start 'a'",
            ],
            id="unreachable",
        ),
        pytest.param(
            "  a:\n    type: menu\n    say: 请按1\n    choices:\n      1: b\n    fallback: b\n"
            "  b:\n    type: menu\n    say: 请按2\n    choices:\n      2: a\n    fallback: a\n",
            [
                "4:3: nodes.a: loop without a way out: a → b → a",
                "10:3: nodes.b: loop without a way out: b → a → b",
            ],
            id="loop-without-way-out",
        ),
        pytest.param(
            "  a:\n    type: menu\n    say: 请按1\n    choices:\n      1: b\n      2: bye\n    fallback: bye\n"
            "  b:\n    type: menu\n    say: 请按2\n    choices:\n      2: c\n    fallback: c\n"
            "  c:\n    type: menu\n    say: 请按3\n    choices:\n      3: b\n    fallback: b\n" + BYE,
            [
                "11:3: nodes.b: loop without a way out: b → c → b",
                "17:3: nodes.c: loop without a way out: c → b → c",
            ],
            id="dead-end-after-a-choice",
        ),
        pytest.param(
            "  a:\n    type: play\n    say: 请稍候\n    next: b\n"
            "  b:\n    type: set\n    vars: {x: '1'}\n    next: c\n"
            "  c:\n    type: branch\n    cases:\n      - when: {var: x, equals: '2'}\n        next: bye\n"
            "    default: a\n" + BYE,
            [
                "4:3: nodes.a: loop that never waits for the caller: a → b → c → a "
                "(put a menu, collect, listen or confirm node in it)"
            ],
            id="loop-without-waiting",
        ),
        pytest.param(
            "  a:\n    type: branch\n    cases:\n      - when: {all: [{var: x, is_set: true}, {not: {open: clinic}}]}\n"
            "        next: bye\n    default: bye\n" + BYE,
            [
                "7:53: nodes.a.cases.0.when.all.1.not.open: opening hours 'clinic' are not defined under hours "
                "(defined: none)"
            ],
            id="undefined-hours",
        ),
    ],
)
def test_graph_problem_kinds(tmp_path: Path, body: str, expected: list[str]) -> None:
    assert _problems(_write(tmp_path, "t.yaml", HEAD + body)) == expected


CALLER = """\
flow: caller
start: a
nodes:
  a:
    type: subflow
    flow: {target}
    next: bye
  bye:
    type: hangup
"""
RETURNS = (
    "flow: {name}\nstart: a\nnodes:\n  a:\n    type: subflow\n    flow: {target}\n    next: done\n"
    "  done:\n    type: return\n"
)


def _directory_problems(directory: Path) -> list[str]:
    with pytest.raises(FlowError) as info:
        load_flows(directory)
    return [str(p).removeprefix(f"{directory}/") for p in info.value.problems]


def test_subflow_naming_an_unknown_flow(tmp_path: Path) -> None:
    _write(tmp_path, "caller.yaml", CALLER.format(target="nosuch"))
    assert _directory_problems(tmp_path) == [
        "caller.yaml:6:5: nodes.a.flow: flow 'nosuch' is not defined (no file has `flow: nosuch`)"
    ]


def test_subflow_target_without_return(tmp_path: Path) -> None:
    _write(tmp_path, "caller.yaml", CALLER.format(target="other"))
    _write(tmp_path, "other.yaml", "flow: other\nstart: a\nnodes:\n  a:\n    type: hangup\n")
    assert _directory_problems(tmp_path) == [
        "caller.yaml:6:5: nodes.a.flow: flow 'other' has no `return` node, so the call never comes back to this flow"
    ]


def test_subflow_recursion(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", RETURNS.format(name="fa", target="fb"))
    _write(tmp_path, "b.yaml", RETURNS.format(name="fb", target="fa"))
    assert _directory_problems(tmp_path) == [
        "a.yaml:6:5: nodes.a.flow: subflow recursion: fa → fb → fa",
        "b.yaml:6:5: nodes.a.flow: subflow recursion: fb → fa → fb",
    ]


def test_return_in_a_flow_not_used_as_subflow_is_fine(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "flow: a\nstart: a\nnodes:\n  a:\n    type: return\n")
    assert list(load_flows(tmp_path)) == ["a"]


def test_missing_sound_files(tmp_path: Path) -> None:
    sounds = tmp_path / "sounds"
    (sounds / "custom").mkdir(parents=True)
    (sounds / "custom" / "hello.wav").write_bytes(b"")
    path = _write(
        tmp_path,
        "t.yaml",
        HEAD + "  a:\n    type: play\n    file: custom/hello\n    next: b\n"
        "  b:\n    type: menu\n    file: custom/menu\n    choices: {1: bye}\n    fallback: bye\n"
        "    invalid: {file: custom/invalid}\n" + BYE,
    )
    assert load_flow(path).flow.start == "a"  # without a sounds directory, files are not checked
    with pytest.raises(FlowError) as info:
        load_flow(path, sounds_dir=sounds)
    assert [str(p).removeprefix(f"{path}:") for p in info.value.problems] == [
        f"10:5: nodes.b.file: sound 'custom/menu' not found in {sounds}",
        f"13:15: nodes.b.invalid.file: sound 'custom/invalid' not found in {sounds}",
    ]


# -- property: dead ends are exactly the nodes that cannot reach a terminal ------------------------------


@st.composite
def _graphs(draw: st.DrawFn) -> dict[str, tuple[str, list[str]]]:
    """node id → (type, targets); node n0 is the start."""
    count = draw(st.integers(min_value=1, max_value=9))
    ids = [f"n{i}" for i in range(count)]
    graph: dict[str, tuple[str, list[str]]] = {}
    for node_id in ids:
        kind = draw(st.sampled_from(["hangup", "route", "play", "menu", "menu"]))
        if kind in ("hangup", "route"):
            graph[node_id] = (kind, [])
        else:
            size = 1 if kind == "play" else draw(st.integers(min_value=1, max_value=3))
            graph[node_id] = (kind, draw(st.lists(st.sampled_from(ids), min_size=size, max_size=size)))
    return graph


def _flow(graph: dict[str, tuple[str, list[str]]]) -> Flow:
    nodes: dict[str, object] = {}
    for node_id, (kind, targets) in graph.items():
        if kind == "hangup":
            nodes[node_id] = {"type": "hangup"}
        elif kind == "route":
            nodes[node_id] = {"type": "route", "category": "general"}
        elif kind == "play":
            nodes[node_id] = {"type": "play", "say": "x", "next": targets[0]}
        else:
            choices = dict(enumerate(targets[:-1], start=1)) or {1: targets[0]}
            nodes[node_id] = {"type": "menu", "say": "x", "choices": choices, "fallback": targets[-1]}
    return Flow.model_validate({"flow": "p", "start": "n0", "nodes": nodes})


def _reference_dead(flow: Flow) -> set[str]:
    alive = {n for n, node in flow.nodes.items() if node.type in ("hangup", "route")}
    changed = True
    while changed:
        changed = False
        for node_id, node in flow.nodes.items():
            if node_id not in alive and any(t in alive for t in node.targets().values()):
                alive.add(node_id)
                changed = True
    return set(flow.nodes) - alive


@settings(max_examples=300, deadline=None)
@given(_graphs())
def test_dead_ends_are_exactly_the_nodes_that_cannot_reach_a_terminal(graph: dict[str, tuple[str, list[str]]]) -> None:
    flow = _flow(graph)
    problems = check_flow(flow, SourceMap(Path("p.yaml")))
    flagged = {
        p.where.removeprefix("nodes.") for p in problems if p.message.startswith(("loop without a way out", "dead end"))
    }
    assert flagged == _reference_dead(flow)
    assert all(p.where.count(".") == 1 for p in problems if p.message.startswith("loop without a way out"))


# -- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MEDHOTLINE_CONFIG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no ./medhotline.toml
    return work


def test_cli_check_ok(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = no_config / "flows"
    directory.mkdir()
    path = _write(directory, "t.yaml", HEAD + "  a:\n    type: hangup\n")
    version = load_flow(path).version
    assert main(["flows", "check", str(directory)]) == 0
    assert capsys.readouterr().out == f"ok: t ({version})\n"


def test_cli_check_problems(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(no_config, "bad.yaml", HEAD + "  a:\n    type: play\n    say: hi\n    next: nowhere\n")
    worse = _write(no_config, "worse.yaml", "flow: w\nstart: a\nnodes:\n  a:\n    type: hangupp\n")
    assert main(["flows", "check", str(bad), str(worse)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}:7:5: nodes.a.next: node 'nowhere' is not defined",
        f"{worse}:5:5: nodes.a.type: unknown type 'hangupp'; expected one of: play, menu, collect, listen, confirm, "
        "consent, medication_confirm, branch, set, lookup_patient, verify_identity, save_readings, vaccination_book, "
        "vaccination_cancel, report_adverse_reaction, record_survey, subflow, route, transfer, hangup, return",
        "2 problems in 2 files",
    ]
    assert check_paths([bad]) == check_paths([no_config])[:1]


def test_cli_check_defaults_to_the_flows_dir(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (no_config / "dialplans").mkdir()
    _write(no_config / "dialplans", "t.yaml", HEAD + "  a:\n    type: hangup\n  b:\n    type: hangup\n")
    assert main(["flows", "check"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "1 problem in 1 file"


def test_cli_show_text(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (no_config / "dialplans").mkdir()
    _write(no_config / "dialplans", "t.yaml", HEAD + "  a:\n    type: play\n    say: 您好\n    next: bye\n" + BYE)
    assert main(["flows", "show", "t"]) == 0
    out = capsys.readouterr().out
    assert "a    play say «您好»\n       next → bye\n" in out
    assert "bye  hangup (end)\n" in out
    assert main(["flows", "show", "nosuch"]) == 1


_EDGE = re.compile(r'^  "([^"]+)" -> "([^"]+)"(?: \[label="([^"]*)"\])?;$')
_NODE = re.compile(r'^  "([^"]+)" \[shape=(\w+)(?:, label="(?:[^"\\]|\\.)*")?\];$')


def test_cli_show_dot_is_a_digraph_with_the_edges(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (no_config / "dialplans").mkdir()
    _write(
        no_config / "dialplans",
        "t.yaml",
        HEAD + '  a:\n    type: menu\n    say: 请按"1"\n    choices:\n      1: b\n      2: bye\n    fallback: bye\n'
        "  b:\n    type: route\n    category: general\n" + BYE,
    )
    assert main(["flows", "show", "t", "--dot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'digraph "t" {'
    assert lines[-1] == "}"
    edges, shapes = set(), {}
    for line in lines[1:-1]:
        if edge := _EDGE.match(line):
            edges.add(edge.groups())
        elif node := _NODE.match(line):
            shapes[node.group(1)] = node.group(2)
        else:
            assert line in ("  rankdir=LR;", "  node [shape=box];"), line
    assert edges == {
        ("__start__", "a", None),
        ("a", "b", "press 1"),
        ("a", "bye", "press 2"),
        ("a", "bye", "fallback"),
    }
    assert shapes == {"__start__": "point", "a": "box", "b": "doublecircle", "bye": "doublecircle"}


def test_cli_show_dot_draws_the_edges_of_a_consent_node(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (no_config / "dialplans").mkdir()
    _write(
        no_config / "dialplans",
        "t.yaml",
        HEAD + "  a:\n    type: consent\n    document: remote_consultation\n    text: 同意请按1\n"
        "    confirm_again: 确认请按1\n    next: {given: ok, refused: bye}\n"
        "  ok:\n    type: route\n    category: diagnosis\n" + BYE,
    )
    assert main(["flows", "show", "t", "--dot"]) == 0
    edges = {m.groups() for line in capsys.readouterr().out.splitlines() if (m := _EDGE.match(line))}
    assert edges == {("__start__", "a", None), ("a", "ok", "given"), ("a", "bye", "refused")}
    assert main(["flows", "show", "t"]) == 0
    assert "a    consent\n       given → ok\n       refused → bye\n" in capsys.readouterr().out


def test_dot_of_the_shipped_hotline_flow() -> None:
    hotline = load_flows(REPO / "dialplans")["hotline"].flow
    dot = render_dot(hotline)
    assert dot.startswith('digraph "hotline" {\n')
    assert dot.endswith("}\n")


def test_cli_schema_prints_json(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flows", "schema"]) == 0
    assert capsys.readouterr().out == schema_text()


def test_shipped_schema_is_up_to_date() -> None:
    shipped = (REPO / "dialplans" / SCHEMA_FILE).read_text(encoding="utf-8")
    assert shipped == schema_text(), "dialplans/flow.schema.json is stale: run `medhotline flows schema --write`"


def test_schema_describes_the_flow() -> None:
    text = schema_text()
    assert '"title": "medhotline IVR flow"' in text
    assert '"menu"' in text
    assert '"fallback"' in text
