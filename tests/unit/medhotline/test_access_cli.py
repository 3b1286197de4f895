"""``medhotline accounts …``, ``breakglass …`` and ``access …`` end to end through the real CLI on a SQLite file."""

from __future__ import annotations

import getpass
import re
import uuid
from pathlib import Path
from typing import Final

import pytest

from compliance.accounts import ROLES
from compliance.audit import AuditEntry, SqlAuditStore
from ground import db
from medhotline.cli import main
from medhotline.commands.access import ROLE_NAMES

PATIENT: Final = "ab" * 16
PHONE: Final = "13812345678"


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
        assert code == 1, out
        assert err.startswith("medhotline: "), err
        return err

    def audit(self) -> list[AuditEntry]:
        engine = db.make_engine(self.url)
        try:
            return [row.to_entry() for row in SqlAuditStore(engine).entries()]
        finally:
            engine.dispose()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(tmp_path, capsys)
    runner.ok("db", "upgrade")
    runner.ok("accounts", "add", "adm.zhao", "--name", "Zhao Min", "--role", "admin")
    runner.ok("accounts", "add", "dr.li", "--name", "Li Na", "--role", "physician", "--department", "cardiology")
    runner.ok("accounts", "add", "sup.chen", "--name", "Chen Jie", "--role", "supervisor", "--department", "cardiology")
    return runner


def test_the_role_names_in_the_help_are_the_roles() -> None:
    assert ", ".join(ROLES) == ROLE_NAMES


def test_accounts_add_list_show(cli: Cli) -> None:
    out = cli.ok("accounts", "add", "nurse.wu", "--name", "Wu Fang", "--role", "nurse", "--role", "agent",
                 "--department", "emergency", "--department", "cardiology")  # fmt: skip
    assert out.strip() == "account nurse.wu added: roles agent, nurse; departments cardiology, emergency"
    listing = cli.ok("accounts", "list").splitlines()
    assert [line.split()[0] for line in listing] == ["adm.zhao", "dr.li", "nurse.wu", "sup.chen"]
    assert re.fullmatch(r"nurse\.wu\s+active\s+agent,nurse\s+cardiology,emergency", listing[2])
    show = cli.ok("accounts", "show", "nurse.wu")
    assert "name         Wu Fang" in show
    assert "state        active" in show
    assert "break-glass  0 open" in show
    created = [e for e in cli.audit() if e.details.get("account") == "nurse.wu"]
    assert [(e.actor, e.role, e.action) for e in created] == [(f"os:{getpass.getuser()}", "operator",
                                                               "permission_change")]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["accounts", "add", "dr.li", "--name", "Other", "--role", "agent"], "account dr.li already exists"),
        (["accounts", "add", "n.x", "--name", "X", "--role", "wizard"],
         f"unknown role(s) wizard; roles are {ROLE_NAMES}"),
        (["accounts", "add", "N X", "--name", "X", "--role", "nurse"], "account id 'N X': use 2-64 of a-z"),
        (["accounts", "add", "n.x", "--name", "X", "--role", "admin", "--role", "nurse"],
         "role admin cannot be combined with nurse"),
        (["accounts", "show", "nobody.here"], "no account 'nobody.here'"),
        (["accounts", "roles", "nobody.here", "--role", "nurse"], "no account 'nobody.here'"),
        (["accounts", "departments", "dr.li"], "give --department D (repeatable) or --none"),
        (["accounts", "freeze", "dr.li", "--reason", " "], "freeze reason is required"),
        (["breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed"],
         "give exactly one of --patient ID or --department D"),
        (["breakglass", "open", "--as", "dr.li", "--reason", "urgent", "--patient", PATIENT],
         "at least 10 characters"),
        (["breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed", "--patient",
          PHONE], "patient id is not an opaque registry id"),
        (["breakglass", "open", "--as", "adm.zhao", "--reason", "patient unconscious, history needed",
          "--department", "cardiology"], "administrators get no patient data and cannot break glass"),
        (["breakglass", "close", "bg-aaaaaaaaaaaa", "--reason", "done"], "no break-glass grant bg-aaaaaaaaaaaa"),
        (["breakglass", "review", "17", "--as", "sup.chen", "--verdict", "justified"], "not a break-glass grant id"),
        (["access", "check", "--as", "dr.li", "--action", "read", "--kind", "clinical_note", "--patient", PHONE],
         "patient id is not an opaque registry id"),
        (["access", "check", "--as", "dr.li", "--action", "read", "--kind", "clinical_note"],
         "a clinical_note resource must name its patient"),
        (["access", "assign", "--account", "dr.li", "--patient", PATIENT, "--until", "tomorrow"],
         "--until 'tomorrow': use ISO 8601"),
        (["access", "assign", "--account", "dr.li", "--patient", PATIENT, "--until", "2030-01-01T08:00"],
         "give the UTC offset"),
    ],
)  # fmt: skip
def test_bad_input_fails_with_a_clear_message_and_changes_nothing(cli: Cli, argv: list[str], message: str) -> None:
    before = cli.ok("accounts", "list")
    entries = len(cli.audit())
    err = cli.fails(*argv)
    assert message in err
    assert PHONE not in err
    assert cli.ok("accounts", "list") == before
    assert cli.ok("breakglass", "list").strip() == "(no break-glass grants)"
    # Only a refusal by policy leaves an audit entry (a denied attempt); bad input leaves none.
    added = cli.audit()[entries:]
    assert all(e.action == "denied" for e in added)


