"""``[keyservice]`` over mutual TLS: listen (the key service's host), address (a node), and their refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ground.config import ConfigError, load_config

CLIENTS = '["node1.hospital.example", "node2"]'


def _pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("ca_file", "cert_file", "key_file"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n", encoding="ascii")
        files[name] = path
    return files


def _toml(tmp_path: Path, lines: dict[str, str | Path]) -> Path:
    body = "\n".join(f"{key} = {value}" if key == "clients" else f'{key} = "{value}"' for key, value in lines.items())
    path = tmp_path / "medhotline.toml"
    path.write_text(f"[keyservice]\n{body}\n", encoding="utf-8")
    return path


def _error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return str(info.value)


def test_default_is_the_unix_socket_only(tmp_path: Path) -> None:
    config = load_config(_toml(tmp_path, {}), {})
    assert (config.keyservice.listen, config.keyservice.address) == ("", "")
    assert config.keyservice.tls_files() is None
    assert config.keyservice_socket == config.service.state_dir / "keyservice.sock"


def test_listen_with_its_files_and_clients_loads(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    config = load_config(_toml(tmp_path, {"listen": "127.0.0.1:7443", "clients": CLIENTS, **files}), {})
    assert config.keyservice.tls_files() == (files["ca_file"], files["cert_file"], files["key_file"])
    assert config.keyservice.clients == ["node1.hospital.example", "node2"]


def test_listen_without_clients_is_refused(tmp_path: Path) -> None:
    """Any certificate the CA signed is not enough: the listener serves the nodes it names."""
    files = _pem_files(tmp_path)
    message = _error(_toml(tmp_path, {"listen": "127.0.0.1:7443", **files}))
    assert "keyservice: listen is set: clients must name the nodes that may use the key service" in message


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ({"clients": CLIENTS}, "clients is set but listen is empty"),
        ({"listen": "127.0.0.1:7443", "clients": '["node 1", "ok"]'}, "'node 1': not a certificate's host name"),
    ],
)
def test_bad_clients_named(tmp_path: Path, lines: dict[str, str], expected: str) -> None:
    files = _pem_files(tmp_path)
    assert expected in _error(_toml(tmp_path, {**lines, **files}))


def test_address_may_be_a_host_name_or_ipv6(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    for address in ("keyservice:7443", "[::1]:7443", "10.0.0.20:7443"):
        config = load_config(_toml(tmp_path, {"address": address, **files}), {})
        assert config.keyservice.address == address


@pytest.mark.parametrize("role", ["listen", "address"])
def test_tls_address_without_its_files_names_what_is_missing(tmp_path: Path, role: str) -> None:
    files = _pem_files(tmp_path)
    clients = {"clients": CLIENTS} if role == "listen" else {}
    message = _error(_toml(tmp_path, {role: "127.0.0.1:7443", "ca_file": files["ca_file"], **clients}))
    assert f"keyservice: {role} is set: mutual TLS needs cert_file, key_file" in message


def test_files_without_listen_or_address_refused(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    message = _error(_toml(tmp_path, {"cert_file": files["cert_file"]}))
    assert "cert_file set but neither listen nor address" in message


def test_missing_file_named_with_its_key(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    files["key_file"] = tmp_path / "nosuch.key"
    message = _error(_toml(tmp_path, {"address": "10.0.0.20:7443", **files}))
    assert f"key_file: {tmp_path / 'nosuch.key'} cannot be read (No such file or directory)" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_named_with_its_key(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    os.chmod(files["ca_file"], 0)
    message = _error(_toml(tmp_path, {"listen": "127.0.0.1:7443", "clients": CLIENTS, **files}))
    assert f"ca_file: {files['ca_file']} cannot be read (Permission denied)" in message


def test_listen_and_address_together_refused(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    message = _error(_toml(tmp_path, {"listen": "127.0.0.1:7443", "address": "10.0.0.20:7443", **files}))
    assert "listen and address are both set" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("listen", "keyservice:7443", "is not an IP address"),  # a bind address is never resolved
        ("listen", "127.0.0.1", "is not host:port"),
        ("address", "10.0.0.20:99999", "port 99999 is outside 1-65535"),
        ("address", "bad_host!:7443", "is neither an IP address nor a host name"),
        ("server_name", "not a name", "is not a host name"),
    ],
)
def test_bad_addresses_named(tmp_path: Path, key: str, value: str, expected: str) -> None:
    message = _error(_toml(tmp_path, {key: value}))
    assert f"keyservice.{key}:" in message
    assert expected in message


def test_server_name_without_address_refused(tmp_path: Path) -> None:
    assert "server_name is set but address is empty" in _error(_toml(tmp_path, {"server_name": "keyservice"}))


def test_unused_tcp_port_says_what_replaced_it(tmp_path: Path) -> None:
    message = _error(_toml(tmp_path, {}), {"MEDHOTLINE__KEYSERVICE__TCP_PORT": "7443"})
    assert "tcp_port is no longer read" in message
    assert "MEDHOTLINE__KEYSERVICE__TCP_PORT" in message


def test_a_directory_for_a_file_named_with_its_key(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    files["cert_file"] = tmp_path  # runs as root too, unlike a mode-000 file
    message = _error(_toml(tmp_path, {"address": "10.0.0.20:7443", **files}))
    assert f"cert_file: {tmp_path} cannot be read (Is a directory)" in message
