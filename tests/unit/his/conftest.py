"""Fixtures of the HIS tests: certificates for MLLP over TLS, made here with ``cryptography`` (nothing shipped)."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from compliance.keyservice_client import KeyServiceClient
from compliance.keyservice_server import KeyServiceServer
from compliance.keystore import KeyStore


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a client certificate of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    d = tmp_path / "tls"
    d.mkdir()
    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test HIS CA", _name("test HIS CA"), ca_key, ca_key, ca=True)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    files["ca"] = d / "ca.pem"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, issuer_key, server in (
        ("server", ca_key, True),
        ("client", ca_key, False),
        ("rogue", rogue_ca_key, False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = _name("test HIS CA") if issuer_key is ca_key else _name("rogue CA")
        cert = _issue(f"test {role}", issuer, issuer_key, key, server=server)
        files[f"{role}_cert"] = d / f"{role}.pem"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = d / f"{role}.key"
        _write_key(key, files[f"{role}_key"])
    return TlsFiles(**files)


# --- the key service, in process, on a real Unix socket ----------------------------------------------------------

KEYSERVICE_TOKEN = "his-test-token-0123456789abcdef0123"


@pytest.fixture
def his_short_dir() -> Iterator[Path]:
    """A short private directory: a Unix socket path must stay under ~100 bytes, which tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="mhhis-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def his_keys(tmp_path: Path, his_short_dir: Path) -> AsyncIterator[KeyServiceClient]:
    server = KeyServiceServer(KeyStore.create(tmp_path / "keys"), KEYSERVICE_TOKEN.encode())
    socket_path = his_short_dir / "ks.sock"
    await server.start_unix_server(socket_path)
    try:
        async with KeyServiceClient.unix(socket_path, KEYSERVICE_TOKEN) as client:
            yield client
    finally:
        await server.aclose()
