"""The wallboard in Debian's headless Chromium, driven over the DevTools protocol, against a running
``medhotline api`` on an ephemeral port: a call written to the database appears on the page (category and wait,
never the caller's number). No Asterisk needed; the figure printed is the insert-to-DOM time. The same page with
real calls through the sandbox: ``tests/integration/test_wallboard_live.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ground import db
from ground.config import load_config
from medhotline.service_process import KeyServiceProcess
from tests.integration.conftest import unavailable
from tests.integration.wallboard_browser import CHROMIUM, add_supervisor, api_server, sign_in, wallboard

PHONE = "13812345678"
DIALPLANS = Path(__file__).resolve().parents[2] / "dialplans"


@pytest.fixture(autouse=True)
def chromium() -> None:
    """In CI a missing browser fails the run (integration tests never skip there); elsewhere it skips."""
    if CHROMIUM is None:
        unavailable("Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A migrated SQLite database with a supervisor, the key service (it seals the supervisor's second factor), and
    ``medhotline api --port 0`` over them → (base URL, db URL, config file)."""
    url = f"sqlite:///{tmp_path / 'board.db'}"
    db.upgrade(url)
    config_path = tmp_path / "medhotline.toml"
    # The socket in a short directory: a Unix socket path must stay under ~100 bytes, which tmp_path may not.
    run_dir = Path(tempfile.mkdtemp(prefix="mhwb-"))
    config_path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[database]\nurl = "{url}"\n'
        f'[keyservice]\nsocket = "{run_dir / "ks.sock"}"\ndirectory = "{tmp_path / "keys"}"\n'
        f'[hotline]\nflows_dir = "{DIALPLANS}"\n',
        encoding="utf-8",
    )
    add_supervisor(url, "sup.wang")
    keyservice = KeyServiceProcess(load_config(config_path), config_path, tmp_path / "keyservice.log")
    keyservice.start()
    try:
        with api_server(config_path, tmp_path / "api.stderr") as base:
            yield base, url, config_path
    finally:
        keyservice.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _insert_call(url: str, call_id: str) -> None:
    engine = db.make_engine(url)
    calls = db.CallRepository.for_engine(engine)
    now = datetime.now(UTC)
    calls.start(call_id=call_id, node="node1", transport="ari", channel_id="ch-1", channel_name=f"PJSIP/{PHONE}-01",
                flow="hotline", flow_version=None, started_at=now - timedelta(seconds=3))  # fmt: skip
    calls.add_step(call_id, flow="queue", node="queued", node_type="queue", edge="emergency", input="emergency",
                   at=now, moves_last_step=False)  # fmt: skip
    engine.dispose()


async def test_a_call_written_to_the_database_appears_on_the_wallboard(
    api: tuple[str, str, Path], tmp_path: Path
) -> None:
    base, url, config = api
    token = sign_in(base, config, "sup.wang")
    async with wallboard(base, token, tmp_path / "chromium") as cdp:
        assert await cdp.evaluate("document.querySelectorAll('tr.call').length") == 0
        _insert_call(url, "call-browser-1")
        took = await cdp.until("!!document.querySelector('tr.call[data-call=\"call-browser-1\"]')", 10)
        print(f"\ninsert → wallboard DOM: {took * 1000:.0f} ms (loaded machine)")
        html = await cdp.evaluate("document.documentElement.outerHTML")
        # A test artifact: $MEDHOTLINE_ARTIFACTS, else the test's temporary directory.
        await cdp.screenshot(Path(os.environ.get("MEDHOTLINE_ARTIFACTS", tmp_path)) / "wallboard.png")
    assert PHONE not in html
    assert "急救" in html, "the emergency queue, in Chinese"
