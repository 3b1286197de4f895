"""The demo's local speech server as a child process: a model that can't be loaded is a clear error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from medhotline.service_process import ServiceNotReady, SpeechServerProcess


def test_a_speech_server_that_cannot_load_its_model_is_reported_with_the_model_and_stopped(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = SpeechServerProcess(missing, tmp_path / "speech.log")
    server.launch()
    with pytest.raises(ServiceNotReady, match="did not start") as caught:
        server.wait_url(timeout=60)
    assert str(missing) in str(caught.value)
    assert server.proc is not None
    assert server.proc.poll() is not None  # nothing left running
    assert server.log_path.read_text(errors="replace")  # the child's own reason is in its log
    assert server.streams() == (0, 0)
