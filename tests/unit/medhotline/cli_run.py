"""Run ``medhotline`` in process against a configured state directory (the ``setup`` fixture of conftest.py)."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from medhotline.cli import main

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Setup:
    config: Path
    state: Path
    log_file: Path
    database_url: str
    socket: Path


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(setup: Setup, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None) -> Run:
    if stdin is not None:
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = main(["--config", str(setup.config), *argv])
    finally:
        if stdin is not None:
            sys.stdin = saved
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)
