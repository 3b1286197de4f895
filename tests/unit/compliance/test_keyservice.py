"""The key service over real sockets: authentication, operations, refusals, framing errors, mutual TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import os
import signal
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from compliance.fields import BlindIndex, FieldCipher, FieldDecryptError
from compliance.keyservice_client import KeyServiceClient
from compliance.keyservice_protocol import (
    MAX_FRAME_SIZE,
    FrameDecoder,
    KeyServiceError,
    KeyServiceProtocolError,
    KeyServiceRefused,
    KeyServiceUnavailable,
    decode_body,
    encode_frame,
    frame_length,
    parse_response,
)
from compliance.keyservice_server import KeyServiceServer, mutual_tls_server_context, run_keyservice
from compliance.keystore import KeyStore, wrapped_version

TOKEN = "client-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory: a Unix socket path must stay under ~100 bytes, which tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="mhks-"))
    try:
        yield path
    finally:
        for child in sorted(path.rglob("*"), reverse=True):
            if child.is_dir() and not child.is_symlink():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def store(keydir: Path) -> KeyStore:
    return KeyStore.create(keydir)


@pytest.fixture
def socket_path(short_dir: Path) -> Path:
    return short_dir / "run" / "ks.sock"


@contextlib.asynccontextmanager
async def serving(server: KeyServiceServer, socket_path: Path) -> AsyncIterator[asyncio.Server]:
    listener = await server.start_unix_server(socket_path)
    try:
        yield listener
    finally:
        await server.aclose()


@pytest.fixture
async def unix_service(store: KeyStore, socket_path: Path) -> AsyncIterator[Path]:
    async with serving(KeyServiceServer(store, TOKEN.encode()), socket_path):
        yield socket_path


class RawConnection:
    """A hand-driven connection that records every byte the service sends back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = bytearray()

    @classmethod
    async def open(cls, socket_path: Path) -> RawConnection:
        return cls(*await asyncio.open_unix_connection(str(socket_path)))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send_raw(encode_frame(message))
        return await self.read()

    async def read(self) -> dict[str, Any]:
        header = await asyncio.wait_for(self.reader.readexactly(4), 5)
        body = await asyncio.wait_for(self.reader.readexactly(frame_length(header)), 5)
        self.received += header + body
        return decode_body(body)

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw(socket_path: Path, *, auth: bool = True) -> AsyncIterator[RawConnection]:
    connection = await RawConnection.open(socket_path)
    try:
        if auth:
            assert (await connection.call({"op": "auth", "id": "a", "token": TOKEN}))["ok"] is True
        yield connection
    finally:
        await connection.close()


# --- authenticated use through the client ------------------------------------------------------------------------


async def test_authenticated_client_works(unix_service: Path) -> None:
    async with KeyServiceClient.unix(unix_service, TOKEN) as client:
        status = await client.status()
        assert status.versions == (1,)
        assert status.current == 1
        generated = await client.generate_data_key("patients.name")
        assert generated.version == 1
        async with client.data_key(generated.wrapped, "patients.name") as dek:
            assert dek == generated.plain
            held = dek
        assert held == bytearray(32)  # zeroed on exit
        index = await BlindIndex(client, "patients.phone").index("+86 138 0013 8000")
        assert index == await client.blind_index("13800138000", "patients.phone")
        assert len(index) == 64


