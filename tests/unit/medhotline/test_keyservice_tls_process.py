"""The key service on "its own host": ``medhotline keyservice`` as a process with ``[keyservice] listen`` on a
free loopback port, and a node configured with ``[keyservice] address`` reaching it over mutual TLS.

Loopback stands in for the network between the hosts; the two configs have separate state directories, as two
hosts would, and the node has only a copy of the token and its own client certificate.
"""

from __future__ import annotations

import base64
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compliance.data_keys import TOKEN_FILE, LazyKeyService, key_service_for
from compliance.keyservice_client import KeyServiceClient, mutual_tls_client_context
from compliance.keyservice_protocol import KeyServiceError, KeyServiceRefused, KeyServiceUnavailable
from ground.config import Config, load_config
from medhotline.free_ports import free_port
from medhotline.sandbox_pki import KeyServicePki, ensure_keyservice_pki
from medhotline.service_process import KeyServiceProcess

PHONE = "13800138000"  # a caller's number: it may reach the key service (blind index), never a log line


@dataclass
class Hosts:
    key_host_logs: list[Path]
    node: Config
    port: int
    pki: KeyServicePki
    other_pki: KeyServicePki
    unlisted: KeyServicePki  # the same CA's certificate for node3, which is not among the key service's clients
    token: str


@pytest.fixture
def hosts(tmp_path: Path, short_dir: Path) -> Iterator[Hosts]:
    unlisted = ensure_keyservice_pki(tmp_path / "pki", ["127.0.0.1"], "node3")
    pki = ensure_keyservice_pki(tmp_path / "pki", ["127.0.0.1"], "node2")
    other_pki = ensure_keyservice_pki(tmp_path / "other-pki", ["127.0.0.1"], "node2")
    port = free_port(socket.SOCK_STREAM)
    key_state = short_dir / "key-host"
    key_config = tmp_path / "key-host.toml"
    key_config.write_text(
        f'[service]\nstate_dir = "{key_state}"\nlog_file = "{tmp_path / "key-host.log"}"\n'
        f'[keyservice]\ndirectory = "{tmp_path / "keys"}"\nlisten = "127.0.0.1:{port}"\nclients = ["node2"]\n'
        f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n',
        encoding="utf-8",
    )
    process = KeyServiceProcess(load_config(key_config, {}), key_config, tmp_path / "key-host.stdout")
    process.start(timeout=20)
    try:
        # The node: its own state directory, a copy of the token (0600), its client certificate.
        node_state = tmp_path / "node2"
        node_state.mkdir(mode=0o700)
        shutil.copy2(key_state / TOKEN_FILE, node_state / TOKEN_FILE)
        node_config = tmp_path / "node2.toml"
        node_config.write_text(
            f'[service]\nstate_dir = "{node_state}"\n'
            f'[keyservice]\naddress = "127.0.0.1:{port}"\n'
            f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n',
            encoding="utf-8",
        )
        token = (node_state / TOKEN_FILE).read_text(encoding="utf-8").strip()
        yield Hosts(
            [tmp_path / "key-host.log", tmp_path / "key-host.stdout"],
            load_config(node_config, {}),
            port,
            pki,
            other_pki,
            unlisted,
            token,
        )
    finally:
        assert process.stop() == 0


def _client(hosts: Hosts, context: ssl.SSLContext, server_name: str = "127.0.0.1") -> KeyServiceClient:
    return KeyServiceClient.tls("127.0.0.1", hosts.port, context, hosts.token, server_hostname=server_name)