def test_missing_required_options_are_usage_errors(cli: Cli) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("accounts", "freeze", "dr.li")
    assert exit_info.value.code == 2
    assert "--reason" in cli.capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("breakglass", "review", "bg-aaaaaaaaaaaa", "--as", "sup.chen", "--verdict", "fine")
    assert "invalid choice: 'fine'" in cli.capsys.readouterr().err


def test_role_and_department_changes_by_an_admin_and_refused_for_others(cli: Cli) -> None:
    out = cli.ok("accounts", "roles", "dr.li", "--role", "physician", "--role", "supervisor", "--by", "adm.zhao")
    assert "roles now physician, supervisor" in out
    err = cli.fails("accounts", "roles", "sup.chen", "--role", "physician", "--by", "dr.li")
    assert "role_change by dr.li refused: it needs the role admin" in err
    assert "departments now -" in cli.ok("accounts", "departments", "sup.chen", "--none", "--by", "adm.zhao")
    changes = [
        e for e in cli.audit() if e.action in ("permission_change", "denied") and e.actor != "os:" + getpass.getuser()
    ]
    assert [(e.actor, e.action, e.details.get("change") or e.details.get("attempted")) for e in changes] == [
        ("adm.zhao", "permission_change", "roles"),
        ("dr.li", "denied", "role_change"),
        ("adm.zhao", "permission_change", "departments"),
    ]
    assert "roles        supervisor" in cli.ok("accounts", "show", "sup.chen")


def test_freeze_and_unfreeze(cli: Cli) -> None:
    cli.ok("breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed",
           "--department", "emergency")  # fmt: skip
    out = cli.ok("accounts", "freeze", "dr.li", "--reason", "left the hospital", "--by", "adm.zhao")
    assert "account dr.li FROZEN" in out
    assert "1 break-glass grant(s) closed" in out
    show = cli.ok("accounts", "show", "dr.li")
    assert "FROZEN since" in show
    assert "left the hospital" in show
    assert "break-glass  0 open" in show
    err = cli.fails("breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed",
                    "--department", "emergency")  # fmt: skip
    assert "the account is frozen" in err
    check = cli("access", "check", "--as", "dr.li", "--action", "read", "--kind", "clinical_note",
                "--patient", PATIENT, "--department", "cardiology")  # fmt: skip
    assert check[0] == 1
    assert "DENIED: dr.li (physician) may not read clinical_note: the account is frozen" in check[1]
    assert "unfrozen" in cli.ok("accounts", "unfreeze", "dr.li", "--by", "adm.zhao")
    actions = [e.action for e in cli.audit() if e.action.startswith("account_") or e.action.startswith("break_glass")]
    assert actions == ["break_glass_start", "account_freeze", "break_glass_end", "account_unfreeze"]
    assert "state        active" in cli.ok("accounts", "show", "dr.li")


