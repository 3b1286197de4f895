"""Run ``medhotline serve`` as a child process and know when it is ready: used by the demo and the tests.

Ready means Asterisk itself lists the Stasis application (the ARI WebSocket is connected) and the FastAGI port
accepts connections; both are observed from outside the service, not taken from its own log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ground.config import CONFIG_ENV, Config
from ground.errors import MedhotlineError
from medhotline.sandbox import Sandbox


class ServiceNotReady(MedhotlineError):
    """The service did not become ready in time."""


def ari_app_registered(sandbox: Sandbox, app: str) -> bool:
    try:
        listing = sandbox.cli_output("ari show apps")
    except (MedhotlineError, subprocess.TimeoutExpired):
        return False
    return any(line.strip() == app for line in listing.splitlines())


def port_accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


class ServiceProcess:
    def __init__(self, config: Config, config_path: Path | None, log_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = _spawn("serve", self.config_path, self.log_path)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        sandbox = Sandbox(self.config)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceNotReady(f"medhotline serve exited with {self.proc.returncode}; see {self.log_path}")
            if ari_app_registered(sandbox, self.config.asterisk.ari_app) and port_accepts(
                self.config.fastagi.host, self.config.fastagi.port
            ):
                return
            time.sleep(0.3)
        raise ServiceNotReady(f"medhotline serve not ready within {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the service finishes calls in progress), then SIGKILL after ``timeout``."""
        return _stop(self.proc, timeout)


class KeyServiceProcess:
    """``medhotline keyservice`` as a child process (the embedded default: the key service on this host).

    Ready when its Unix socket accepts connections. In production it runs as its own system service, under its
    own user, with its key directory out of the application's reach.
    """

    def __init__(self, config: Config, config_path: Path | None, log_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = _spawn("keyservice", self.config_path, self.log_path)
        socket_path = self.config.keyservice_socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceNotReady(f"medhotline keyservice exited with {self.proc.returncode}; see {self.log_path}")
            if unix_socket_accepts(socket_path):
                return
            time.sleep(0.1)
        raise ServiceNotReady(f"medhotline keyservice not ready within {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> int:
        return _stop(self.proc, timeout)


def unix_socket_accepts(path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        sock.connect(str(path))
        return True
    return False


def _spawn(command: str, config_path: Path | None, log_path: Path) -> subprocess.Popen[bytes]:
    """``medhotline <command>`` as a child; it reads the same file (or defaults and environment) as this process."""
    env = dict(os.environ)
    if config_path is not None:
        env[CONFIG_ENV] = str(config_path.resolve())
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "medhotline", command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
