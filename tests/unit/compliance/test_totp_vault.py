"""TOTP second factors sealed at rest, on SQLite and PostgreSQL, through a real key service on a Unix socket.

Enrol then sign in (a code good once); no clear secret in the stored bytes; a sealed secret copied onto another
account does not open; a key service that is down refuses the sign-in before the password is looked at; rows
enrolled in clear before sealing are refused until ``seal_clear`` seals them, which is idempotent and audited.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from compliance.accounts import AccountRecord, AccountStore
from compliance.audit import AuditLog
from compliance.credentials import CredentialStore, secret_bytes, secret_text, totp_code, totp_step
from compliance.keyservice_client import KeyServiceClient
from compliance.totp_vault import CLEAR_REFUSED, NOT_OPENING, SealReport, SecondFactorUnavailable, TotpVault
from tests.unit.recordings.helpers import TOKEN

AT = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
# A secret as the code before this change stored it in clear (base32 of 20 bytes).
LEGACY = secret_text(bytes(range(1, 21)))


def _account(engine: Engine, account_id: str, role: str = "supervisor") -> AccountRecord:
    accounts = AccountStore.for_engine(engine)
    accounts.add(account_id, account_id.title(), [role], AT)
    CredentialStore.for_engine(engine).set_password(account_id, PASSWORD, AT)
    found = accounts.find(account_id)
    assert found is not None
    return found


def _code(secret_b32: str, at: datetime = AT) -> str:
    return totp_code(secret_bytes(secret_b32), totp_step(at))


def _stored_bytes(engine: Engine, database_url: str) -> bytes:
    """Everything the database holds for the credentials: the SQLite files byte for byte (main file and WAL), or
    every PostgreSQL row of the table as text."""
    if engine.dialect.name == "sqlite":
        path = Path(database_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT account_credentials::text FROM account_credentials")).scalars()
        return "\n".join(rows).encode()


def _write_clear(engine: Engine, account_id: str, secret: str) -> None:
    """A row as enrolled before this change: the secret in the clear column, nothing sealed."""
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE account_credentials SET totp_secret = :s WHERE account_id = :a"),
            {"s": secret, "a": account_id},
        )


async def test_enrol_then_sign_in_with_a_code_good_once_and_no_clear_secret_stored(
    engine: Engine, database_url: str, keys: KeyServiceClient
) -> None:
    account = _account(engine, "sup.wang")
    vault = TotpVault.for_engine(engine, keys)
    secret = await vault.enroll("sup.wang", AT)
    assert len(secret_bytes(secret)) == 20
    code = _code(secret)
    assert (await vault.check(account, PASSWORD, code, AT)).ok
    replay = await vault.check(account, PASSWORD, code, AT)
    assert (replay.ok, replay.why) == (False, "second factor code already used")
    assert (await vault.check(account, PASSWORD, code, AT + timedelta(seconds=30))).why == (
        "second factor code already used"
    ), "an earlier step is not good after a later one was used"
    assert (await vault.check(account, "wrong password!", _code(secret, AT + timedelta(seconds=30)), AT)).why == (
        "wrong password"
    )
    assert (await vault.check(account, PASSWORD, "000000" if code != "000000" else "111111", AT)).why == (
        "wrong second factor code"
    )
    assert (await vault.check(account, PASSWORD, None, AT)).why == "the role needs a second factor code"
    assert (await vault.check(account, PASSWORD, _code(secret, AT + timedelta(seconds=30)), AT)).ok

    stored = _stored_bytes(engine, database_url)
    assert b"sup.wang" in stored, "the scan reads the stored rows"
    assert secret.encode() not in stored
    assert secret_bytes(secret) not in stored
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT totp_secret, totp_sealed, totp_data_key_id FROM account_credentials")
        ).one()
        purpose = connection.execute(text("SELECT purpose FROM data_keys WHERE id = :i"), {"i": row[2]}).scalar_one()
    assert row[0] is None
    assert row[1] is not None
    assert purpose == "totp"


async def test_a_sealed_secret_copied_onto_another_account_does_not_open(
    engine: Engine, keys: KeyServiceClient
) -> None:
    wang, chen = _account(engine, "sup.wang"), _account(engine, "aud.chen", "auditor")
    vault = TotpVault.for_engine(engine, keys)
    secret = await vault.enroll("sup.wang", AT)
    await vault.enroll("aud.chen", AT)
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE account_credentials SET (totp_sealed, totp_data_key_id) = "
                "(SELECT totp_sealed, totp_data_key_id FROM account_credentials WHERE account_id = 'sup.wang') "
                "WHERE account_id = 'aud.chen'"
            )
        )
    refused = await vault.check(chen, PASSWORD, _code(secret), AT)
    assert (refused.ok, refused.why) == (False, NOT_OPENING)
    assert (await vault.check(wang, PASSWORD, _code(secret), AT)).ok, "the original still opens where it belongs"


async def test_key_service_down_refuses_before_the_password_is_looked_at(
    engine: Engine, keys: KeyServiceClient, short_dir: Path
) -> None:
    account = _account(engine, "sup.wang")
    secret = await TotpVault.for_engine(engine, keys).enroll("sup.wang", AT)
    async with KeyServiceClient.unix(short_dir / "run" / "gone.sock", TOKEN) as down:
        vault = TotpVault.for_engine(engine, down)
        for password in (PASSWORD, "a wrong password"):
            with pytest.raises(SecondFactorUnavailable, match="key service is unavailable"):
                await vault.check(account, password, _code(secret), AT)
        with pytest.raises(SecondFactorUnavailable):
            await vault.enroll("sup.wang", AT)
        nurse = _account(engine, "nurse.li", "nurse")
        assert (await vault.check(nurse, PASSWORD, None, AT)).ok, "no second factor, no key service needed"
    assert (await TotpVault.for_engine(engine, keys).check(account, PASSWORD, _code(secret), AT)).ok, (
        "the failed enrolment stored nothing: the old secret still works"
    )


async def test_seal_clear_seals_rows_from_before_once_and_is_audited(
    engine: Engine, database_url: str, keys: KeyServiceClient, audit: AuditLog
) -> None:
    wang = _account(engine, "sup.wang")
    _account(engine, "aud.chen", "auditor")
    _write_clear(engine, "sup.wang", LEGACY)
    vault = TotpVault.for_engine(engine, keys, audit)
    refused = await vault.check(wang, PASSWORD, _code(LEGACY), AT)
    assert (refused.ok, refused.why) == (False, CLEAR_REFUSED), "a clear secret is never used"

    assert await vault.seal_clear(actor="admin.zhao", role="admin", reason="upgrade") == SealReport(1, 0, 0)
    assert await vault.seal_clear(actor="admin.zhao", role="admin", reason="again") == SealReport(0, 0, 0)
    assert (await vault.check(wang, PASSWORD, _code(LEGACY), AT)).ok, "the same authenticator app keeps working"
    assert (await vault.check(wang, PASSWORD, _code(LEGACY), AT)).why == "second factor code already used"
    stored = _stored_bytes(engine, database_url)
    assert b"sup.wang" in stored
    assert LEGACY.encode() not in stored, "the clear value is gone from the stored bytes, not just the column"

    # A clear value left beside a newer sealed one is blanked, not sealed over it.
    newer = await vault.enroll("aud.chen", AT)
    _write_clear(engine, "aud.chen", LEGACY)
    assert await vault.seal_clear(actor="admin.zhao", role="admin") == SealReport(0, 1, 0)
    chen = AccountStore.for_engine(engine).find("aud.chen")
    assert chen is not None
    assert (await vault.check(chen, PASSWORD, _code(newer), AT)).ok

    runs = [json.loads(e.details) for e in audit.store.entries() if e.action == "key_operation"]
    assert [(r["operation"], r.get("sealed"), r.get("blanked")) for r in runs if r["operation"] == "seal_totp"] == [
        ("seal_totp", 1, 0),
        ("seal_totp", 0, 0),
        ("seal_totp", 0, 1),
    ]


async def test_seal_clear_without_the_key_service_changes_nothing_and_audits_the_failure(
    engine: Engine, keys: KeyServiceClient, audit: AuditLog, short_dir: Path
) -> None:
    _account(engine, "sup.wang")
    _write_clear(engine, "sup.wang", LEGACY)
    async with KeyServiceClient.unix(short_dir / "run" / "gone.sock", TOKEN) as down:
        with pytest.raises(SecondFactorUnavailable):
            await TotpVault.for_engine(engine, down, audit).seal_clear(actor="admin.zhao", role="admin")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT totp_secret FROM account_credentials")).scalar_one() == LEGACY
    assert [e.outcome for e in audit.store.entries() if e.action == "key_operation"] == ["error"]
