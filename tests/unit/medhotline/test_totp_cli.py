"""``medhotline signin totp`` and ``medhotline keys seal-totp`` through the real CLI, with the key service as its
own process, on SQLite and PostgreSQL: the secret is enrolled sealed, and a row from before sealing is sealed once."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import Engine, text

from compliance.accounts import AccountStore
from compliance.audit import SqlAuditStore
from compliance.credentials import secret_text
from ground import db
from tests.unit.medhotline.cli_run import Setup, run

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
LEGACY = secret_text(bytes(range(1, 21)))


def _engine(setup: Setup, capsys: pytest.CaptureFixture[str]) -> Engine:
    assert run(setup, capsys, "db", "upgrade").code == 0
    engine = db.make_engine(setup.database_url)
    AccountStore.for_engine(engine).add("zhang.wei", "Zhang Wei", ["supervisor"], T0)
    AccountStore.for_engine(engine).add("sun.li", "Sun Li", ["auditor"], T0)
    return engine


def _row(engine: Engine, account: str) -> tuple[str | None, str | None]:
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT totp_secret, totp_sealed FROM account_credentials WHERE account_id = :a"), {"a": account}
        ).one()
    return found[0], found[1]


@pytest.mark.usefixtures("reset_logging")
def test_signin_totp_enrols_a_sealed_secret(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(setup, capsys)
    try:
        assert run(setup, capsys, "signin", "password", "zhang.wei", stdin="correct horse battery\n").code == 0
        done = run(setup, capsys, "signin", "totp", "zhang.wei")
        assert done.code == 0, done.err
        first, uri = done.out.splitlines()
        assert first == "second factor of zhang.wei enrolled; add it to the authenticator app:"
        secret = parse_qs(urlsplit(uri).query)["secret"][0]
        clear, sealed = _row(engine, "zhang.wei")
        assert clear is None
        assert sealed is not None
        assert secret not in sealed
        actor, role, details = [(e.actor, e.role, json.loads(e.details)) for e in SqlAuditStore(engine).entries()
                                if e.action == "permission_change"][-1]  # fmt: skip
        assert (role, details) == ("operator", {"account": "zhang.wei", "credential": "totp"})
        assert actor.startswith("os:")
    finally:
        engine.dispose()


@pytest.mark.usefixtures("reset_logging")
def test_keys_seal_totp_seals_rows_from_before_once_and_audits(
    setup: Setup, keyservice_process: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(setup, capsys)
    try:
        for account in ("zhang.wei", "sun.li"):
            assert run(setup, capsys, "signin", "password", account, stdin="correct horse battery\n").code == 0
        with engine.begin() as connection:  # as the code before sealing stored it
            connection.execute(text("UPDATE account_credentials SET totp_secret = :s WHERE account_id = 'zhang.wei'"),
                               {"s": LEGACY})  # fmt: skip
        first = run(setup, capsys, "keys", "seal-totp", "--as", "admin.wu", "--reason", "upgrade to 0022")
        assert first.code == 0, first.err
        assert (
            first.out.splitlines()[0] == "sealed 1 second factor(s) stored in clear; blanked 0 superseded clear one(s)"
        )
        clear, sealed = _row(engine, "zhang.wei")
        assert clear is None
        assert sealed is not None
        assert _row(engine, "sun.li") == (None, None), "an account without a second factor stays without"
        again = run(setup, capsys, "keys", "seal-totp", "--as", "admin.wu")
        assert (again.code, again.out) == (
            0,
            "sealed 0 second factor(s) stored in clear; blanked 0 superseded clear one(s)\n",
        )
        runs = [
            (e.actor, json.loads(e.details)) for e in SqlAuditStore(engine).entries() if e.action == "key_operation"
        ]
        seals = [(actor, d["sealed"]) for actor, d in runs if d["operation"] == "seal_totp"]
        assert seals == [("admin.wu", 1), ("admin.wu", 0)]
    finally:
        engine.dispose()