async def test_rotation_and_rewrap_through_the_service(unix_service: Path) -> None:
    """50 fields under data keys from the service; rotate; rewrap every wrapped key; all data still reads."""
    rows: list[tuple[int, str, bytes, str]] = []
    async with KeyServiceClient.unix(unix_service, TOKEN) as client:
        for row in range(50):
            async with client.new_data_key("notes") as generated:
                value = f"随访记录 {row}: 血压 130/85"
                token = FieldCipher.single(generated.plain).encrypt(value, table="calls", column="notes", row_id=row)
                rows.append((row, value, generated.wrapped, token))
        assert await client.rotate() == 2
        status = await client.status()
        assert (status.versions, status.current) == ((1, 2), 2)
        # Old KEK is decrypt-only: v1 keys still unwrap, new keys and rewraps are v2.
        async with client.data_key(rows[0][2], "notes") as dek:
            assert FieldCipher.single(dek).decrypt(rows[0][3], table="calls", column="notes", row_id=0) == rows[0][1]
        assert (await client.generate_data_key("notes")).version == 2
        rewrapped = [(row, value, await client.rewrap(wrapped, "notes"), token) for row, value, wrapped, token in rows]
        for row, value, wrapped, token in rewrapped:
            assert wrapped_version(wrapped) == 2
            async with client.data_key(wrapped, "notes") as dek:
                cipher = FieldCipher.single(dek)
                assert cipher.decrypt(token, table="calls", column="notes", row_id=row) == value
                with pytest.raises(FieldDecryptError):
                    cipher.decrypt(token, table="calls", column="notes", row_id=row + 1)


async def test_wrong_purpose_is_refused_with_unwrap_failed(unix_service: Path) -> None:
    async with KeyServiceClient.unix(unix_service, TOKEN) as client:
        generated = await client.generate_data_key("patients.phone")
        with pytest.raises(KeyServiceRefused) as info:
            await client.unwrap(generated.wrapped, "patients.name")
        assert info.value.code == "unwrap_failed"
        assert (await client.status()).current == 1  # the connection survives a refused request


# --- refusals ---------------------------------------------------------------------------------------------------


async def test_wrong_token_refused(unix_service: Path) -> None:
    async with KeyServiceClient.unix(unix_service, "not-the-token-at-all") as client:
        with pytest.raises(KeyServiceRefused) as info:
            await client.status()
    assert info.value.code == "unauthorized"


async def test_request_before_auth_refused_and_closed(unix_service: Path) -> None:
    async with raw(unix_service, auth=False) as connection:
        response = await connection.call({"op": "generate_data_key", "id": "1", "purpose": "x"})
        assert response["ok"] is False
        assert response["error"]["code"] == "unauthorized"
        assert "plain" not in response
        assert await connection.at_eof()


async def test_peer_uid_not_allowed_refused(store: KeyStore, socket_path: Path) -> None:
    server = KeyServiceServer(store, TOKEN.encode(), allowed_uids={os.geteuid() + 4242})
    async with serving(server, socket_path), KeyServiceClient.unix(socket_path, TOKEN) as client:
        with pytest.raises(KeyServiceRefused) as info:
            await client.status()
    assert info.value.code == "unauthorized"


async def test_socket_is_private(unix_service: Path) -> None:
    assert stat.S_IMODE(os.stat(unix_service).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(unix_service.parent).st_mode) == 0o700


async def test_second_service_on_the_same_socket_refused(store: KeyStore, unix_service: Path) -> None:
    with pytest.raises(KeyServiceError, match="already listening"):
        await KeyServiceServer(store, TOKEN.encode()).start_unix_server(unix_service)


async def test_service_unavailable(short_dir: Path) -> None:
    async with KeyServiceClient.unix(short_dir / "absent.sock", TOKEN) as client:
        with pytest.raises(KeyServiceUnavailable):
            await client.status()


@pytest.mark.parametrize("op", ["export_kek", "get_kek", "read_key", "dump"])
async def test_kek_export_is_an_unknown_op(unix_service: Path, op: str) -> None:
    async with raw(unix_service) as connection:
        response = await connection.call({"op": op, "id": "7", "version": 1})
        assert response == {
            "id": "7",
            "ok": False,
            "error": {"code": "unknown_op", "message": f"unknown operation '{op}'"},
        }
        assert (await connection.call({"op": "status", "id": "8"}))["ok"] is True


