"""PostgreSQL off this machine only with ``sslmode=verify-full``; the TLS parameters reach libpq unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ground.config import Config, ConfigError, load_config
from ground.db import normalise_url

REMOTE = "postgresql+psycopg://medhotline:s3cret-pw@10.0.0.21:5432,10.0.0.22:5432/medhotline"


def test_a_remote_database_without_verify_full_is_refused_without_showing_the_password(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    for url in (REMOTE, REMOTE + "?sslmode=require", "postgresql+psycopg://u@/db?host=10.0.0.21:5432"):
        path.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_config(path, environ={})
        message = str(err.value)
        assert "database: url: the database host" in message
        assert "10.0.0.21 is not on this machine" in message
        assert "sslmode=verify-full" in message
        assert "s3cret-pw" not in message


@pytest.mark.parametrize(
    "url",
    [
        REMOTE + "?sslmode=verify-full&sslrootcert=/etc/medhotline/db-ca.crt&target_session_attrs=read-write",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        "postgresql+psycopg://postgres@[::1]:5432,localhost:5433/postgres",
        "postgresql+psycopg://postgres@/postgres?host=/var/run/postgresql",
        "sqlite:////var/lib/medhotline/medhotline.db",
    ],
)
def test_local_or_verified_databases_are_accepted(url: str) -> None:
    assert Config.model_validate({"database": {"url": url}}).database.url == url


def test_the_tls_parameters_reach_libpq() -> None:
    url = make_url(normalise_url(REMOTE + "?sslmode=verify-full&sslrootcert=/etc/medhotline/db-ca.crt"))
    assert url.query["sslmode"] == "verify-full"
    assert url.query["sslrootcert"] == "/etc/medhotline/db-ca.crt"
    assert url.query["host"] == ("10.0.0.21:5432", "10.0.0.22:5432")


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("sslrootcert", "db-ca.crt"),
        ("sslrootcert", "certs%2Fdb-ca.crt"),
        ("sslcert", "./node.crt"),
        ("sslkey", "node.key"),
        ("sslcrl", "crl.pem"),
    ],
)
def test_a_relative_tls_file_is_refused_naming_the_parameter(parameter: str, value: str) -> None:
    url = REMOTE + f"?sslmode=verify-full&{parameter}={value}"
    with pytest.raises(ConfigError) as err:
        load_config(Path("/dev/null"), environ={"MEDHOTLINE__DATABASE__URL": url})
    message = str(err.value)
    assert "environment MEDHOTLINE__DATABASE__URL: database: url:" in message
    assert f"{parameter}={value.replace('%2F', '/')} is a relative path" in message
    assert "give the absolute path" in message
    assert "s3cret-pw" not in message


def test_the_system_trust_store_is_not_a_relative_path() -> None:
    url = REMOTE + "?sslmode=verify-full&sslrootcert=system&sslcert=/etc/medhotline/db-client.crt"
    assert Config.model_validate({"database": {"url": url}}).database.url == url
