"""The sandbox's private CA: keys 0600 in the instance's directory, a chain a real TLS stack accepts."""

from __future__ import annotations

import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from medhotline.sandbox_pki import PkiError, ensure_test_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_pki_keys_are_private_and_the_chain_verifies(tmp_path: Path) -> None:
    files = ensure_test_pki(tmp_path / "tls", ["127.0.0.1"])
    assert _mode(files.directory) == 0o700
    for key in (files.ca_key, files.server_key, files.client_key):
        assert _mode(key) == 0o600, key
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert server.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=31)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    # A real TLS stack accepts it: the server side loads, a client trusting only the CA checks the address.
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    client_ctx.load_cert_chain(files.client_cert, files.client_key)


def test_pki_is_made_once(tmp_path: Path) -> None:
    first = ensure_test_pki(tmp_path, ["127.0.0.1"]).ca_cert.read_bytes()
    assert ensure_test_pki(tmp_path, ["127.0.0.1"]).ca_cert.read_bytes() == first


def test_pki_without_a_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="at least one host"):
        ensure_test_pki(tmp_path / "tls", [])
    assert not (tmp_path / "tls").exists()
