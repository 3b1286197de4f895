"""``medhotline patients`` and ``medhotline keys`` through the real CLI entry point and a real key service process.

The key service runs as ``medhotline keyservice`` in its own process, as in production; the commands reach it
over its Unix socket with the token file it created. SQLite and PostgreSQL.
"""

from __future__ import annotations

import getpass
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore
from ground import db
from medhotline.cli import main
from tests.unit.his.test_his_registry import LI, LI_CHILD, WANG, assert_no_secret
from tests.unit.medhotline.cli_run import Run, Setup, run

ROOT = Path(__file__).resolve().parents[3]
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("reset_logging")


def test_register_find_show_rotate_rewrap(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(setup, capsys, "db", "upgrade").code == 0
    public_output: list[str] = []

    def quiet(*argv: str, stdin: str | None = None, code: int = 0) -> Run:
        """A command whose output must not hold any identifier (everything but `show`)."""
        result = run(setup, capsys, *argv, stdin=stdin)
        assert result.code == code, result.err
        public_output.extend([result.out, result.err])
        return result

    wang = quiet(
        "patients", "add", "--name", WANG.name, "--phone", WANG.phone, "--record-number", str(WANG.record_number),
        "--birth-year", "1949", "--department", "cardiology", "--national-id", str(WANG.national_id),
    ).out.strip()  # fmt: skip
    li = quiet("patients", "add", "--from-json", "-", stdin=json.dumps(
        {"name": LI.name, "phone": LI.phone, "record_number": LI.record_number, "birth_year": 1980,
         "department": "cardiology"}
    )).out.strip()  # fmt: skip
    child = quiet("patients", "add", "--from-json", "-", stdin=json.dumps(
        {"name": LI_CHILD.name, "phone": LI_CHILD.phone, "department": "pediatrics"}
    )).out.strip()  # fmt: skip
    assert len({wang, li, child}) == 3
    assert quiet("patients", "find", "--phone", "138-0013-8000").out.split() == [wang]
    found = quiet("patients", "find", "--from-json", "-", stdin='{"phone": "+86 139 1234 5678"}')
    assert found.out.split() == [li, child]
    missing = quiet("patients", "find", "--phone", "13700000000", code=1)
    assert (missing.out, "no patient registered" in missing.err) == ("", True)

    engine = db.make_engine(setup.database_url)
    try:
        accounts = AccountStore.for_engine(engine)
        # A nurse of the patients' departments: the access policy lets her read them (and audits each read).
        accounts.add("nurse.liu", "Liu Fang", ["nurse"], T0, departments=["cardiology", "pediatrics"])
        shown = run(
            setup, capsys, "patients", "show", wang, "--reason", "callback about the test results", "--as", "nurse.liu"
        )
        assert shown.code == 0, shown.err
        assert f"name:           {WANG.name}" in shown.out
        assert "phone:          13800138000" in shown.out
        assert "birth year:     1949" in shown.out

        # Rotation with the registry in use: status, rotate, reads go on, rewrap, rewrap again.
        status = quiet("keys", "status").out
        assert "current v1" in status
        assert "data keys wrapped under KEK v1: 1" in status
        assert "v2 is now current" in quiet("keys", "rotate", "--reason", "yearly rotation").out
        assert "1 data key(s) not under the current KEK" in quiet("keys", "status").out
        during = run(
            setup, capsys, "patients", "show", li, "--reason", "callback about the test results", "--as", "nurse.liu"
        )
        assert LI.name in during.out
        assert "rewrapped 1 data key(s) to KEK v2; 0 already done; 0 remaining" in quiet("keys", "rewrap").out
        assert "rewrapped 0 data key(s)" in quiet("keys", "rewrap").out
        status = quiet("keys", "status").out
        assert "data keys wrapped under KEK v2: 1" in status
        assert "KEK v1" not in status
        after = run(
            setup, capsys, "patients", "show", child, "--reason", "callback about the test results", "--as", "nurse.liu"
        )
        assert LI_CHILD.name in after.out

        # A frozen account is refused at the next request, and the refusal is audited.
        accounts.freeze("nurse.liu", "left the hospital", T0)
        refused = run(
            setup, capsys, "patients", "show", wang, "--reason", "callback about the test results", "--as", "nurse.liu"
        )
        assert refused.code == 1
        assert "nurse.liu (nurse) may not read patient_identity: the account is frozen" in refused.err
        assert WANG.name not in refused.out + refused.err
        unknown = run(
            setup,
            capsys,
            "patients",
            "show",
            wang,
            "--reason",
            "callback about the test results",
            "--as",
            "ghost.user",
            "--role",
            "nurse",
        )
        assert (unknown.code, "there is no such account" in unknown.err) == (1, True)
        # Several roles and no --role: refused before the policy is asked (nothing audited for it).
        accounts.add("nurse.ma", "Ma Li", ["nurse", "agent"], T0)
        ambiguous = run(setup, capsys, "patients", "show", wang, "--reason", "callback about the test results",
                        "--as", "nurse.ma")  # fmt: skip
        assert ambiguous.code == 1
        assert "account nurse.ma has several roles: say which one with --role" in ambiguous.err

        entries = list(SqlAuditStore(engine).entries())
    finally:
        engine.dispose()
    summary = [(e.actor, e.action, e.outcome) for e in entries]
    user = f"os:{getpass.getuser()}"
    assert (user, "key_operation", "success") in summary
    assert summary.count(("nurse.liu", "read", "success")) == 3
    assert ("nurse.liu", "denied", "denied") in summary
    assert ("ghost.user", "denied", "denied") in summary
    assert not [e for e in entries if e.actor == "nurse.ma"]
    operations = [e.details for e in entries if e.action == "key_operation"]
    assert [d.split('"operation":"')[1].split('"')[0] for d in operations] == [
        "generate_data_key", "rotate", "rewrap", "rewrap",
    ]  # fmt: skip
    for entry in entries:
        assert_no_secret(entry.canonical(), f"audit entry {entry.seq}")

    # Nothing identifying anywhere but in `show`'s own output.
    assert_no_secret("\n".join(public_output), "the commands' output")
    assert setup.log_file.exists()
    assert_no_secret(setup.log_file.read_bytes(), "the log file")
    if setup.database_url.startswith("sqlite"):
        for path in setup.state.iterdir():
            if path.is_file():
                assert_no_secret(path.read_bytes(), str(path))


def test_update_by_record_number_from_the_cli(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(setup, capsys, "db", "upgrade").code == 0
    first = run(setup, capsys, "patients", "add", "--name", LI.name, "--phone", LI.phone, "--record-number", "MRN-7")
    again = run(setup, capsys, "patients", "add", "--from-json", "-",
                stdin=json.dumps({"name": LI.name, "phone": "13600000000", "record_number": "mrn-7"}))  # fmt: skip
    assert (first.code, again.code) == (0, 0)
    assert first.out == again.out
    assert run(setup, capsys, "patients", "find", "--phone", "136 0000 0000").out == first.out


def test_commands_say_when_the_key_service_is_not_running(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(setup, capsys, "db", "upgrade").code == 0
    for argv in (("keys", "status"), ("keys", "rewrap"), ("patients", "find", "--phone", "13800138000")):
        result = run(setup, capsys, *argv)
        assert result.code == 1
        assert "the key service is not running: no socket at" in result.err
        assert "medhotline keyservice" in result.err
        assert "13800138000" not in result.err


def test_commands_refuse_an_unmigrated_database(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(setup, capsys, "keys", "status")
    assert (result.code, "run `medhotline db upgrade`" in result.err) == (1, True)


def test_help_points_to_standard_input(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    for group in ("add", "find"):
        with pytest.raises(SystemExit) as info:
            main(["--config", str(setup.config), "patients", group, "--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--from-json" in text
        assert "`ps`" in text
        assert "standard input" in text


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (("patients", "add", "--from-json", "-"), '{"name": "王秀英", "phone": 13800138000', "is not JSON at line 1"),
        (
            ("patients", "add", "--from-json", "-"),
            '{"name": "王秀英", "mobile": "13800138000"}',
            "unknown field(s) mobile",
        ),
        (("patients", "add", "--from-json", "-"), '["王秀英", "13800138000"]', "must hold one JSON object"),
        (("patients", "add", "--from-json", "-", "--name", "王秀英"), "{}", "not both"),
        (("patients", "add", "--name", "王秀英"), None, "needs --name and --phone"),
        (("patients", "add", "--name", "王秀英", "--phone", "13800138000x"), None, "phone must be 3-20 digits"),
        (("patients", "add", "--from-json", "-"), '{"name": "王秀英", "phone": 13800138000}', "phone must be text"),
        (("patients", "find", "--from-json", "-", "--phone", "13800138000"), "{}", "not both"),
        (("patients", "show", "13800138000", "--reason", "x", "--as", "nurse.liu"), None, "a patient id is a UUID"),
        (("keys", "rewrap", "--as", "王秀英"), None, "--as must be an account id"),
    ],
)
def test_bad_input_is_refused_without_echoing_identifiers(
    setup: Setup, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], stdin: str | None, message: str
) -> None:
    """Refused before the key service or the database is contacted (neither exists here)."""
    result = run(setup, capsys, *argv, stdin=stdin)
    assert result.code == 1
    assert message in result.err
    assert "王秀英" not in result.err
    assert "13800138000" not in result.err
