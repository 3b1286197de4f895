"""Driving the wallboard in Debian's headless Chromium over the DevTools protocol (CDP), for the browser tests:
``medhotline api`` as a child process, a supervisor signed in with password and TOTP, the page opened with the
session cookie, expressions evaluated in it and screenshots kept as test artifacts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import websockets

from benchmarks import api_calls
from compliance.accounts import AccountStore
from ground import db

CHROMIUM = shutil.which("chromium")
PASSWORD = "correct horse battery"


@contextmanager
def api_server(config_path: Path, stderr_path: Path) -> Iterator[str]:
    """``medhotline --config CONFIG api --port 0`` until the block ends → its base URL."""
    with api_calls.api_server(config_path, stderr_path) as (base, _process):
        yield base


def add_supervisor(url: str, account: str) -> None:
    engine = db.make_engine(url)
    try:
        AccountStore.for_engine(engine).add(account, "Wallboard test supervisor", ["supervisor"], datetime.now(UTC))
    finally:
        engine.dispose()


def sign_in(base: str, config_path: Path, account: str) -> str:
    """``account`` enrolled through ``medhotline signin`` and signed in over the API → the session token."""
    return api_calls.sign_in(base, config_path, account, PASSWORD)


class Cdp:
    """One page's DevTools connection: commands in order, each awaited for its own answer."""

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

    async def until(self, expression: str, seconds: float) -> float:
        """Seconds until ``expression`` is true on the page (AssertionError after ``seconds``)."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if await self.evaluate(expression):
                return time.monotonic() - start
            await asyncio.sleep(0.02)
        raise AssertionError(f"not true within {seconds} s: {expression}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@asynccontextmanager
async def wallboard(base: str, token: str, profile: Path) -> AsyncIterator[Cdp]:
    """Headless Chromium showing ``base``/wallboard with the session cookie set, once the first snapshot is drawn."""
    assert CHROMIUM is not None
    browser = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything awaits it)
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
         "--window-size=1000,900", f"--user-data-dir={profile}", "about:blank"],
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
            cdp = Cdp(socket)
            await cdp.call("Network.enable")
            await cdp.call("Network.setCookie", name="medhotline_session", value=token, url=base, httpOnly=True)
            await cdp.call("Page.navigate", url=f"{base}/wallboard")
            await cdp.until("document.getElementById('status').textContent.startsWith('更新于')", 20)
            yield cdp
    finally:
        browser.terminate()
        browser.wait(timeout=10)


def artifacts_dir(tmp_path: Path, name: str) -> Path:
    """Where a test keeps its screenshots: ``$MEDHOTLINE_ARTIFACTS/NAME``, else the test's temporary directory."""
    root = os.environ.get("MEDHOTLINE_ARTIFACTS")
    path = Path(root) / name if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
