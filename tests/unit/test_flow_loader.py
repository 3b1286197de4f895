"""load_flow / load_flows: the shipped flow loads; every kind of bad file names the file and where in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivr.flow_loader import FlowError, load_flow, load_flows

REPO = Path(__file__).resolve().parents[2]

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


def _error(path: Path) -> str:
    with pytest.raises(FlowError) as info:
        load_flow(path)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(f"{path}: invalid flow:")
    return message


def test_shipped_hotline_flow_loads() -> None:
    loaded = load_flows(REPO / "dialplans")
    hotline = loaded["hotline"]
    assert hotline.flow.start == "greeting"
    assert hotline.path == REPO / "dialplans" / "hotline.yaml"
    assert len(hotline.version) == 16
    assert hotline.flow.prompt_texts()  # every prompt has text to render


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: menu\n    say: hi\n",
            ["nodes.a:", "'menu'", "'play', 'hangup'"],
            id="unknown-node-type",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: play\n    say: hi\n    next: nowhere\n",
            ["node 'a': next 'nowhere' is not defined under nodes"],
            id="missing-next-target",
        ),
        pytest.param(
            "flow: t\nstart: zz\nnodes:\n  a:\n    type: hangup\n",
            ["start node 'zz' is not defined under nodes"],
            id="start-not-defined",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n    say: hi\n    file: x/y\n",
            ["nodes.a", "give either `say` or `file`, not both"],
            id="both-say-and-file",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: play\n    next: a\n",
            ["nodes.a", "a play node needs `say` (text) or `file` (sound)"],
            id="play-without-prompt",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n    sya: hi\n",
            ["nodes.a.", ".sya: Extra inputs are not permitted"],
            id="unknown-key",
        ),
        pytest.param(
            "flow: t\nstart: a\nnodes:\n  a: [\n    type: hangup\n",
            ["line 6, column 1: not valid YAML"],
            id="yaml-syntax-error",
        ),
        pytest.param("- just\n- a list\n", ["(top level): Input should be a valid dictionary"], id="not-a-mapping"),
    ],
)
def test_bad_flow_names_file_and_place(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = _error(_write(tmp_path, "bad.yaml", text))
    for part in expected:
        assert part in message


def test_yaml_error_points_at_the_offending_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "flow: t\nstart: a\nnodes:\n  a:\n    type: hangup\n   say: misindented\n")
    assert "line 6, column 4" in _error(path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("flow: t\ndescription: caf\xe9\n".encode("latin-1"))
    assert _error(path).endswith("not UTF-8 text")


def test_unreadable_path(tmp_path: Path) -> None:
    assert "cannot be read" in _error(tmp_path / "missing.yaml")


def test_duplicate_flow_names_across_files(tmp_path: Path) -> None:
    first = _write(tmp_path, "a.yaml", VALID)
    second = _write(tmp_path, "b.yaml", VALID.replace("say: hi", "say: hello"))
    with pytest.raises(FlowError) as info:
        load_flows(tmp_path)
    assert info.value.path == second
    assert f"flow name 'test' is also used by {first}" in str(info.value)


def test_load_flows_ignores_other_files_and_keys_by_flow_name(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", VALID)
    _write(tmp_path, "b.yaml", VALID.replace("flow: test", "flow: other"))
    _write(tmp_path, "notes.txt", "not a flow")
    assert sorted(load_flows(tmp_path)) == ["other", "test"]


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", VALID)
    first = load_flow(path).version
    assert load_flow(path).version == first
    assert load_flow(_write(tmp_path, "copy.yaml", VALID)).version == first  # content, not path
    path.write_text(VALID.replace("say: hi", "say: hello"), encoding="utf-8")
    assert load_flow(path).version != first
