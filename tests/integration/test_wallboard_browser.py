"""The wallboard in Debian's headless Chromium, driven over the DevTools protocol, against a running
``medhotline api`` on an ephemeral port: a call written to the database appears on the page (category and wait,
never the caller's number). No Asterisk needed; the figure printed is the insert-to-DOM time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from compliance.accounts import AccountStore
from compliance.credentials import CredentialStore, totp_code, totp_step
from ground import db
from tests.integration.conftest import unavailable

CHROMIUM = shutil.which("chromium")
PHONE = "13812345678"
PASSWORD = "correct horse battery"
DIALPLANS = Path(__file__).resolve().parents[2] / "dialplans"


@pytest.fixture(autouse=True)
def chromium() -> None:
    """In CI a missing browser fails the run (integration tests never skip there); elsewhere it skips."""
    if CHROMIUM is None:
        unavailable("Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A migrated SQLite database with a supervisor, and ``medhotline api --port 0`` over it → (base URL, db URL)."""
    url = f"sqlite:///{tmp_path / 'board.db'}"
    db.upgrade(url)
    config = tmp_path / "medhotline.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[hotline]\nflows_dir = "{DIALPLANS}"\n', encoding="utf-8")
    now = datetime.now(UTC)
    engine = db.make_engine(url)
    AccountStore.for_engine(engine).add("sup.wang", "Wang", ["supervisor"], now)
    engine.dispose()
    errors = (tmp_path / "api.stderr").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "medhotline", "--config", str(config), "api", "--port", "0"],
        stdout=subprocess.PIPE, stderr=errors, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (
            line,
            process.stderr.read() if process.stderr else "",
        )
        yield line.split()[-1], url
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
        errors.close()


def _sign_in(base: str, url: str) -> str:
    engine = db.make_engine(url)
    store = CredentialStore.for_engine(engine)
    store.set_password("sup.wang", PASSWORD, datetime.now(UTC))
    secret = store.enroll_totp("sup.wang", datetime.now(UTC))
    engine.dispose()
    code = totp_code(base64.b32decode(secret + "=" * (-len(secret) % 8)), totp_step(datetime.now(UTC)))
    response = httpx.post(f"{base}/api/login", json={"account": "sup.wang", "password": PASSWORD, "code": code})
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    assert isinstance(token, str)
    return token


def _insert_call(url: str, call_id: str) -> None:
    engine = db.make_engine(url)
    calls = db.CallRepository.for_engine(engine)
    now = datetime.now(UTC)
    calls.start(call_id=call_id, node="node1", transport="ari", channel_id="ch-1", channel_name=f"PJSIP/{PHONE}-01",
                flow="hotline", flow_version=None, started_at=now - timedelta(seconds=3))  # fmt: skip
    calls.add_step(call_id, flow="queue", node="queued", node_type="queue", edge="emergency", input="emergency",
                   at=now, moves_last_step=False)  # fmt: skip
    engine.dispose()


class _Cdp:
    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._id = 0

    async def call(self, method: str, **params: object) -> dict[str, Any]:
        self._id += 1
        await self._socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._socket.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")


async def _until(cdp: _Cdp, expression: str, seconds: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if await cdp.evaluate(expression):
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {seconds} s: {expression}")


async def test_a_call_written_to_the_database_appears_on_the_wallboard(api: tuple[str, str], tmp_path: Path) -> None:
    base, url = api
    token = _sign_in(base, url)
    profile = tmp_path / "chromium"
    assert CHROMIUM is not None
    browser = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything awaits it)
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/json/list")).json()
        target = next(p for p in pages if p["type"] == "page")
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**25) as socket:
            cdp = _Cdp(socket)
            await cdp.call("Network.enable")
            await cdp.call("Network.setCookie", name="medhotline_session", value=token, url=base, httpOnly=True)
            await cdp.call("Page.navigate", url=f"{base}/wallboard")
            await _until(cdp, "document.getElementById('status').textContent.startsWith('更新于')", 20)
            assert await cdp.evaluate("document.querySelectorAll('tr.call').length") == 0
            _insert_call(url, "call-browser-1")
            took = await _until(cdp, "!!document.querySelector('tr.call[data-call=\"call-browser-1\"]')", 10)
            print(f"\ninsert → wallboard DOM: {took * 1000:.0f} ms (loaded machine)")
            html = await cdp.evaluate("document.documentElement.outerHTML")
            shot = await cdp.call("Page.captureScreenshot", format="png")
    finally:
        browser.terminate()
        browser.wait(timeout=10)
    assert PHONE not in html
    assert "急救" in html, "the emergency queue, in Chinese"
    _keep(Path(os.environ.get("MEDHOTLINE_ARTIFACTS", tmp_path)), base64.b64decode(shot["data"]))


def _keep(artifacts: Path, png: bytes) -> None:
    """The screenshot as a test artifact ($MEDHOTLINE_ARTIFACTS, else the test's temporary directory)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "wallboard.png").write_bytes(png)
