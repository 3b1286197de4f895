"""``medhotline keywords classify|check``: the stdin/stdout contract and the lexicon check."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from medhotline.cli import main

CATEGORIES = {"emergency", "diagnosis", "medication", "adverse_reaction", "vaccination", "appointment", "general"}


class _Stdin:
    """Stands in for ``sys.stdin``: the command reads ``.buffer`` (bytes)."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MEDHOTLINE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./medhotline.toml
    return tmp_path


def _classify(monkeypatch: pytest.MonkeyPatch, data: bytes) -> int:
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    return main(["keywords", "classify"])


def test_classify_contract(
    no_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = "我爸胸口疼得厉害，喘不上气\n\n   \r\n没有胸痛，想问降压药怎么吃\r\n停车场在哪".encode()
    assert _classify(monkeypatch, data) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3  # blank lines skipped, last line without newline read
    objects = [json.loads(line) for line in lines]
    for obj in objects:
        # The contract of the first release, with the triage fields added (never removed or renamed).
        assert set(obj) == {
            "text",
            "emergency",
            "category",
            "matched",
            "level",
            "confidence",
            "discriminator",
            "confirm",
        }
        assert isinstance(obj["emergency"], bool)
        assert obj["level"] in ("emergency", "urgent", "routine")
        assert isinstance(obj["confidence"], float)
        assert 0.0 <= obj["confidence"] <= 1.0
        assert isinstance(obj["discriminator"], str)
        assert isinstance(obj["confirm"], bool)
        assert (obj["level"] == "emergency") == obj["emergency"]
        assert obj["category"] in CATEGORIES
        for match in obj["matched"]:
            assert set(match) == {"term", "start", "end"}
            assert obj["text"][match["start"] : match["end"]] == match["term"]
    first = {key: objects[0][key] for key in ("text", "emergency", "category", "matched")}
    assert first == {
        "text": "我爸胸口疼得厉害，喘不上气",
        "emergency": True,
        "category": "emergency",
        "matched": [{"term": "胸口疼", "start": 2, "end": 5}, {"term": "喘不上气", "start": 9, "end": 13}],
    }
    assert objects[1]["text"] == "没有胸痛，想问降压药怎么吃"
    assert (objects[1]["emergency"], objects[1]["category"]) == (False, "medication")
    assert (objects[2]["emergency"], objects[2]["category"], objects[2]["level"]) == (False, "general", "routine")
    assert "胸口疼" in lines[0]  # UTF-8 text, not \\u escapes
    assert "Traceback" not in captured.err


def test_classify_empty_input(
    no_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _classify(monkeypatch, b"") == 0
    assert capsys.readouterr().out == ""


def test_classify_invalid_utf8(
    no_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = "胸口疼\n".encode() + b"\xe8\x83\xff\n" + "中风\n".encode()
    assert _classify(monkeypatch, data) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "medhotline: stdin line 2 is not valid UTF-8 (byte 1 of the line)"
    assert "Traceback" not in captured.err
    assert len(captured.out.splitlines()) == 1  # the good line before it was answered


def test_classify_bad_lexicon(
    no_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lexicon = no_config / "lexicon"
    lexicon.mkdir()
    (lexicon / "a.yaml").write_text("terms: [\n", encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", _Stdin("中风\n".encode()))
    assert main(["keywords", "classify", "--lexicon", str(lexicon)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "1 problem in the keyword lexicon" in captured.err
    assert f"{lexicon / 'a.yaml'}:2:1: not valid YAML" in captured.err


def test_check_ok(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keywords", "check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_check_problems(no_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = no_config / "bad.yaml"
    path.write_text("terms:\n  - term: 中风\n    category: urgent\n    severity: critical\n", encoding="utf-8")
    assert main(["keywords", "check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:3:5: terms.0.category: ")
    assert out[-1] == "1 problem in 1 file"
