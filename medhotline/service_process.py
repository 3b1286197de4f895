"""Run ``medhotline serve`` (and the key service, and a speech server) as child processes and know when they are
ready: used by the demo and the tests.

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
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ground.config import CONFIG_ENV, Config, parse_sip_address
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
    def __init__(
        self, config: Config, config_path: Path | None, log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        # Overrides for the child only (MEDHOTLINE__… variables): the demo's speech server, without a config file.
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process and return at once: several services boot side by side, then ``wait_ready``."""
        self.proc = _spawn("serve", self.config_path, self.log_path, self.env)

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would: nothing is finished or closed by the service itself."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

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

    Ready when its Unix socket accepts connections, and its mutual-TLS port too when ``[keyservice] listen`` is
    set. In production it runs as its own system service, under its own user, with its key directory out of
    the application's reach.
    """

    def __init__(self, config: Config, config_path: Path | None, log_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = _spawn("keyservice", self.config_path, self.log_path)
        socket_path = self.config.keyservice_socket
        # The TLS listener opens just after the socket: wait for both (a bare TCP connect, no handshake).
        listen = parse_sip_address(self.config.keyservice.listen) if self.config.keyservice.listen else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceNotReady(f"medhotline keyservice exited with {self.proc.returncode}; see {self.log_path}")
            if unix_socket_accepts(socket_path) and (listen is None or port_accepts(*listen)):
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


class SpeechServerProcess:
    """``medhotline speech serve --port 0`` as a child process: a local speech server (Vosk's WebSocket protocol).

    ``launch`` returns at once (loading a model takes seconds: the caller does other work meanwhile); ``wait_url``
    reads the ``listening on ws://…`` line. Every later line (one per stream opened and closed, never audio or
    text) goes to ``log_path`` and is kept for ``streams``.
    """

    def __init__(self, model: Path, log_path: Path, *, workers: int = 1) -> None:
        self.model = model
        self.log_path = log_path
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None
        self.url: str | None = None
        self.lines: list[str] = []
        self._pump: threading.Thread | None = None

    def launch(self) -> None:
        command = [sys.executable, "-m", "medhotline", "speech", "serve", "--port", "0"]
        command += ["--workers", str(self.workers), "--model", str(self.model)]
        # Its structured log (stderr) to the log file; stdout carries the URL and the stream lines we read.
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True
            )

    def wait_url(self, timeout: float = 120.0) -> str:
        """The server's ``ws://`` URL once it listens; ServiceNotReady (with its output) when it does not."""
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise ServiceNotReady("the speech server was not launched")
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline() if proc.stdout else ""))
        reader.start()
        reader.join(timeout)
        line = first[0].strip() if first else ""
        if not line.startswith("listening on ws://"):
            self.stop()
            said = line or ("nothing" if first else f"nothing within {timeout:.0f}s")
            raise ServiceNotReady(f"medhotline speech serve did not start (it said {said!r}); model {self.model}")
        self.url = line.removeprefix("listening on ")
        self._pump = threading.Thread(target=self._keep_lines, args=(proc.stdout,), daemon=True)
        self._pump.start()
        return self.url

    def _keep_lines(self, stream: Iterable[str]) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in stream:
                self.lines.append(line.strip())
                log.write(line)
                log.flush()

    def streams(self) -> tuple[int, int]:
        """(streams opened, streams that ended normally: ``finished`` or closed by the client)."""
        opened = sum(1 for line in self.lines if line.startswith("stream ") and line.endswith(" opened"))
        ended = sum(1 for line in self.lines if line.endswith((" finished", " closed by the client")))
        return opened, ended

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (the server closes its connections and exits), then SIGKILL after ``timeout``."""
        proc = self.proc
        code = _stop(proc, timeout)
        if self._pump is not None:
            self._pump.join(timeout)  # the last lines (streams closed at shutdown) are read before we count
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        return code


def _spawn(
    command: str, config_path: Path | None, log_path: Path, extra_env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``medhotline <command>`` as a child; it reads the same file (or defaults and environment) as this process,
    plus ``extra_env``."""
    env = dict(os.environ)
    env.update(extra_env or {})
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


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, timeout: float) -> int:
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
