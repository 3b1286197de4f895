"""A throw-away PostgreSQL that takes TCP connections over TLS only, with certificates from a private CA.

Like scripts/postgres.sh (a private cluster on a free loopback port, in a temporary directory owned by the
``postgres`` user when the tests run as root), plus what docs/cluster.md asks of a production server: ``ssl = on``
with ``ssl_cert_file``/``ssl_key_file``/``ssl_ca_file`` from a CA (here ``medhotline.sandbox_pki``'s), and
``pg_hba.conf`` with ``hostssl`` lines only, so a plain TCP connection is refused by the server itself.

The server listens on two loopback addresses, ``127.0.0.1`` (the only name in its certificate) and ``127.0.0.2``
(not in it): the second is how a test reaches the server under a name its certificate does not carry.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medhotline.free_ports import free_port
from medhotline.sandbox_pki import VALIDITY, PkiFiles, ensure_test_pki, write_whole

CERT_HOST = "127.0.0.1"  # in the server certificate's subjectAltName
OTHER_HOST = "127.0.0.2"  # also loopback, the same server, but not in its certificate

# TLS for every TCP connection, nothing in clear: no ``host`` line at all, and a ``hostnossl ... reject`` so the
# refusal names the reason. The Unix socket (``local``) stays for the helper's own administration.
HBA = """\
local     all          all                 trust
hostssl   all          all  127.0.0.0/8    trust
hostssl   replication  all  127.0.0.0/8    trust
hostnossl all          all  0.0.0.0/0      reject
hostnossl replication  all  0.0.0.0/0      reject
"""


@dataclass
class TlsPostgres:
    base: Path
    port: int
    pki: PkiFiles
    other_ca: Path  # a CA certificate that did not sign the server's

    def url(self, *, host: str = CERT_HOST, ca: Path | None = None, sslmode: str = "verify-full") -> str:
        """``postgresql+psycopg://postgres@host:port/postgres?sslmode=...&sslrootcert=<ca>``."""
        query = f"sslmode={sslmode}"
        if sslmode.startswith("verify"):
            query += f"&sslrootcert={quote(str(ca or self.pki.ca_cert))}"
        return f"postgresql+psycopg://postgres@{host}:{self.port}/postgres?{query}"


def _other_ca(path: Path) -> Path:
    """A self-signed CA certificate of another name, that signed nothing: what a client trusting the wrong CA has.

    (A second sandbox CA would carry the same name as the server's issuer; OpenSSL would then report a bad
    signature rather than the unknown issuer a wrong CA file gives in practice.)"""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_whole(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    done = subprocess.run(_as_postgres(command), capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}")


def make_tls_only(base: Path, data: Path) -> PkiFiles:
    """Turn the freshly made cluster in ``data`` into a TLS-only one, with a private CA in ``base/pki``.

    Written into ``data`` (``pg_hba.conf``, ``postgresql.conf``), so a standby cloned from it with
    ``pg_basebackup`` inherits both. Returns the CA and certificates (``ca_cert`` is the clients' sslrootcert)."""
    pki = ensure_test_pki(base / "pki", [CERT_HOST])
    if os.geteuid() == 0:
        # The server reads its key as the postgres user, and insists it is 0600 and owned by it.
        for path in (pki.directory, pki.server_key, pki.server_cert, pki.ca_cert):
            shutil.chown(path, "postgres")
    (data / "pg_hba.conf").write_text(HBA, encoding="utf-8")
    settings = {
        "ssl": "on",
        "ssl_cert_file": f"'{pki.server_cert}'",
        "ssl_key_file": f"'{pki.server_key}'",
        "ssl_ca_file": f"'{pki.ca_cert}'",
        "ssl_min_protocol_version": "'TLSv1.2'",
    }
    with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    return pki


def verify_full(pki: PkiFiles) -> dict[str, str]:
    """The libpq parameters of a client that checks the server against the CA and the name it connects to."""
    return {"sslmode": "verify-full", "sslrootcert": str(pki.ca_cert)}


@contextlib.contextmanager
def tls_postgres(binaries: Path) -> Iterator[TlsPostgres]:
    """A started TLS-only PostgreSQL from ``binaries`` (its bin directory), stopped and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="medhotline-pgtls."))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    data = base / "data"
    try:
        _run([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale"])
        pki = make_tls_only(base, data)
        server = TlsPostgres(base, free_port(socket.SOCK_STREAM), pki, _other_ca(base / "other-ca.crt"))
        options = f"-p {server.port} -k {base} -c listen_addresses={CERT_HOST},{OTHER_HOST} -c fsync=off"
        log = base / "server.log"
        try:
            _run([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"])
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-1500:] if log.exists() else ''}") from None
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)
