"""A private certificate authority for the sandbox: a CA, a server and a client certificate, made with ``cryptography``.

The embedded sandbox has no hospital PKI behind it, yet TLS links (SIP over TLS, later ARI/AMI and Kamailio) must
be tested with real certificates. Each instance gets its own CA in its own directory; the private keys are
written 0600 there and never into the checkout. Production certificates come from the hospital's PKI instead
(docs/cluster.md, "Encrypted links"); nothing here is meant to be trusted outside one sandbox instance.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ground.errors import MedhotlineError

# Long enough for any test session or demo, short enough that a leaked sandbox CA soon means nothing.
VALIDITY = datetime.timedelta(days=30)


class PkiError(MedhotlineError):
    """The sandbox's certificates can't be made or read; the message names the file and why."""


@dataclass(frozen=True)
class PkiFiles:
    """Where one instance's certificates live (PEM). ``server_pem`` is certificate + key in one file."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> PkiFiles:
        return cls(
            directory=directory,
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
        )

    def complete(self) -> bool:
        paths = (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)
        return all(path.is_file() for path in paths)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medhotline sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_whole(path: Path, data: bytes, mode: int) -> None:
    """Write whole, then rename; a key file is created 0600 from the start, never readable for a moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:  # write() of a file object writes it all, os.write may stop short
        handle.write(data)
        os.fchmod(handle.fileno(), mode)
    tmp.replace(path)


def _leaf(
    common_name: str,
    hosts: list[str],
    usage: x509.ObjectIdentifier,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ensure_test_pki(directory: Path, hosts: list[str]) -> PkiFiles:
    """The instance's CA and certificates, made on first use (keys 0600, directory 0700) and kept afterwards.

    ``hosts``: IP addresses or names the server certificate must be valid for (its subjectAltName)."""
    files = PkiFiles.in_directory(directory)
    if files.complete():
        return files
    if not hosts:
        raise PkiError(f"{directory}: the server certificate needs at least one host name or address")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise PkiError(f"{directory}: can't create the certificate directory: {exc.strerror}") from None
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("medhotline sandbox CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server, server_key = _leaf(
        hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH, ca_key=ca_key, ca_name=ca_name, now=now
    )
    client, client_key = _leaf(
        "medhotline sandbox client", hosts, ExtendedKeyUsageOID.CLIENT_AUTH, ca_key=ca_key, ca_name=ca_name, now=now
    )
    pem = serialization.Encoding.PEM
    # Keys first, certificates last: complete() only says yes once everything is there.
    write_whole(files.ca_key, _key_pem(ca_key), 0o600)
    write_whole(files.server_key, _key_pem(server_key), 0o600)
    write_whole(files.client_key, _key_pem(client_key), 0o600)
    write_whole(files.ca_cert, ca_cert.public_bytes(pem), 0o644)
    write_whole(files.server_cert, server.public_bytes(pem), 0o644)
    write_whole(files.client_cert, client.public_bytes(pem), 0o644)
    return files


@dataclass(frozen=True)
class KeyServicePki:
    """Certificates for the key service's mutual-TLS listener (``[keyservice] listen``) and one node's client
    (``[keyservice] address``), issued by the instance's CA: ``ca_cert`` is ``ca_file`` on both sides."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def ensure_keyservice_pki(directory: Path, hosts: list[str], node_name: str = "node1") -> KeyServicePki:
    """The key service's server certificate (valid for ``hosts``) and ``node_name``'s client certificate, from the
    CA in ``directory`` (made with ``ensure_test_pki`` first if missing); made on first use, kept afterwards."""
    files = ensure_test_pki(directory, hosts)
    pki = KeyServicePki(
        ca_cert=files.ca_cert,
        server_cert=directory / "keyservice.crt",
        server_key=directory / "keyservice.key",
        client_cert=directory / f"keyservice-client-{node_name}.crt",
        client_key=directory / f"keyservice-client-{node_name}.key",
    )
    if all(path.is_file() for path in (pki.server_cert, pki.server_key, pki.client_cert, pki.client_key)):
        return pki
    try:
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{directory}: can't read the sandbox CA: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{files.ca_key}: not the sandbox CA's EC key")
    now = datetime.datetime.now(datetime.UTC)
    issued = (
        (
            pki.server_cert,
            pki.server_key,
            _leaf(
                "medhotline keyservice",
                hosts,
                ExtendedKeyUsageOID.SERVER_AUTH,
                ca_key=ca_key,
                ca_name=ca_cert.subject,
                now=now,
            ),
        ),
        (
            pki.client_cert,
            pki.client_key,
            _leaf(
                node_name, [node_name], ExtendedKeyUsageOID.CLIENT_AUTH, ca_key=ca_key, ca_name=ca_cert.subject, now=now
            ),
        ),
    )
    for cert_path, key_path, (cert, key) in issued:
        write_whole(key_path, _key_pem(key), 0o600)  # key first: the pair is complete once the cert is there
        write_whole(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pki
