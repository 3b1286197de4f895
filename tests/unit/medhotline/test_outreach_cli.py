"""``medhotline dnc`` and ``medhotline reminders run-now`` through the real CLI and a real key service process.

The do-not-call list stores only the phone's keyed blind index and audits each add and remove; a reminder made
due now fires at the scheduler's next look. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from sqlalchemy import select

from compliance.audit import SqlAuditStore
from ground import db
from scheduler.tables import DoNotCall, MedicationReminder
from tests.unit.medhotline.cli_run import Run, Setup, run

pytestmark = pytest.mark.usefixtures("reset_logging")
PHONE = "13912345678"  # made up


def test_dnc_add_list_remove_keeps_only_the_index_and_audits_each_change(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(setup, capsys, "db", "upgrade").code == 0

    def ok(*argv: str, stdin: str | None = None) -> str:
        result: Run = run(setup, capsys, *argv, stdin=stdin)
        assert result.code == 0, result.err
        assert PHONE not in result.out + result.err
        return result.out.strip()

    phone = json.dumps({"phone": PHONE})
    assert ok("dnc", "list") == "0 number(s) on the do-not-call list"
    assert ok("dnc", "add", "--as", "nurse1", stdin=phone).startswith("on the do-not-call list")
    assert ok("dnc", "add", "--as", "nurse1", stdin=phone).startswith("on the do-not-call list")  # idempotent
    assert ok("dnc", "list") == "1 number(s) on the do-not-call list"
    with db.current_engine(setup.database_url) as engine, engine.connect() as connection:
        (row,) = connection.execute(select(DoNotCall)).all()
        assert PHONE not in str(tuple(row))
        assert (row.added_by, row.reason) == ("nurse1", "patient request")
        entries = [stored.to_entry() for stored in SqlAuditStore(engine).entries()]
    dnc_entries = [e for e in entries if str(e.details.get("operation", "")).startswith("dnc_")]
    assert [(e.actor, e.role, e.action, e.details["operation"]) for e in dnc_entries] == [
        ("nurse1", "operator", "change", "dnc_add"),
        ("nurse1", "operator", "change", "dnc_add"),
    ]
    assert ok("dnc", "remove", "--as", "nurse1", "--reason", "consent given", stdin=phone) == (
        "removed from the do-not-call list"
    )
    assert ok("dnc", "remove", "--as", "nurse1", stdin=phone) == "was not on the do-not-call list"
    assert ok("dnc", "list") == "0 number(s) on the do-not-call list"
    with db.current_engine(setup.database_url) as engine:
        entries = [stored.to_entry() for stored in SqlAuditStore(engine).entries()]
    removes = [e for e in entries if e.details.get("operation") == "dnc_remove"]
    assert [e.reason for e in removes] == ["consent given", "patient request"]

    refused = run(setup, capsys, "dnc", "add", stdin=PHONE)
    assert (refused.code, "on standard input" in refused.err) == (1, True)
    assert PHONE not in refused.out + refused.err


def test_reminder_run_now_makes_it_due_and_names_an_unknown_one(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(setup, capsys, "db", "upgrade").code == 0
    patient = str(uuid.uuid4())
    added = run(setup, capsys, "reminders", "add", "--patient", patient, "--at", "08:00", "--channel", "sms",
                "--medication", "氨氯地平", "--dose", "5mg")  # fmt: skip
    assert added.code == 0, added.err
    reminder = added.out.strip()
    with db.current_engine(setup.database_url) as engine, engine.connect() as connection:
        before = connection.execute(select(MedicationReminder.next_due_at)).scalar_one()
    result = run(setup, capsys, "reminders", "run-now", reminder)
    assert (result.code, result.out.strip()) == (0, f"reminder {reminder} is due now")
    with db.current_engine(setup.database_url) as engine, engine.connect() as connection:
        after = connection.execute(select(MedicationReminder.next_due_at)).scalar_one()
    assert after < before
    unknown = str(uuid.uuid4())
    missing = run(setup, capsys, "reminders", "run-now", unknown)
    assert (missing.code, missing.err.strip()) == (1, f"medhotline: no medication reminder {unknown}")
