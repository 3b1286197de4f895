"""``medhotline speech serve`` as a process: prints its URL first, serves the protocol, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from keywords.vosk_protocol import EOF_MESSAGE, config_message
from tests.unit.keywords.test_speech import korean_model_path


def _run(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    # In an empty directory: no ./medhotline.toml, so the defaults (no speech.model_path).
    return subprocess.Popen(
        [sys.executable, "-m", "medhotline", "speech", "serve", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_without_a_model_it_says_what_to_give(tmp_path: Path) -> None:
    process = _run(tmp_path, "--port", "0")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "speech serve needs a model: --model PATH, or speech.model_path" in err


def test_a_missing_model_directory_is_named(tmp_path: Path) -> None:
    process = _run(tmp_path, "--port", "0", "--model", str(tmp_path / "nope"))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"speech model {tmp_path / 'nope'} is not usable: the directory does not exist" in err


def test_serves_on_an_ephemeral_port_until_sigterm(tmp_path: Path) -> None:
    process = _run(tmp_path, "--port", "0", "--model", str(korean_model_path()))
    with process:
        _serve_one_stream_and_stop(process)
    assert process.returncode == 0


def _serve_one_stream_and_stop(process: subprocess.Popen[str]) -> None:
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        assert first.startswith("listening on ws://127.0.0.1:"), first
        url = first.removeprefix("listening on ")
        assert not url.endswith(":2700")

        async def one_stream() -> dict[str, object]:
            async with connect(url, compression=None) as ws:
                await ws.send(config_message(8000))
                await ws.send(b"\x00\x00" * 1600)
                assert "partial" in json.loads(await ws.recv())
                await ws.send(EOF_MESSAGE)
                reply: dict[str, object] = json.loads(await ws.recv())
                return reply

        assert asyncio.run(one_stream()) == {"text": ""}
        assert process.stdout.readline().strip() == "stream 1 opened"
        assert process.stdout.readline().strip() == "stream 1 finished"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when SIGTERM is ignored: fail, don't hang
            process.kill()
            pytest.fail("speech serve did not stop on SIGTERM")
