"""``medhotline signin password|totp`` through the real CLI on a SQLite file: the change, its audit entry, refusals."""

from __future__ import annotations

import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore
from compliance.credentials import AccountCredentials
from ground import db
from medhotline.cli import main

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
        self.url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"

    def __call__(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            code = main(["--config", str(self.config), *argv])
        finally:
            sys.stdin = saved
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def audit(self) -> list[tuple[str, str, str, object]]:
        engine = db.make_engine(self.url)
        try:
            return [(e.actor, e.role, e.action, json.loads(e.details)) for e in SqlAuditStore(engine).entries()]
        finally:
            engine.dispose()

    def has_password(self, account: str) -> bool:
        engine = db.make_engine(self.url)
        try:
            with Session(engine) as session:
                return session.get(AccountCredentials, account) is not None
        finally:
            engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(tmp_path, capsys)
    assert runner("db", "upgrade")[0] == 0
    engine = db.make_engine(runner.url)
    try:
        accounts = AccountStore.for_engine(engine)
        accounts.add("zhang.wei", "Zhang Wei", ["supervisor"], T0)
        accounts.add("admin.wu", "Admin Wu", ["admin"], T0)
    finally:
        engine.dispose()
    return runner


def test_password_from_stdin_is_set_and_audited_for_the_staff_account(cli: Cli) -> None:
    code, out, err = cli("signin", "password", "zhang.wei", "--by", "admin.wu", stdin="correct horse battery\n")
    assert (code, out) == (0, "password of zhang.wei set\n"), err
    assert cli.has_password("zhang.wei")
    assert cli.audit()[-1] == (
        "admin.wu", "admin", "permission_change", {"account": "zhang.wei", "credential": "password"}
    )  # fmt: skip


def test_totp_without_the_key_service_is_refused_with_nothing_stored_or_audited(cli: Cli) -> None:
    """The secret is sealed through the key service: without it nothing is enrolled (and nothing in clear).
    The enrolment with the key service running is in test_totp_cli.py."""
    assert cli("signin", "password", "zhang.wei", stdin="correct horse battery\n")[0] == 0
    before = cli.audit()
    code, out, err = cli("signin", "totp", "zhang.wei")
    assert code != 0
    assert "key service is not running" in err
    assert "otpauth" not in out
    assert cli.audit() == before


def test_unknown_account_and_short_password_are_refused_with_nothing_stored_or_audited(cli: Cli) -> None:
    before = cli.audit()
    code, _, err = cli("signin", "password", "nobody.here", stdin="correct horse battery\n")
    assert code != 0
    assert "no account 'nobody.here'" in err
    code, _, err = cli("signin", "password", "zhang.wei", stdin="short\n")
    assert code != 0
    assert "12" in err
    assert not cli.has_password("zhang.wei")
    assert cli.audit() == before


def test_an_unknown_acting_account_changes_nothing(cli: Cli) -> None:
    """Who acts is known before anything changes: otherwise the password would be set with no audit entry."""
    before = cli.audit()
    code, _, err = cli("signin", "password", "zhang.wei", "--by", "nobody.here", stdin="correct horse battery\n")
    assert code != 0
    assert "nobody.here" in err
    assert not cli.has_password("zhang.wei")
    assert cli.audit() == before
