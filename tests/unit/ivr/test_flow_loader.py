"""load_flow / load_flows: safe YAML, every problem of a file at once, each with ``file:line:column: path``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivr.flow_loader import FlowError, FlowProblem, load_flow, load_flows, load_flows_lenient, parse_flow_yaml

REPO = Path(__file__).resolve().parents[3]

VALID = """\
flow: test
start: hello
nodes:
  hello:
    type: play
    say: hi
    next: bye
  bye:
    type: hangup
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(FlowError) as info:
        load_flow(path)
    assert info.value.path == path
    assert all(isinstance(p, FlowProblem) for p in info.value.problems)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


def test_shipped_flows_load() -> None:
    loaded = load_flows(REPO / "dialplans")
    hotline = loaded["hotline"]
    assert hotline.flow.start == "greeting"
    assert hotline.path == REPO / "dialplans" / "hotline.yaml"
    assert len(hotline.version) == 16
    assert hotline.flow.prompt_texts()  # every prompt has text to render


def test_test_desk_flows_load_with_the_consent_desk() -> None:
    loaded = load_flows(REPO / "tests" / "data" / "flows")
    desk = loaded["consent_desk"].flow
    assert desk.nodes["consent_remote"].type == "consent"
    assert "您确认同意吗？再次确认请按1。" in desk.prompt_texts()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: menuu\n    say: hi\n",
            "5:5: nodes.a.type: unknown type 'menuu'; expected one of: play, menu, collect, listen, confirm, consent, "
            "medication_confirm, branch, set, lookup_patient, verify_identity, save_readings, vaccination_book, "
            "vaccination_cancel, report_adverse_reaction, record_survey, subflow, route, transfer, hangup, return",
            id="unknown-node-type",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: play\n    say: hi\n",
            "4:3: nodes.a: missing required key `next`",
            id="missing-key",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n    say: hi\n    file: x/y\n",
            "4:3: nodes.a: give either `say` or `file`, not both",
            id="both-say-and-file",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: play\n    next: a\n",
            "4:3: nodes.a: a play node needs `say` (text) or `file` (sound)",
            id="play-without-prompt",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n    sya: hi\n",
            "6:5: nodes.a.sya: unknown key `sya`",
            id="unknown-key",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: menu\n    say: hi\n    retries: many\n"
            "    choices: {1: b}\n    fallback: b\n  b:\n    type: hangup\n",
            "7:5: nodes.a.retries: Input should be a valid integer, unable to parse string as an integer",
            id="wrong-type",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: branch\n    cases:\n      - when: {var: x}\n        next: b\n"
            "    default: b\n  b:\n    type: hangup\n",
            "7:9: nodes.a.cases.0.when: a var condition needs exactly one of equals, one_of, matches, is_set",
            id="condition-inside-list",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: branch\n    cases:\n      - when: {nott: x}\n        next: b\n"
            "    default: b\n  b:\n    type: hangup\n",
            "7:9: nodes.a.cases.0.when: a condition needs one of the keys var, open, not, all, any",
            id="unknown-condition",
        ),
        pytest.param(
            "flow: t\nstart: a\nhours:\n  office:\n    weekly: {mon-fry: ['08:00-12:00']}\nnodes:\n  a:\n"
            "    type: hangup\n",
            "5:5: hours.office.weekly: 'mon-fry': day range must look like 'mon-fri'",
            id="bad-hours",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n  Bad-Id:\n    type: hangup\n",
            "6:3: nodes.Bad-Id: invalid name 'Bad-Id': String should match pattern '^[a-z][a-z0-9_]{0,63}$'",
            id="bad-node-id",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a: [\n    type: hangup\n",
            "6:1: not valid YAML: expected ',' or ']', but got '<stream end>'",
            id="yaml-syntax-error",
        ),
        pytest.param(
            "- just\n- a list\n",
            "1:1: a flow file must be a mapping with at least `flow`, `start` and `nodes`",
            id="not-a-mapping",
        ),
        pytest.param("", "1:1: the file is empty", id="empty"),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n    say: hi\n    say: again\n",
            "7:5: nodes.a.say: duplicate key 'say' (first on line 6, again on line 7)",
            id="duplicate-key",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n  a:\n    type: hangup\n",
            "6:3: nodes.a: duplicate key 'a' (first on line 4, again on line 6)",
            id="duplicate-node",
        ),
    ],
)
def test_schema_problem_names_line_column_and_path(tmp_path: Path, text: str, expected: str) -> None:
    assert _problems(_write(tmp_path, "bad.yaml", text)) == [expected]


def test_yaml_error_points_at_the_offending_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n   say: misindented\n")
    [problem] = _problems(path)
    assert problem.startswith("6:4: not valid YAML")


