"""Sandbox error paths, secrets and rendering on a fake root (nothing here needs root), and the CLI's exits."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ground.config import Config
from medhotline import sandbox as sandbox_module
from medhotline.asterisk_config import TEMPLATE_DIR
from medhotline.cli import main
from medhotline.sandbox import Sandbox, SandboxError

MODULES = "usr/lib/x86_64-linux-gnu/asterisk/modules"


def _config(tmp_path: Path, **asterisk: Any) -> Config:
    return Config.model_validate({"asterisk": {"sandbox": {"root": str(tmp_path / "root")}, **asterisk}})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_external_mode_has_no_sandbox(tmp_path: Path) -> None:
    config = Config.model_validate(
        {"asterisk": {"mode": "external", "ari_password": "a", "ami_secret": "b"}, "prompts": {"sounds_dir": "s"}}
    )
    with pytest.raises(SandboxError, match="external"):
        Sandbox(config)


@pytest.mark.parametrize(
    "action",
    [lambda s: s.up(), lambda s: s.down(), lambda s: s.cli(None), lambda s: s.ensure_rootfs()],
    ids=["up", "down", "cli", "ensure_rootfs"],
)
def test_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: Callable[[Sandbox], object]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError, match="needs root"):
        action(Sandbox(_config(tmp_path)))
    assert not (tmp_path / "root").exists()  # refused before touching anything


def test_missing_debootstrap_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    sandbox = Sandbox(_config(tmp_path))
    assert not sandbox.rootfs_ready()
    with pytest.raises(SandboxError, match=r"`apt-get install debootstrap`"):
        sandbox.ensure_rootfs()


def test_ready_rootfs_is_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # would refuse if it tried to build
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / sandbox_module.READY_MARKER).write_text("sid\n", encoding="utf-8")
    Sandbox(_config(tmp_path)).ensure_rootfs()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_port_in_use_names_port_and_config_key(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sandbox = Sandbox(_config(tmp_path, ari_port=port, sip_port=_free_udp_port()))
        with pytest.raises(SandboxError) as info:
            sandbox._check_ports_free()
    message = str(info.value)
    assert f"127.0.0.1:{port}/tcp" in message
    assert "asterisk.ari_port" in message
    assert "medhotline.toml" in message


def test_credentials_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    sandbox = Sandbox(_config(tmp_path))
    first = sandbox.credentials()
    assert sandbox.secrets_file.exists()
    assert _mode(sandbox.secrets_file) == 0o600
    assert _mode(sandbox.instance_dir) == 0o700
    assert json.loads(sandbox.secrets_file.read_text(encoding="utf-8"))["ami_secret"] == first.ami_secret
    assert len(first.ari_password) >= 24
    assert Sandbox(_config(tmp_path)).credentials() == first  # a new process reads the same secrets


def test_configured_secrets_win_over_generated(tmp_path: Path) -> None:
    creds = Sandbox(_config(tmp_path, ari_password="ari-pw", ami_secret="ami-pw")).credentials()
    assert (creds.ari_password, creds.ami_secret) == ("ari-pw", "ami-pw")


def test_render_writes_every_file_private_into_the_instance(tmp_path: Path) -> None:
    (tmp_path / "root" / MODULES).mkdir(parents=True)
    sandbox = Sandbox(_config(tmp_path))
    sandbox.render()
    etc = sandbox.instance_dir / "etc"
    assert etc == tmp_path / "root/srv/medhotline/default/etc"
    written = sorted(p.name for p in etc.iterdir())
    # Every template and the generated TLS file (a comment while [sip] tls is off), no leftover temporary files.
    assert written == sorted([*(p.name for p in TEMPLATE_DIR.glob("*.conf")), "pjsip_tls.conf"])
    assert all(_mode(etc / name) == 0o600 for name in written)
    asterisk_conf = (etc / "asterisk.conf").read_text(encoding="utf-8")
    assert f"/{MODULES}" in asterisk_conf
    assert "/srv/medhotline/default/" in asterisk_conf
    assert sandbox.credentials().ari_password in (etc / "ari.conf").read_text(encoding="utf-8")


def test_render_without_modules_dir_says_to_rebuild(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(SandboxError, match="no Asterisk modules directory"):
        Sandbox(_config(tmp_path)).render()


# -- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """main() configures process-wide logging; undo it for the next test."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)
    for name in ("panoramisk", "websockets", "httpcore", "httpx", "asyncio"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    structlog.reset_defaults()


@pytest.mark.usefixtures("_restore_logging")
def test_cli_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text("[asterisk]\nsip_port = 99999\n", encoding="utf-8")
    assert main(["--config", str(path), "asterisk", "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medhotline: invalid configuration:")
    assert str(path) in err
    assert "asterisk.sip_port" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("_restore_logging")
def test_cli_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "asterisk", "up"]) == 2
    assert "configuration file does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("_restore_logging")
def test_cli_sandbox_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text(
        '[asterisk]\nmode = "external"\nari_password = "a"\nami_secret = "b"\n[prompts]\nsounds_dir = "s"\n',
        encoding="utf-8",
    )
    assert main(["--config", str(path), "asterisk", "up"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "medhotline: asterisk.mode is 'external': the sandbox is not used, manage that Asterisk itself"
    )
    assert captured.out == ""