def test_break_glass_open_list_review_close(cli: Cli) -> None:
    out = cli.ok("breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed",
                 "--patient", PATIENT, "--minutes", "30")  # fmt: skip
    match = re.search(r"break-glass (bg-[a-z]{12}) OPEN for dr\.li \(one patient\)", out)
    assert match is not None, out
    grant = match.group(1)
    pending = cli.ok("breakglass", "list", "--pending-review")
    assert grant in pending
    assert "review pending" in pending
    assert PATIENT not in pending  # listings never show the patient's id
    assert grant in cli.ok("breakglass", "list", "--open")
    check = cli.ok("access", "check", "--as", "dr.li", "--action", "read", "--kind", "clinical_note",
                   "--patient", PATIENT, "--department", "oncology")  # fmt: skip
    assert "ALLOWED: dr.li may read clinical_note as physician: break-glass grant" in check
    assert "not audited" in check
    err = cli.fails("breakglass", "review", grant, "--as", "dr.li", "--verdict", "justified")
    assert "it needs the role supervisor" in err
    assert "reviewed by sup.chen: justified" in cli.ok("breakglass", "review", grant, "--as", "sup.chen",
                                                        "--verdict", "justified")  # fmt: skip
    assert cli.ok("breakglass", "list", "--pending-review").strip() == "(nothing pending review)"
    assert "closed (stable now, done)" in cli.ok("breakglass", "close", grant, "--reason", "stable now, done")
    assert cli.ok("breakglass", "list", "--open").strip() == "(no break-glass grants)"
    assert "0 expired break-glass grant(s)" in cli.ok("breakglass", "sweep")
    denied_check = cli("access", "check", "--as", "dr.li", "--action", "read", "--kind", "clinical_note",
                       "--patient", PATIENT, "--department", "oncology")  # fmt: skip
    assert denied_check[0] == 1
    assert "outside the account's scope" in denied_check[1]
    # What-if checks are not audited; the grant's life is.
    assert [e.action for e in cli.audit() if e.patient == PATIENT] == ["break_glass_start", "break_glass_end"]


def test_registry_ids_are_looked_up_in_the_registry(cli: Cli) -> None:
    unknown = str(uuid.uuid4())
    err = cli.fails("breakglass", "open", "--as", "dr.li", "--reason", "patient unconscious, history needed",
                    "--patient", unknown)  # fmt: skip
    assert f"no patient {unknown}" in err


def test_access_assign_and_unassign(cli: Cli) -> None:
    check = ["access", "check", "--as", "dr.li", "--action", "change", "--kind", "clinical_note", "--patient", PATIENT]
    assert cli(*check)[0] == 1
    assert "open-ended" in cli.ok("access", "assign", "--account", "dr.li", "--patient", PATIENT, "--by", "sup.chen")
    assert "basis: assigned" in cli.ok(*check)
    assert "1 responsible assignment(s)" in cli.ok("access", "unassign", "--account", "dr.li", "--patient", PATIENT)
    assert cli(*check)[0] == 1
    assert "until 2030-01-01 00:00:00Z" in cli.ok(
        "access", "assign", "--account", "dr.li", "--patient", PATIENT, "--until", "2030-01-01T08:00+08:00"
    )
    changes = [(e.actor, e.details["change"]) for e in cli.audit() if e.patient == PATIENT]
    assert changes == [("sup.chen", "assign"), (f"os:{getpass.getuser()}", "unassign"),
                       (f"os:{getpass.getuser()}", "assign")]  # fmt: skip


def test_commands_refuse_an_unmigrated_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = Cli(tmp_path, capsys)
    err = runner.fails("accounts", "list")
    assert "run `medhotline db upgrade`" in err