def test_problem_format() -> None:
    problem = FlowProblem(Path("dialplans/hotline.yaml"), 12, 5, "nodes.main_menu.choices.1", "node 'x' is not defined")
    assert str(problem) == "dialplans/hotline.yaml:12:5: nodes.main_menu.choices.1: node 'x' is not defined"
    assert str(FlowProblem(Path("a.yaml"), 0, 0, "", "cannot be read")) == "a.yaml: cannot be read"


def test_yes_no_on_off_stay_text() -> None:
    text = "say: no\nchoices: {1: yes, 2: off, 3: on, 4: n, 5: y}\nbarge: true\nb2: False\nzero: 010\nt: 12:30\nn: 7\n"
    data, _source, problems = parse_flow_yaml(text, Path("x.yaml"))
    assert problems == []
    assert data == {
        "say": "no",
        "choices": {1: "yes", 2: "off", 3: "on", 4: "n", 5: "y"},
        "barge": True,
        "b2": False,
        "zero": "010",  # not octal 8
        "t": "12:30",  # not base-60 750
        "n": 7,
    }


def test_say_no_and_a_set_value_yes_reach_the_model_as_text(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "t.yaml",
        "flow: t\nstart: a\nnodes:\n  a:\n    type: set\n    vars: {answer: yes}\n    next: b\n"
        "  b:\n    type: hangup\n    say: no\n",
    )
    flow = load_flow(path).flow
    assert flow.nodes["a"].vars == {"answer": "yes"}  # type: ignore[union-attr]
    assert flow.nodes["b"].say == "no"


def test_positions_of_keys_and_list_items() -> None:
    _data, source, _problems = parse_flow_yaml("a:\n  b:\n    - x\n    - c: 1\n", Path("x.yaml"))
    assert source.position(("a",)) == (1, 1)
    assert source.position(("a", "b")) == (2, 3)
    assert source.position(("a", "b", "1")) == (4, 7)
    assert source.position(("a", "b", "1", "c")) == (4, 7)
    assert source.position(("a", "b", "1", "missing")) == (4, 7)  # nearest ancestor


def test_three_different_errors_give_three_problems(tmp_path: Path) -> None:
    text = """\
flow: t
start: menu
nodes:
  menu:
    type: menu
    say: 请按1
    choices:
      1: nowhere
    fallback: bye
  bye:
    type: hangup
    sya: 再见
  check:
    type: branch
    cases:
      - when: {open: clinic}
        next: bye
    default: bye
"""
    assert _problems(_write(tmp_path, "bad.yaml", text)) == [
        "8:7: nodes.menu.choices.1: node 'nowhere' is not defined",
        "12:5: nodes.bye.sya: unknown key `sya`",
        "16:16: nodes.check.cases.0.when.open: opening hours 'clinic' are not defined under hours (defined: none)",
    ]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("flow: t\ndescription: caf\xe9\n".encode("latin-1"))
    assert _problems(path) == ["2:0: not UTF-8 text"]


def test_unreadable_path(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path / "missing.yaml")
    assert problem.startswith(" cannot be read")


def test_duplicate_flow_names_across_files(tmp_path: Path) -> None:
    first = _write(tmp_path, "a.yaml", VALID)
    second = _write(tmp_path, "b.yaml", VALID.replace("say: hi", "say: hello"))
    with pytest.raises(FlowError) as info:
        load_flows(tmp_path)
    assert [str(p) for p in info.value.problems] == [f"{second}:1:1: flow: flow name 'test' is also used by {first}"]


def test_load_flows_reports_every_file(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID.replace("next: bye", "next: nowhere"))
    _write(tmp_path, "b.yaml", VALID.replace("flow: test", "flow: other").replace("type: hangup", "type: hangupp"))
    with pytest.raises(FlowError) as info:
        load_flows(tmp_path)
    assert sorted({p.path.name for p in info.value.problems}) == ["a.yaml", "b.yaml"]


def test_load_flows_ignores_other_files_and_keys_by_flow_name(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID)
    _write(tmp_path, "b.yaml", VALID.replace("flow: test", "flow: other"))
    _write(tmp_path, "notes.txt", "not a flow")
    _write(tmp_path, "flow.schema.json", "{}")
    assert sorted(load_flows(tmp_path)) == ["other", "test"]


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", VALID)
    first = load_flow(path).version
    assert load_flow(path).version == first
    assert load_flow(_write(tmp_path, "copy.yaml", VALID)).version == first  # content, not path
    path.write_text(VALID.replace("say: hi", "say: hello"), encoding="utf-8")
    assert load_flow(path).version != first