async def test_responses_never_contain_kek_bytes(unix_service: Path, keydir: Path) -> None:
    """Every operation, valid or not, in one session: no response byte sequence holds any key file's content."""
    async with raw(unix_service) as connection:
        generated = await connection.call({"op": "generate_data_key", "id": "1", "purpose": "p"})
        wrapped = generated["wrapped"]
        requests: list[dict[str, Any]] = [
            {"op": "unwrap", "id": "2", "wrapped": wrapped, "purpose": "p"},
            {"op": "rewrap", "id": "3", "wrapped": wrapped, "purpose": "p"},
            {"op": "rotate", "id": "4"},
            {"op": "status", "id": "5"},
            {"op": "blind_index", "id": "6", "value": "13800138000", "purpose": "p"},
            {"op": "export_kek", "id": "7", "version": 1},
            {"op": "kek", "id": "8"},
            {"op": "unwrap", "id": "9", "wrapped": "AAAA", "purpose": "p"},
            {"op": "generate_data_key", "id": "10", "purpose": "p"},
            {"op": "auth", "id": "11", "token": TOKEN},
        ]
        for message in requests:
            await connection.call(message)
        received = bytes(connection.received)
    key_files = [keydir / name for name in os.listdir(keydir) if name.endswith(".key")]
    assert {path.name for path in key_files} == {"kek-v1.key", "kek-v2.key", "blind-index.key"}
    for path in key_files:
        key = path.read_bytes()
        for form in (
            key,
            base64.urlsafe_b64encode(key).rstrip(b"="),
            base64.b64encode(key).rstrip(b"="),
            key.hex().encode(),
        ):
            assert form not in received, path.name


async def test_requests_logged_without_key_material_or_values(unix_service: Path) -> None:
    with capture_logs() as logs:
        async with KeyServiceClient.unix(unix_service, TOKEN) as client:
            generated = await client.generate_data_key("patients.phone")
            await client.blind_index("13800138000", "patients.phone")
            await client.unwrap(generated.wrapped, "patients.phone")
    requests = [entry for entry in logs if entry["event"] == "keyservice_request"]
    assert [(e["op"], e["outcome"]) for e in requests] == [
        ("auth", "ok"),
        ("generate_data_key", "ok"),
        ("blind_index", "ok"),
        ("unwrap", "ok"),
    ]
    assert requests[1]["purpose"] == "patients.phone"
    text = repr(logs)
    assert "13800138000" not in text
    assert TOKEN not in text
    assert base64.urlsafe_b64encode(bytes(generated.plain)).decode() not in text
    assert base64.urlsafe_b64encode(generated.wrapped).decode() not in text


# --- framing errors ---------------------------------------------------------------------------------------------


async def test_oversize_frame_rejected_and_closed(unix_service: Path) -> None:
    async with raw(unix_service) as connection:
        await connection.send_raw((MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
        response = await connection.read()
        assert response["error"]["code"] == "frame_too_large"
        assert await connection.at_eof()


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x02[]", b"\x00\x00\x00\x02\xff\xfe", b"\x00\x00\x00\x00"],
    ids=["not-json", "not-object", "not-utf8", "empty"],
)
async def test_garbage_gets_clear_error_and_close_while_others_are_served(unix_service: Path, garbage: bytes) -> None:
    async with raw(unix_service) as other, raw(unix_service) as connection:
        await connection.send_raw(garbage)
        response = await connection.read()
        assert response["ok"] is False
        assert response["error"]["code"] == "bad_frame"
        assert response["error"]["message"]
        assert await connection.at_eof()
        assert (await other.call({"op": "status", "id": "s"}))["ok"] is True
    async with KeyServiceClient.unix(unix_service, TOKEN) as client:
        assert (await client.status()).current == 1


async def test_garbage_before_auth_also_refused(unix_service: Path) -> None:
    async with raw(unix_service, auth=False) as connection:
        await connection.send_raw(b"GET / HTTP/1.1\r\n\r\n")
        assert (await connection.read())["error"]["code"] == "frame_too_large"
        assert await connection.at_eof()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"op": "unwrap", "id": "1", "wrapped": "###", "purpose": "p"}, "bad_request"),
        ({"op": "unwrap", "id": "1", "purpose": "p"}, "bad_request"),
        ({"op": "generate_data_key", "id": "1", "purpose": "a|b"}, "bad_request"),
        ({"op": "generate_data_key", "id": "1"}, "bad_request"),
        ({"op": "status"}, "bad_request"),
        ({"op": "Status!", "id": "1"}, "bad_request"),
        ({"op": "auth", "id": "1", "token": TOKEN}, "bad_request"),
    ],
)
async def test_bad_requests_answered_and_connection_kept(
    unix_service: Path, message: dict[str, Any], code: str
) -> None:
    async with raw(unix_service) as connection:
        response = await connection.call(message)
        assert response["ok"] is False
        assert response["error"]["code"] == code
        assert (await connection.call({"op": "status", "id": "2"}))["ok"] is True