async def test_node_reaches_the_key_service_over_mutual_tls_and_strangers_are_refused(hosts: Hosts) -> None:
    # The node's own path: the function every component (recordings, TOTP vault, patient fields, CLI) uses.
    async with key_service_for(hosts.node) as keys:
        async with keys.new_data_key("recordings") as generated:
            plain, wrapped = bytes(generated.plain), generated.wrapped
        async with keys.data_key(wrapped, "recordings") as dek:
            assert bytes(dek) == plain
        index = await keys.blind_index(PHONE, "patients.phone")
    lazy = LazyKeyService(hosts.node)  # what the service builds for recordings, connected on first use
    try:
        assert bytes(await lazy.unwrap(wrapped, "recordings")) == plain
    finally:
        await lazy.close()

    # No client certificate: the handshake (or the first read after it, in TLS 1.3) is refused.
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(cafile=hosts.pki.ca_cert)
    async with _client(hosts, no_certificate) as stranger:
        with pytest.raises((KeyServiceRefused, KeyServiceUnavailable), match=r"tls_refused|client certificate"):
            await stranger.unwrap(wrapped, "recordings")

    # A client certificate from another CA: refused the same way, with the right token in hand.
    foreign = mutual_tls_client_context(hosts.pki.ca_cert, hosts.other_pki.client_cert, hosts.other_pki.client_key)
    async with _client(hosts, foreign) as stranger:
        with pytest.raises((KeyServiceRefused, KeyServiceUnavailable), match=r"tls_refused|client certificate"):
            await stranger.unwrap(wrapped, "recordings")

    # The same CA's certificate for a node the key service does not list: refused after the handshake, right
    # token or not (the hospital CA signs far more than the nodes).
    unlisted = mutual_tls_client_context(hosts.pki.ca_cert, hosts.unlisted.client_cert, hosts.unlisted.client_key)
    async with _client(hosts, unlisted) as stranger:
        with pytest.raises(KeyServiceRefused, match="unauthorized"):
            await stranger.unwrap(wrapped, "recordings")

    # The node verifies the key service: a CA that did not sign its certificate, or another name, is refused.
    wrong_ca = mutual_tls_client_context(hosts.other_pki.ca_cert, hosts.pki.client_cert, hosts.pki.client_key)
    async with _client(hosts, wrong_ca) as node:
        with pytest.raises(KeyServiceRefused, match="tls_refused"):
            await node.status()
    right = mutual_tls_client_context(hosts.pki.ca_cert, hosts.pki.client_cert, hosts.pki.client_key)
    async with _client(hosts, right, server_name="not-the-keyservice") as node:
        with pytest.raises(KeyServiceRefused, match="tls_refused"):
            await node.status()
    async with _client(hosts, right) as node:  # the same context, the right name: served
        assert (await node.status()).versions == (1,)

    logged = "\n".join(path.read_text(encoding="utf-8") for path in hosts.key_host_logs)
    log_file = hosts.key_host_logs[0].read_text(encoding="utf-8")
    assert '"transport": "tls", "host": "127.0.0.1"' in log_file
    # Three connections were served (the node's client, the lazy client, the last status): the four refused
    # ones never reached authentication, and the key service logged the two it refused itself.
    assert log_file.count('"op": "auth", "outcome": "ok"') == 3
    assert log_file.count('"peer": "tls:node2"') == log_file.count('"event": "keyservice_request"')
    assert log_file.count("TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE") == 1
    assert log_file.count("TLS handshake failed: CERTIFICATE_VERIFY_FAILED") == 1
    assert log_file.count('"peer": "tls:node3 (not a listed client)"') == 1
    for secret in (
        PHONE,
        index,
        hosts.token,
        base64.urlsafe_b64encode(plain).decode().rstrip("="),
        base64.urlsafe_b64encode(wrapped).decode().rstrip("="),
        base64.b64encode(plain).decode().rstrip("="),
        plain.hex(),
    ):
        assert secret not in logged


def test_a_node_with_a_broken_certificate_refuses_at_start(tmp_path: Path) -> None:
    pki = ensure_keyservice_pki(tmp_path / "pki", ["127.0.0.1"])
    config = tmp_path / "node.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[keyservice]\naddress = "127.0.0.1:7443"\n'  # never connected to: the files are refused first
        f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.ca_cert}"\nkey_file = "{pki.client_key}"\n',
        encoding="utf-8",
    )
    with pytest.raises(KeyServiceError, match=r"keyservice\.cert_file"):
        LazyKeyService(load_config(config, {}))
