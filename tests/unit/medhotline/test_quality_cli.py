"""``medhotline quality check|queue`` end to end on SQLite: the rules file from the configuration, the sample key
created in the state directory, a second check doing nothing, the queue refused to a nurse, and a broken rules
file refused with its place before anything is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from ground import db
from medhotline.cli import main
from tests.unit.medhotline.test_quality_store import T0, _call

RULES = Path(__file__).parents[3] / "dialplans" / "quality" / "rules.yaml"


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: Path = RULES) -> None:
        self.capsys = capsys
        self.state = tmp_path / "state"
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(f'[service]\nstate_dir = "{self.state}"\n[quality]\nrules_file = "{rules}"\n',
                               encoding="utf-8")  # fmt: skip
        self.url = f"sqlite:///{self.state / 'medhotline.db'}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


def test_check_then_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys)
    assert cli("db", "upgrade")[0] == 0
    engine = db.make_engine(cli.url)
    try:
        accounts = AccountStore.for_engine(engine)
        accounts.add("nur.one", "Nurse", ["nurse"], T0)
        accounts.add("sup.one", "Supervisor", ["supervisor"], T0)
        flagged = _call(engine, category="diagnosis", agent="nur.one", wait=5, end=300)
    finally:
        engine.dispose()
    code, out, err = cli("quality", "check")
    assert code == 0, err
    assert "checked 1 call(s): 1 flagged, 1 for review" in out
    assert (cli.state / "quality" / "sample.key").stat().st_mode & 0o777 == 0o600
    assert "checked 0 call(s)" in cli("quality", "check")[1]
    code, out, err = cli("quality", "queue", "--as", "sup.one")
    assert code == 0, err
    assert flagged in out
    assert "diagnosis_non_physician(critical)" in out
    code, out, err = cli("quality", "queue", "--as", "nur.one")
    assert code != 0
    assert flagged not in out
    assert "quality_review" in err


def test_a_broken_rules_file_is_refused_with_its_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text(RULES.read_text(encoding="utf-8").replace("rate: 0.05", "rate: lots"), encoding="utf-8")
    cli = Cli(tmp_path, capsys, broken)
    assert cli("db", "upgrade")[0] == 0
    code, _, err = cli("quality", "check")
    assert code != 0
    assert f"{broken}:5:" in err
    assert "sample.rate" in err
    assert not (cli.state / "quality").exists()
