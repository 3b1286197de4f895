"""A thin asyncio ARI client over ``httpx`` (REST) and ``websockets`` (events).

Why our own and not ``ari-py``/``ari-client``/``asyncari``: see docs/decisions.md. In short, ``ari-py`` does
not import on Python 3, ``ari-client`` configures logging at import and raises bare ``Exception``, and the
part of ARI medhotline uses is a handful of REST calls plus one event stream. Owning it lets us map every
library error to our own at this edge (like httpx's transports) and inject a fake transport in unit tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from telephony.channel import ChannelError, ConnectionLost

log = structlog.get_logger(__name__)


class AriError(ChannelError):
    """ARI answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"ARI {method} {path} failed with HTTP {status}: {detail}")


class AriNotFound(AriError):
    """The channel, bridge or playback no longer exists (usually: the caller hung up)."""


class AriClient:
    """REST calls and the event stream of one Stasis application."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        app: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.app = app
        # Where Asterisk can reach this service's RTP receivers (external media); the ARI host by default.
        self.media_host = host
        self._base = f"http://{host}:{port}/ari"
        self._ws_url = f"ws://{host}:{port}/ari/events?" + urlencode({"app": app, "subscribeAll": "false"})
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._auth_header = f"Basic {token}"
        self._http = httpx.AsyncClient(
            base_url=self._base,
            auth=httpx.BasicAuth(username, password),
            transport=transport,
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        """One REST call; returns the decoded JSON body (or None). Errors become AriError/ConnectionLost."""
        try:
            response = await self._http.request(method, path, params=params)
        except httpx.TransportError as exc:
            raise ConnectionLost(f"ARI {method} {path}: Asterisk unreachable ({type(exc).__name__})") from None
        if response.status_code >= 400:
            try:
                detail = str(response.json().get("message", response.text))
            except ValueError:
                detail = response.text.strip() or response.reason_phrase
            error = AriNotFound if response.status_code == 404 else AriError
            raise error(method, path, response.status_code, detail)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AriError(method, path, response.status_code, "response is not JSON") from None

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Connect the event WebSocket and yield events until it closes; then raise ConnectionLost.

        Reconnecting is the caller's decision (it knows about backoff and about calls in flight).
        """
        try:
            async with connect(
                self._ws_url,
                additional_headers={"Authorization": self._auth_header},
                open_timeout=10,
                ping_interval=10,
                ping_timeout=10,
                max_size=2**22,
            ) as ws:
                log.info("ari.connected", app=self.app)
                async for message in ws:
                    try:
                        event = json.loads(message)
                    except ValueError:
                        log.warning("ari.bad_event", reason="not JSON", size=len(message))
                        continue
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        log.warning("ari.bad_event", reason="no event type")
                        continue
                    yield event
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AriError("GET", "/events", status, "ARI credentials refused") from None
            raise ConnectionLost(f"ARI event stream refused with HTTP {status}") from None
        except (OSError, InvalidHandshake, WebSocketException, TimeoutError) as exc:
            raise ConnectionLost(f"ARI event stream lost: {type(exc).__name__}: {exc}") from None
        raise ConnectionLost("ARI event stream closed by Asterisk")