# --- wire format, sans-I/O --------------------------------------------------------------------------------------


def test_frame_decoder_handles_split_and_joined_frames() -> None:
    frames = encode_frame({"op": "status", "id": "1"}) + encode_frame({"op": "rotate", "id": "2", "x": "中文"})
    decoder = FrameDecoder()
    messages: list[dict[str, Any]] = []
    for byte in frames:
        messages += decoder.feed(bytes([byte]))
    assert messages == [{"op": "status", "id": "1"}, {"op": "rotate", "id": "2", "x": "中文"}]
    assert decoder.pending == 0


def test_frame_limits() -> None:
    with pytest.raises(KeyServiceProtocolError) as info:
        FrameDecoder().feed(b"\xff\xff\xff\xff")
    assert info.value.code == "frame_too_large"
    with pytest.raises(KeyServiceProtocolError, match="exceeds"):
        encode_frame({"big": "x" * MAX_FRAME_SIZE})
    with pytest.raises(KeyServiceProtocolError, match="non-standard JSON constant NaN"):
        decode_body(b'{"a": NaN}')


def test_parse_response() -> None:
    with pytest.raises(KeyServiceRefused, match=r"\(unauthorized\)"):
        parse_response({"id": None, "ok": False, "error": {"code": "unauthorized", "message": "no"}}, "1")
    with pytest.raises(KeyServiceProtocolError, match="does not match"):
        parse_response({"id": "2", "ok": True}, "1")
    with pytest.raises(KeyServiceProtocolError, match="boolean 'ok'"):
        parse_response({"id": "1"}, "1")
    assert parse_response({"id": "1", "ok": True, "v": 1}, "1")["v"] == 1


# --- the process entry point ------------------------------------------------------------------------------------


def test_run_keyservice_refuses_readable_token(
    tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o644)
    assert run_keyservice(tmp_path / "keys", short_dir / "ks.sock", token, set()) == 2
    assert f"{token} has mode 0644" in capsys.readouterr().err


