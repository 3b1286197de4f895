"""``medhotline stats`` end to end through the real CLI on a SQLite file: figures, formats, access, audit."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore, StoredEntry
from ground import db
from medhotline.cli import main
from medhotline.commands.stats import window
from tests.unit.routing import stats_fixture as fx
from tests.unit.routing.test_statistics_store import T0, _write_day

REASON = "weekly service level review for the quality board"


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
        self.url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def stats(self, *argv: str) -> str:
        code, out, err = self("stats", "--from", "2026-03-02", *argv)
        assert code == 0, err
        return out

    def audit(self) -> list[StoredEntry]:
        engine = db.make_engine(self.url)
        try:
            return list(SqlAuditStore(engine).entries())
        finally:
            engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(tmp_path, capsys)
    assert runner("db", "upgrade")[0] == 0
    engine = db.make_engine(runner.url)
    try:
        _write_day(engine)
        accounts = AccountStore.for_engine(engine)
        accounts.add("sup.one", "Supervisor", ["supervisor"], T0)
        accounts.add("aud.one", "Auditor", ["auditor"], T0)
    finally:
        engine.dispose()
    return runner


def test_json_figures_match_the_hand_computed_day_and_the_read_is_audited(cli: Cli) -> None:
    report = json.loads(cli.stats("--as", "sup.one", "--format", "json"))
    for name, expected in fx.EXPECTED_TOTAL.items():
        assert report["total"][name] == pytest.approx(expected), name
    assert {g["group"]: g["received"] for g in report["groups"]} == fx.EXPECTED_QUEUES
    (entry,) = [e for e in cli.audit() if e.actor == "sup.one"]
    details = json.loads(entry.details)
    assert (entry.action, entry.role, entry.outcome) == ("read", "supervisor", "success")
    assert details["kind"] == "statistics"
    assert details["window"] == {"from": [2026, 3, 2, 0, 0], "to": [2026, 3, 3, 0, 0], "zone": "Asia/Shanghai"}


def test_table_by_agent_lists_the_agent_without_calls(cli: Cli) -> None:
    out = cli.stats("--as", "aud.one", "--by", "agent")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["physician1"][:3] == ["0", "0", "0"]
    assert rows["nurse1"][:3] == ["5", "4", "1"]  # rings, handled, missed
    assert all(s.call_id not in out for s in fx.SCRIPTS)


def test_csv_and_chart_are_exports_that_need_a_reason(cli: Cli, tmp_path: Path) -> None:
    before = len(cli.audit())
    code, _, err = cli("stats", "--as", "sup.one", "--format", "csv")
    assert code != 0
    assert "--reason" in err
    assert len(cli.audit()) == before  # refused before reading or auditing anything
    out, chart = tmp_path / "day.csv", tmp_path / "waits.svg"
    cli.stats("--as", "sup.one", "--by", "category", "--format", "csv", "--out", str(out), "--chart", str(chart),
              "--reason", REASON)  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert rows[-1]["group"] == "all"
    assert rows[-1]["received"] == "13"
    assert {r["group"] for r in rows} == {"all", "emergency", "general", "medication", "triage", "vaccination"}
    assert chart.read_text(encoding="utf-8").count("<circle") == 12
    entry = cli.audit()[-1]
    assert (entry.action, entry.reason) == ("export", REASON)


def test_a_role_without_the_statistics_is_refused_and_audited(cli: Cli) -> None:
    code, out, err = cli("stats", "--from", "2026-03-02", "--as", "nurse1")
    assert code != 0
    assert "access denied" in err
    assert out == ""
    entry = cli.audit()[-1]
    assert (entry.actor, entry.action, entry.outcome) == ("nurse1", "denied", "denied")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--from", "02/03/2026"), "expected YYYY-MM-DD"),
        (("--from", "2026-03-02", "--to", "2026-03-01"), "--to must be after --from"),
        (("--from", "2026-03-02", "--chart", "waits.png"), "SVG"),
        (("--from", "2026-03-02", "--as", "Not An Id"), "--as must be an account id"),
    ],
)
def test_bad_arguments_say_where_and_why(cli: Cli, argv: tuple[str, ...], message: str) -> None:
    args = ("--as", "sup.one", *argv) if "--as" not in argv else argv
    code, _, err = cli("stats", *args, "--reason", REASON)
    assert code != 0
    assert message in err


def test_window_rules() -> None:
    start, end = window("2026-03-01", "2026-03-07", fx.START.date())
    assert (end - start).days == 7  # a date alone in --to includes that day
    start, end = window("2026-03-02T08:00", "2026-03-02T12:30", fx.START.date())
    assert (end - start).total_seconds() == 4.5 * 3600
    start, end = window(None, None, fx.START.date())
    assert (start, end) == (fx.START, fx.END)
