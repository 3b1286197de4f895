"""The database layer over TLS to a real PostgreSQL that takes TCP over TLS only (``tests.pg_tls``).

The URL goes the service's way: through ``load_config`` (``MEDHOTLINE__DATABASE__URL``), then ``db.upgrade``,
``make_engine`` and a ``CallRepository`` write and read, with ``sslmode=verify-full`` and the CA in
``sslrootcert``. Refused, each with a ``DatabaseError`` naming the database (password masked) and libpq's reason: a
CA that did not sign the server's certificate, a host the certificate does not name, and plain TCP (by the
server's ``pg_hba.conf``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from ground import db
from ground.config import load_config
from medhotline.free_ports import free_port
from tests.pg_replication import pg_bin, replicated_postgres
from tests.pg_tls import CERT_HOST, OTHER_HOST, TlsPostgres, tls_postgres

pytestmark = pytest.mark.postgres

PASSWORD = "s3cret-pw"  # trust authentication ignores it; it is there to be masked


def _binaries() -> Path:
    binaries = pg_bin()
    if binaries is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("PostgreSQL binaries are missing in CI")
        pytest.skip("PostgreSQL binaries not installed")
    return binaries


@pytest.fixture(scope="module")
def pg() -> Iterator[TlsPostgres]:
    with tls_postgres(_binaries()) as server:
        yield server


def _ssl_of_session(url: str) -> bool:
    """Whether this session is TLS, by the server's own account (``pg_stat_ssl``), at TLS 1.2 or later."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).one()
            return bool(row.ssl) and row.version in ("TLSv1.2", "TLSv1.3")
    finally:
        engine.dispose()


def test_the_database_layer_works_over_verified_tls(pg: TlsPostgres) -> None:
    config = load_config(environ={"MEDHOTLINE_CONFIG": os.devnull, "MEDHOTLINE__DATABASE__URL": pg.url()})
    url = config.database_url
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        repo = db.CallRepository.for_engine(engine)
        repo.start(call_id="tls-1", node="A", transport="ari", channel_id="ch-1", channel_name="PJSIP/patients-1",
                   flow="main", flow_version="v1", started_at=datetime.now(UTC))  # fmt: skip
        stored = repo.get("tls-1")
        assert stored is not None
        assert stored.channel_id == "ch-1"
    finally:
        engine.dispose()
    assert _ssl_of_session(url)


def test_the_failover_url_form_connects_over_verified_tls(pg: TlsPostgres) -> None:
    # libpq's multi-host form as docs/cluster.md gives it: the first host answers nothing (a free port), the second
    # is the TLS server, verified like a single host.
    nobody = free_port(socket.SOCK_STREAM)
    url = pg.url().replace(f"@{CERT_HOST}:", f"@{CERT_HOST}:{nobody},{CERT_HOST}:", 1)
    url += "&target_session_attrs=read-write"
    config = load_config(environ={"MEDHOTLINE_CONFIG": os.devnull, "MEDHOTLINE__DATABASE__URL": url})
    assert _ssl_of_session(config.database_url)


def _refusal(url: str) -> str:
    with pytest.raises(db.DatabaseError) as err:
        db.upgrade(url)
    message = str(err.value)
    assert message.startswith("database at postgresql+psycopg://postgres:***@"), message
    assert PASSWORD not in message
    return message


def test_a_ca_that_did_not_sign_the_server_certificate_is_refused(pg: TlsPostgres) -> None:
    message = _refusal(pg.url(ca=pg.other_ca).replace("postgres@", f"postgres:{PASSWORD}@"))
    assert f"database at postgresql+psycopg://postgres:***@{CERT_HOST}:{pg.port}/postgres" in message
    assert "schema upgrade failed" in message
    assert "certificate verify failed" in message


def test_a_host_the_server_certificate_does_not_name_is_refused(pg: TlsPostgres) -> None:
    message = _refusal(pg.url(host=OTHER_HOST).replace("postgres@", f"postgres:{PASSWORD}@"))
    assert f"@{OTHER_HOST}:{pg.port}/postgres" in message
    assert f'server certificate for "{CERT_HOST}" does not match host name "{OTHER_HOST}"' in message


def test_plain_tcp_is_refused_by_the_server(pg: TlsPostgres) -> None:
    message = _refusal(pg.url(sslmode="disable").replace("postgres@", f"postgres:{PASSWORD}@"))
    assert "pg_hba.conf rejects connection" in message
    assert "no encryption" in message


def test_a_missing_ca_file_stops_the_service_at_start_naming_the_file(pg: TlsPostgres) -> None:
    missing = pg.base / "no-such-ca.crt"
    with pytest.raises(db.DatabaseError) as err:
        db.ensure_current(pg.url(ca=missing))  # what `medhotline serve` does first
    message = str(err.value)
    assert message.startswith(f"database at postgresql+psycopg://postgres@{CERT_HOST}:{pg.port}/postgres?"), message
    assert f'root certificate file "{missing}" does not exist' in message


def test_a_failover_pair_over_tls_replicates_and_serves_the_multi_host_url() -> None:
    """Primary + synchronous standby, both TLS only: the standby streams over TLS, and the service's URL form
    (both hosts, ``target_session_attrs=read-write``, verify-full) reaches the primary over TLS, here with the
    standby named first so libpq verifies it, finds it read-only and goes on to the primary."""
    _binaries()
    with replicated_postgres(tls=True) as pair:
        primary, standby = (f"{CERT_HOST}:{server.port}" for server in (pair.primary, pair.standby))
        url = pair.url.replace(f"{primary},{standby}", f"{standby},{primary}", 1)
        assert url != pair.url
        config = load_config(environ={"MEDHOTLINE_CONFIG": os.devnull, "MEDHOTLINE__DATABASE__URL": url})
        assert "sslmode=verify-full" in config.database_url
        engine = db.make_engine(config.database_url)
        try:
            with engine.connect() as connection:
                assert connection.execute(text("SELECT NOT pg_is_in_recovery()")).scalar_one()
                mine = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                assert connection.execute(text(mine)).scalar_one()
                streaming = "SELECT s.ssl, r.sync_state FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)"
                assert connection.execute(text(streaming)).one() == (True, "sync")
        finally:
            engine.dispose()