async def test_run_keyservice_process_serves_until_sigterm(tmp_path: Path, short_dir: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    socket_path = short_dir / "run" / "ks.sock"
    code = (
        "import sys; from pathlib import Path; from compliance.keyservice_server import run_keyservice; "
        f"sys.exit(run_keyservice(Path({str(tmp_path / 'keys')!r}), Path({str(socket_path)!r}), "
        f"Path({str(token)!r}), set()))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            if socket_path.exists():
                break
            await asyncio.sleep(0.05)
        async with KeyServiceClient.unix(socket_path, TOKEN) as client:
            assert (await client.status()).versions == (1,)
        assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    assert not socket_path.exists()


# --- mutual TLS -------------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("medhotline test CA", ca_key, _name("medhotline test CA"), ca_key, ca=True)
    ca_path, _ = _write_pair(directory, "ca", ca_cert, ca_key)
    paths = {"ca": ca_path}
    for stem, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"keyservice-{stem}", key, ca_cert.subject, ca_key, ca=False, usage=usage)
        paths[f"{stem}_cert"], paths[f"{stem}_key"] = _write_pair(directory, stem, cert, key)
    return paths


# The name in the pki fixture's client certificate (its common name).
CLIENT_NAME = "keyservice-client"


@contextlib.asynccontextmanager
async def tls_service(
    store: KeyStore, pki: dict[str, Path], clients: frozenset[str] = frozenset({CLIENT_NAME})
) -> AsyncIterator[int]:
    context = mutual_tls_server_context(pki["server_cert"], pki["server_key"], pki["ca"])
    server = KeyServiceServer(store, TOKEN.encode())
    listener = await server.start_tls_server("127.0.0.1", 0, context, clients)
    try:
        yield int(listener.sockets[0].getsockname()[1])
    finally:
        await server.aclose()


def _client_context(pki: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_certificate:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


async def test_mutual_tls_client_with_certificate_works(store: KeyStore, pki: dict[str, Path]) -> None:
    async with tls_service(store, pki) as port:
        client = KeyServiceClient.tls("127.0.0.1", port, _client_context(pki, with_certificate=True), TOKEN)
        async with client:
            generated = await client.generate_data_key("recordings")
            async with client.data_key(generated.wrapped, "recordings") as dek:
                assert dek == generated.plain
            with pytest.raises(KeyServiceRefused, match="unknown_op"):
                await client._call("export_kek")


async def test_mutual_tls_client_without_certificate_refused(store: KeyStore, pki: dict[str, Path]) -> None:
    async with tls_service(store, pki) as port:
        client = KeyServiceClient.tls("127.0.0.1", port, _client_context(pki, with_certificate=False), TOKEN)
        async with client:
            with pytest.raises((KeyServiceRefused, KeyServiceUnavailable)):
                await client.status()


async def test_mutual_tls_client_the_ca_signed_but_not_listed_is_refused(store: KeyStore, pki: dict[str, Path]) -> None:
    """The hospital CA signs far more than the nodes: a valid certificate for a name not among the key service's
    clients gets nothing, even with the right token, and the refusal names the certificate, not its content."""
    with capture_logs() as logs:
        async with tls_service(store, pki, frozenset({"node1.hospital.example"})) as port:
            client = KeyServiceClient.tls("127.0.0.1", port, _client_context(pki, with_certificate=True), TOKEN)
            async with client:
                with pytest.raises(KeyServiceRefused, match="unauthorized"):
                    await client.generate_data_key("recordings")
    refused = [entry for entry in logs if entry["event"] == "keyservice_refused"]
    assert [entry["peer"] for entry in refused] == [f"tls:{CLIENT_NAME} (not a listed client)"]


async def test_mutual_tls_wrong_token_refused(store: KeyStore, pki: dict[str, Path]) -> None:
    async with tls_service(store, pki) as port:
        client = KeyServiceClient.tls(
            "127.0.0.1", port, _client_context(pki, with_certificate=True), "wrong-token-000000"
        )
        async with client:
            with pytest.raises(KeyServiceRefused, match="unauthorized"):
                await client.status()


async def test_tls_server_requires_client_certificates(store: KeyStore, pki: dict[str, Path]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    with pytest.raises(KeyServiceError, match="CERT_REQUIRED"):
        await KeyServiceServer(store, TOKEN.encode()).start_tls_server("127.0.0.1", 0, context, frozenset({"n1"}))


async def test_tls_server_requires_the_names_of_its_clients(store: KeyStore, pki: dict[str, Path]) -> None:
    context = mutual_tls_server_context(pki["server_cert"], pki["server_key"], pki["ca"])
    with pytest.raises(KeyServiceError, match="needs the names of the clients"):
        await KeyServiceServer(store, TOKEN.encode()).start_tls_server("127.0.0.1", 0, context, frozenset())
