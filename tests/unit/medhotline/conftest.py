"""Fixtures of the application's tests: a configured state directory on SQLite and PostgreSQL (``setup``), the key
service as its own process (``keyservice_process``), and ``reset_logging`` for tests that call ``main`` (it configures
process-global logging). Helpers to run the CLI are in ``cli_run``."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.unit.medhotline.cli_run import ROOT, Setup


@pytest.fixture
def reset_logging() -> Iterator[None]:
    """``main`` configures process-global logging (to the config's log file): leave it as it was."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)
    for name in ("alembic", "panoramisk", "websockets", "httpcore", "httpx", "asyncio"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    structlog.reset_defaults()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mhcli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def setup(request: pytest.FixtureRequest, tmp_path: Path, short_dir: Path) -> Setup:
    state = tmp_path / "state"
    log_file = tmp_path / "logs" / "medhotline.log"
    url = (
        f"sqlite:///{state / 'medhotline.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    socket_path = short_dir / "run" / "ks.sock"
    config = tmp_path / "medhotline.toml"
    config.write_text(
        f'[service]\nstate_dir = "{state}"\nlog_file = "{log_file}"\n'
        f'[database]\nurl = "{url}"\n'
        f'[keyservice]\nsocket = "{socket_path}"\ndirectory = "{tmp_path / "keys"}"\n',
        encoding="utf-8",
    )
    return Setup(config, state, log_file, url, socket_path)


@pytest.fixture
def keyservice_process(setup: Setup) -> Iterator[subprocess.Popen[bytes]]:
    """``medhotline keyservice`` as its own process; stopped with SIGTERM like systemd would."""
    process = subprocess.Popen(
        [sys.executable, "-m", "medhotline", "--config", str(setup.config), "keyservice"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not setup.socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"the key service did not start (exit {process.poll()}): {stderr[-2000:]}")
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()