# -- hot reload ---------------------------------------------------------------------------------------

MAIN = """\
flow: main
start: ask
nodes:
  ask:
    type: subflow
    flow: sub
    next: bye
  bye:
    type: hangup
"""
SUB = """\
flow: sub
start: hi
nodes:
  hi:
    type: play
    say: hi
    next: done
  done:
    type: return
"""


def test_lenient_reload_takes_valid_edits(tmp_path: Path) -> None:
    _write(tmp_path, "main.yaml", MAIN)
    _write(tmp_path, "sub.yaml", SUB)
    first, problems = load_flows_lenient(tmp_path, {})
    assert problems == []
    _write(tmp_path, "sub.yaml", SUB.replace("say: hi", "say: 您好"))
    second, problems = load_flows_lenient(tmp_path, first)
    assert problems == []
    assert second["sub"].version != first["sub"].version
    assert second["main"] == first["main"]


def test_lenient_reload_keeps_previous_version_of_broken_file(tmp_path: Path) -> None:
    _write(tmp_path, "main.yaml", MAIN)
    sub = _write(tmp_path, "sub.yaml", SUB)
    first, _ = load_flows_lenient(tmp_path, {})
    sub.write_text(SUB.replace("next: done", "next: gone"), encoding="utf-8")
    second, problems = load_flows_lenient(tmp_path, first)
    assert second["sub"] is first["sub"]
    assert second["main"] is first["main"]
    assert [str(p) for p in problems] == [
        f"{sub}:7:5: nodes.hi.next: node 'gone' is not defined",
        f"{sub}:8:3: nodes.done: node 'done' is unreachable from start 'hi'",
    ]


def test_lenient_reload_keeps_previous_version_when_a_yaml_error_hides_the_name(tmp_path: Path) -> None:
    sub = _write(tmp_path, "sub.yaml", SUB)
    first, _ = load_flows_lenient(tmp_path, {})
    sub.write_text("flow: [sub\n", encoding="utf-8")
    second, problems = load_flows_lenient(tmp_path, first)
    assert second["sub"] is first["sub"]
    assert len(problems) == 1


def test_lenient_reload_reverts_a_flow_whose_new_subflow_is_broken(tmp_path: Path) -> None:
    _write(tmp_path, "main.yaml", MAIN)
    _write(tmp_path, "sub.yaml", SUB)
    first, _ = load_flows_lenient(tmp_path, {})
    main = _write(tmp_path, "main.yaml", MAIN.replace("flow: sub", "flow: extra"))
    _write(tmp_path, "extra.yaml", SUB.replace("flow: sub", "flow: extra").replace("type: return", "type: returnn"))
    second, problems = load_flows_lenient(tmp_path, first)
    assert second["main"] is first["main"]
    assert "extra" not in second
    assert {p.path.name for p in problems} == {"extra.yaml", "main.yaml"}
    assert f"{main}:6:5: nodes.ask.flow: flow 'extra' is not defined (no file has `flow: extra`)" in map(str, problems)


def test_lenient_reload_without_previous_leaves_broken_flow_out(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID.replace("next: bye", "next: nowhere"))
    flows, problems = load_flows_lenient(tmp_path, {})
    assert flows == {}
    assert [p.message for p in problems] == [
        "node 'nowhere' is not defined",
        "node 'bye' is unreachable from start 'hello'",
    ]


@pytest.mark.parametrize("name", ["snoop", "agent", "outbound", "queue", "supervisor"])
def test_a_flow_may_not_take_a_stasis_argument_name(tmp_path: Path, name: str) -> None:
    """The service reads the first Stasis argument as a flow name unless it is one of its own legs: a flow named
    like such a leg would be misrouted, so the checker refuses the name, naming the file and the flow."""
    path = _write(tmp_path, f"{name}.yaml", VALID.replace("flow: test", f"flow: {name}"))
    with pytest.raises(FlowError) as info:
        load_flows(tmp_path)
    assert str(path) in str(info.value)
    assert f"flow name {name!r} is reserved" in str(info.value)


def test_the_reserved_flow_names_are_the_services_stasis_arguments() -> None:
    from ivr.flow_graph import RESERVED_FLOW_NAMES
    from medhotline.service import QUEUE_ARG
    from routing.ari_queue import AGENT_LEG_ARG
    from routing.supervision import SUPERVISOR_ARG
    from scheduler.outreach import OUTBOUND_ARG
    from telephony.ari_channel import SNOOP_ARG

    assert {SNOOP_ARG, AGENT_LEG_ARG, OUTBOUND_ARG, QUEUE_ARG, SUPERVISOR_ARG} <= RESERVED_FLOW_NAMES
