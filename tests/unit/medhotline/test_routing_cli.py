"""``medhotline agents …`` and ``medhotline credentials …`` end to end through the real CLI on a SQLite file."""

from __future__ import annotations

import getpass
import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore, StoredEntry
from ground import db
from ground.clock import HOSPITAL_TZ_NAME
from medhotline.cli import main
from medhotline.commands.routing import LOCAL_TZ, parse_date
from routing.store import AgentStore


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp_path = tmp_path
        self.capsys = capsys
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(
            f'[service]\nstate_dir = "{tmp_path / "state"}"\n[keyservice]\ndirectory = "{tmp_path / "keys"}"\n',
            encoding="utf-8",
        )
        self.url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, err
        return out

    def fails(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code != 0, out
        assert err.startswith("medhotline: "), err
        return err

    def audit(self) -> list[StoredEntry]:
        engine = db.make_engine(self.url)
        try:
            return list(SqlAuditStore(engine).entries())
        finally:
            engine.dispose()

    def stores(self) -> tuple[AccountStore, AgentStore]:
        sessions = db.make_sessionmaker(self.url)
        return AccountStore(sessions), AgentStore(sessions)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(tmp_path, capsys)
    runner.ok("db", "upgrade")
    return runner


def today() -> date:
    return datetime.now(LOCAL_TZ).date()


def day(offset: int) -> str:
    return (today() + timedelta(days=offset)).isoformat()


def _details(entry: StoredEntry) -> dict[str, object]:
    details = json.loads(entry.details)
    assert isinstance(details, dict)
    return details


def test_commands_refuse_an_old_schema_and_migrate_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = Cli(tmp_path, capsys)
    err = runner.fails("agents", "list")
    assert "run `medhotline db upgrade`" in err
    assert db.current_revision(runner.url) is None


def test_agents_add_list_show_pause_skills(cli: Cli) -> None:
    out = cli.ok(
        "agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician",
        "--department", "cardiology", "--language", "zh", "--language", "en", "--skill", "cardiology=4",
        "--skill", "emergency_triage=3", "--contact", "sip:phys1@127.0.0.1:5071",
    )  # fmt: skip
    assert "account phys1 created with role(s) physician" in out
    assert "agent phys1 added: endpoint phys1, state ready" in out
    cli.ok("agents", "add", "desk1", "--name", "Front desk", "--endpoint", "desk-1")
    accounts, agents = cli.stores()
    assert accounts.get("desk1").roles == frozenset({"agent"})  # the default role
    view = agents.view("phys1")
    assert dict(view.agent.skills) == {"cardiology": 4, "emergency_triage": 3}
    assert view.languages == ("zh", "en")
    assert view.contact == "sip:phys1@127.0.0.1:5071"
    # Creating an account with roles is a permission change, and is audited.
    created = [e for e in cli.audit() if e.action == "permission_change"]
    assert [_details(e)["account"] for e in created] == ["phys1", "desk1"]
    assert _details(created[0])["roles"] == ["physician"]

    lines = cli.ok("agents", "list").splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ["desk1", "desk-1", "agent", "ready", "-"]
    assert lines[1].split() == ["phys1", "phys1", "physician", "ready", "-"]

    cli.ok("agents", "pause", "phys1", "--reason", "lunch")
    assert cli.ok("agents", "list").splitlines()[1].split()[3] == "paused"
    assert "state        paused (lunch)" in cli.ok("agents", "show", "phys1")
    cli.ok("agents", "unpause", "phys1")
    assert agents.view("phys1").state == "ready"

    assert "cardiology=5, pharmacology=2" in cli.ok(
        "agents", "skills", "phys1", "--skill", "cardiology=5", "--skill", "pharmacology=2"
    )
    assert dict(agents.view("phys1").agent.skills) == {"cardiology": 5, "pharmacology": 2}
    assert "skills: none" in cli.ok("agents", "skills", "phys1", "--clear")

    # An existing account becomes an agent without changing it; a differing role is refused, not ignored.
    accounts.add("nurse1", "Nurse Li", ["nurse"], datetime.now(UTC))
    err = cli.fails("agents", "add", "nurse1", "--endpoint", "nurse1", "--role", "physician")
    assert "account nurse1 already exists with roles nurse" in err
    assert agents.routing_snapshot()[-1].agent.id == "phys1"
    cli.ok("agents", "add", "nurse1", "--endpoint", "nurse1", "--role", "nurse")
    assert agents.view("nurse1").agent.roles == frozenset({"nurse"})


def test_freeze_and_unfreeze_are_audited_and_take_the_agent_out(cli: Cli) -> None:
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician")
    before = len(cli.audit())
    out = cli.ok("agents", "freeze", "phys1", "--reason", "left the hospital")
    assert "account phys1 FROZEN" in out
    _, agents = cli.stores()
    assert agents.view("phys1").state == "frozen"
    assert agents.reserve("phys1", "call-1", "node1", datetime.now(UTC)) is False
    assert cli.ok("agents", "list").split()[3] == "frozen"
    assert "frozen since" in cli.ok("agents", "show", "phys1")
    entries = cli.audit()[before:]
    assert [(e.action, e.actor, e.role, e.outcome, e.reason) for e in entries] == [
        ("account_freeze", f"os:{getpass.getuser()}", "operator", "success", "left the hospital")
    ]
    assert _details(entries[0]) == {
        "account": "phys1",
        "epoch": 1,
        "grants_closed": 0,
        "sessions_closed": 0,
        "calls_ended": 0,
    }

    cli.ok("agents", "unfreeze", "phys1", "--reason", "came back")
    assert agents.view("phys1").state == "ready"
    assert [(e.action, e.reason) for e in cli.audit()[before + 1 :]] == [("account_unfreeze", "came back")]


def test_a_freeze_the_audit_log_would_refuse_changes_nothing(cli: Cli) -> None:
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1")
    before = len(cli.audit())
    err = cli.fails("agents", "freeze", "phys1", "--reason", "called from 13800138000")
    assert "holds no patient identifiers" in err
    assert "13800138000" not in err  # the refused text is not echoed
    accounts, _ = cli.stores()
    assert accounts.get("phys1").frozen is False
    assert len(cli.audit()) == before


def test_credentials_add_verify_revoke_list(cli: Cli) -> None:
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician")
    cli.ok("agents", "add", "admin1", "--name", "Medical Affairs", "--endpoint", "admin1", "--role", "admin")
    certificate = cli.tmp_path / "licence.pdf"
    content = b"%PDF-1.4 CERTIFICATE-COPY-OF-DR-WANG-" + bytes(range(256))
    certificate.write_bytes(content)
    out = cli.ok(
        "credentials", "add", "phys1", "--kind", "physician_license", "--number", "PL-44-0001",
        "--issuer", "Health Commission", "--valid-from", day(-400), "--valid-until", day(400),
        "--certificate", str(certificate),
    )  # fmt: skip
    assert "credential #1 (physician_license) added to phys1, not verified yet" in out
    _, agents = cli.stores()
    record = agents.credential(1)
    assert record.certificate_sha256 == hashlib.sha256(content).hexdigest()
    # Dates are 00:00 China Standard Time.
    assert record.valid_from == parse_date(day(-400), "x")
    assert record.valid_from.astimezone(LOCAL_TZ).hour == 0
    # Only the digest is stored, never the certificate itself.
    database = (cli.tmp_path / "state" / "medhotline.db").read_bytes()
    assert b"CERTIFICATE-COPY" not in database

    assert agents.reserve("phys1", "c1", "node1", datetime.now(UTC), [["physician_license"]]) is False
    before = len(cli.audit())
    assert "verified by admin1" in cli.ok("credentials", "verify", "1", "--by", "admin1")
    assert agents.reserve("phys1", "c1", "node1", datetime.now(UTC), [["physician_license"]]) is True
    agents.release("phys1", "c1")
    verified = cli.audit()[before:]
    assert [(e.action, e.actor) for e in verified] == [("permission_change", "admin1")]
    assert _details(verified[0]) == {"credential_id": 1, "account": "phys1", "kind": "physician_license"}

    assert "physician_license" in cli.ok("agents", "list")
    listing = cli.ok("credentials", "list", "--agent", "phys1")
    assert f"{day(-400)} to {day(400)}" in listing
    assert "valid; verified" in listing
    assert "by admin1" in listing

    cli.ok("credentials", "revoke", "1", "--reason", "suspended by the board")
    assert agents.reserve("phys1", "c2", "node1", datetime.now(UTC), [["physician_license"]]) is False
    revoked = cli.audit()[before + 1 :]
    assert [(e.action, e.actor, e.reason) for e in revoked] == [
        ("permission_change", f"os:{getpass.getuser()}", "suspended by the board")
    ]
    assert "revoked" in cli.ok("credentials", "list")
    assert "valid today: none" in cli.ok("agents", "show", "phys1")


def test_credentials_check_exit_codes(cli: Cli) -> None:
    cli.ok("agents", "add", "admin1", "--name", "Medical Affairs", "--endpoint", "admin1", "--role", "admin")
    cli.ok("agents", "add", "nurse1", "--name", "Nurse Li", "--endpoint", "nurse1", "--role", "nurse")
    code, out, _ = cli("credentials", "check")
    assert code == 0
    assert "0 expired, 0 expiring within 30 days, 0 unverified" in out

    def add(kind: str, valid_from: str, valid_until: str) -> None:
        cli.ok(
            "credentials", "add", "nurse1", "--kind", kind, "--number", "N-1", "--issuer", "Board",
            "--valid-from", valid_from, "--valid-until", valid_until,
        )  # fmt: skip

    add("nurse_license", day(-100), day(300))
    code, out, _ = cli("credentials", "check")
    assert code == 1  # unverified
    assert "nurse1: #1 nurse_license N-1 not verified" in out
    cli.ok("credentials", "verify", "1", "--by", "admin1")
    assert cli("credentials", "check")[0] == 0

    add("vaccination_training", day(-300), day(10))
    cli.ok("credentials", "verify", "2", "--by", "admin1")
    code, out, _ = cli("credentials", "check")
    assert code == 1
    # Valid until 00:00 CST ten days from today: nine or ten whole days left, depending on the time of day.
    assert re.search(r"nurse1: #2 vaccination_training N-1 expires in (9|10) day\(s\)", out), out
    assert cli("credentials", "check", "--within-days", "5")[0] == 0

    add("pharmacist_license", day(-300), day(-1))
    cli.ok("credentials", "verify", "3", "--by", "admin1")
    code, out, _ = cli("credentials", "check", "--within-days", "5")
    assert code == 1
    assert "1 expired" in out
    cli.ok("credentials", "revoke", "3", "--reason", "left pharmacy duty")
    assert cli("credentials", "check", "--within-days", "5")[0] == 0


def test_bad_input_is_refused_with_a_clear_message(cli: Cli) -> None:
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician")
    cases: list[tuple[list[str], str]] = [
        (["agents", "show", "ghost"], "no agent 'ghost'"),
        (["agents", "pause", "ghost", "--reason", "x"], "no agent 'ghost'"),
        (["agents", "freeze", "ghost", "--reason", "left"], "no account 'ghost'"),
        (["agents", "skills", "ghost", "--skill", "a=1"], "no agent 'ghost'"),
        (["agents", "skills", "phys1", "--skill", "cardiology:4"], "--skill 'cardiology:4': expected NAME=LEVEL"),
        (["agents", "skills", "phys1", "--skill", "cardiology=9"], "proficiency 9 is not a whole number from 1 to 5"),
        (["agents", "skills", "phys1"], "--clear"),
        (["agents", "add", "nurse9", "--endpoint", "nurse9"], "give --name to create it"),
        (["agents", "add", "nurse9", "--name", "N", "--endpoint", "phys1"], "endpoint 'phys1' is already used"),
        (["agents", "add", "nurse9", "--name", "N", "--endpoint", "n9", "--role", "wizard"], "unknown role(s) wizard"),
        (["agents", "add", "Nurse9", "--name", "N", "--endpoint", "n9"], "account id 'Nurse9'"),
        (["agents", "add", "nurse9", "--name", "N", "--endpoint", "n 9"], "endpoint 'n 9'"),
        (["agents", "add", "nurse9", "--name", "N", "--endpoint", "n9", "--skill", "x=1=2"], "--skill 'x=1=2'"),
        (
            ["credentials", "add", "ghost", "--kind", "nurse_license", "--number", "1", "--issuer", "B",
             "--valid-from", "2024-01-01", "--valid-until", "2030-01-01"],
            "no account 'ghost'",
        ),
        (
            ["credentials", "add", "phys1", "--kind", "nurse_license", "--number", "1", "--issuer", "B",
             "--valid-from", "2024-02-30", "--valid-until", "2030-01-01"],
            "--valid-from '2024-02-30'",
        ),
        (
            ["credentials", "add", "phys1", "--kind", "nurse_license", "--number", "1", "--issuer", "B",
             "--valid-from", "01/02/2024", "--valid-until", "2030-01-01"],
            "expected a date YYYY-MM-DD",
        ),
        (
            ["credentials", "add", "phys1", "--kind", "nurse_license", "--number", "1", "--issuer", "B",
             "--valid-from", "2030-01-01", "--valid-until", "2024-01-01"],
            "--valid-until 2024-01-01 must be after --valid-from 2030-01-01",
        ),
        (
            ["credentials", "add", "phys1", "--kind", "nurse_license", "--number", "1", "--issuer", "B",
             "--valid-from", "2024-01-01", "--valid-until", "2030-01-01", "--certificate", "/nonexistent/c.pdf"],
            "--certificate /nonexistent/c.pdf: cannot read",
        ),
        (["credentials", "verify", "7", "--by", "phys1"], "no credential 7"),
        (["credentials", "verify", "seven", "--by", "phys1"], "credential 'seven': expected a positive number"),
        (["credentials", "revoke", "0", "--reason", "x"], "credential '0'"),
        (["credentials", "list", "--agent", "ghost"], "no account 'ghost'"),
        (["credentials", "check", "--within-days", "-3"], "--within-days '-3'"),
    ]  # fmt: skip
    for argv, message in cases:
        err = cli.fails(*argv)
        assert message in err, (argv, err)
    # Nothing of the refused commands was written.
    accounts, agents = cli.stores()
    assert [a.id for a in accounts.list()] == ["phys1"]
    assert [v.agent.id for v in agents.routing_snapshot()] == ["phys1"]
    assert agents.credentials() == []
    assert agents.view("phys1").agent.skills == {}


def test_help_states_the_time_zone_of_dates(cli: Cli) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("credentials", "add", "--help")
    assert exit_info.value.code == 0
    out = cli.capsys.readouterr().out
    assert HOSPITAL_TZ_NAME in out  # the zone by name: the one the scheduler uses, not a fixed offset


def test_agents_freeze_is_the_same_operation_as_accounts_freeze(cli: Cli) -> None:
    """`agents freeze` closes grants and call assignments and audits them, exactly as `accounts freeze` does."""
    from compliance.access_store import AccessControl

    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician")
    cli.ok("breakglass", "open", "--as", "phys1", "--reason", "patient unconscious, history needed",
           "--department", "emergency")  # fmt: skip
    engine = db.make_engine(cli.url)
    try:
        AccessControl.for_engine(engine).begin_call_assignment("phys1", "ab" * 16, "call-1", datetime.now(UTC))
    finally:
        engine.dispose()
    out = cli.ok("agents", "freeze", "phys1", "--reason", "left the hospital")
    assert "1 break-glass grant(s) closed" in out
    assert "1 call assignment(s) ended" in out
    entries = cli.audit()
    assert [e.action for e in entries[-2:]] == ["account_freeze", "break_glass_end"]
    assert "break-glass  0 open" in cli.ok("accounts", "show", "phys1")
    assert "assignments  0 responsible, 0 current call" in cli.ok("accounts", "show", "phys1")


def test_agents_freeze_by_an_account_checks_its_role(cli: Cli) -> None:
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1", "--role", "physician")
    cli.ok("agents", "add", "phys2", "--name", "Dr Zhou", "--endpoint", "phys2", "--role", "physician")
    err = cli.fails("agents", "freeze", "phys1", "--reason", "left the hospital", "--by", "phys2")
    assert "needs the role admin or supervisor" in err
    accounts, _ = cli.stores()
    assert accounts.get("phys1").frozen is False


@pytest.mark.parametrize("login", ["ops.wang", None])
def test_the_operator_at_the_shell_has_one_audit_identity_across_commands(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, login: str | None
) -> None:
    """`agents add` (routing) and `accounts add` (compliance) audit the same operator the same way, also when the
    login name cannot be had (no passwd entry in a container)."""

    def getuser() -> str:
        if login is None:
            raise OSError("no login name")
        return login

    monkeypatch.setattr(getpass, "getuser", getuser)
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1")
    cli.ok("accounts", "add", "nurse.wu", "--name", "Wu Fang", "--role", "nurse")
    first, second = cli.audit()[-2:]
    assert (first.actor, first.role) == (second.actor, second.role)
    assert first.actor == (f"os:{login}" if login else "os:unknown")


@pytest.mark.parametrize(
    "argv",
    [
        ["agents", "freeze", "phys1", "--reason", "left the hospital", "--by", ""],
        ["accounts", "freeze", "phys1", "--reason", "left the hospital", "--by", ""],
        ["recordings", "hold", "rec-1", "--reason", "court order", "--as", ""],
        ["surge", "off", "--reason", "over", "--as", ""],
    ],
)
def test_an_empty_account_names_nobody_in_any_command(cli: Cli, argv: list[str]) -> None:
    """An empty ``--as``/``--by`` (a script's unset variable) is refused by every command, naming the option,
    before anything changes: it is not taken for the operator at the shell by some commands and refused by
    others, which gave one operator an audit identity that depended on the command."""
    cli.ok("agents", "add", "phys1", "--name", "Dr Wang", "--endpoint", "phys1")
    before = len(cli.audit())
    err = cli.fails(*argv)
    assert "account id" in err, err
    accounts, _ = cli.stores()
    assert accounts.get("phys1").frozen is False
    assert len(cli.audit()) == before
