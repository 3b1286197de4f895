"""``medhotline complaints`` end to end on SQLite: open → refer → resolve → answer with the configured holidays,
overdue listing at a fixed time, a summary with a phone number refused (nothing stored), a bad holiday refused."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from ground import db
from medhotline.cli import main

T0 = datetime.fromisoformat("2026-09-01T00:00:00+08:00")


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str = "") -> None:
        self.capsys = capsys
        self.state = tmp_path / "state"
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(f'[service]\nstate_dir = "{self.state}"\n[complaints]\n{extra}\n', encoding="utf-8")
        self.url = f"sqlite:///{self.state / 'medhotline.db'}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


HOLIDAYS = 'holidays = ["2026-10-01", "2026-10-02", "2026-10-05", "2026-10-06", "2026-10-07"]\n'


def test_a_complaint_through_the_holiday(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys, HOLIDAYS + 'extra_workdays = ["2026-10-10"]')
    assert cli("db", "upgrade")[0] == 0
    engine = db.make_engine(cli.url)
    try:
        AccountStore.for_engine(engine).add("sup.one", "Supervisor", ["supervisor"], T0)
    finally:
        engine.dispose()
    code, out, err = cli("complaints", "open", "--as", "sup.one", "--call", "call-1", "--category", "fees",
                         "--summary", "收费项目不清楚", "--at", "2026-09-30T16:00", "--patient", "ab" * 16)  # fmt: skip
    assert code == 0, err
    assert "refer by 2026-10-09 00:00" in out  # 1-7 Oct off: Thursday 8 October is the working day
    complaint = out.split()[1]
    code, out, err = cli("complaints", "overdue", "--as", "sup.one")
    assert code == 0, err
    assert f"{complaint}  refer" in out
    assert cli("complaints", "refer", complaint, "--as", "sup.one", "--department", "finance",
               "--at", "2026-10-08T10:00")[0] == 0  # fmt: skip
    code, out, err = cli("complaints", "resolve", complaint, "--as", "sup.one", "--at", "2026-10-09T17:00")
    assert code == 0, err
    assert "answer by 2026-10-11 00:00" in out  # Saturday 10 October is worked
    assert "survey call scheduled" in out
    code, out, err = cli("complaints", "answer", complaint, "--as", "sup.one", "--score", "5",
                         "--at", "2026-10-10T09:00")  # fmt: skip
    assert code == 0, err
    assert "satisfaction 5" in out
    code, out, _ = cli("complaints", "list", "--as", "sup.one", "--all")
    assert "answered" in out
    assert "score 5" in out
    assert "0 overdue" in cli("complaints", "overdue", "--as", "sup.one")[1]


def test_bad_input_is_refused_and_stores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys)
    assert cli("db", "upgrade")[0] == 0
    engine = db.make_engine(cli.url)
    try:
        AccountStore.for_engine(engine).add("sup.one", "Supervisor", ["supervisor"], T0)
    finally:
        engine.dispose()
    code, _, err = cli("complaints", "open", "--as", "sup.one", "--call", "call-1", "--category", "fees",
                         "--summary", "回电 13800138000")  # fmt: skip
    assert code != 0
    assert "number-like" in err
    assert "13800138000" not in err
    assert "0 complaint task(s)" in cli("complaints", "list", "--as", "sup.one", "--all")[1]
    with pytest.raises(SystemExit):
        cli("complaints", "answer", "x", "--as", "sup.one", "--score", "9")


def test_a_malformed_holiday_is_refused_with_its_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys, 'holidays = ["2026-10-01", "1 Oct"]')
    code, _, err = cli("complaints", "list", "--as", "sup.one")
    assert code != 0
    assert "holidays[1]" in err
