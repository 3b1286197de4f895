"""A thin asyncio ARI client over ``httpx`` (REST) and ``websockets`` (events, and REST where Asterisk can).

Why our own and not ``ari-py``/``ari-client``/``asyncari``: see docs/decisions.md. In short, ``ari-py`` does
not import on Python 3, ``ari-client`` configures logging at import and raises bare ``Exception``, and the
part of ARI medhotline uses is a handful of REST calls plus one event stream. Owning it lets us map every
library error to our own at this edge (like httpx's transports) and inject a fake transport in unit tests.

REST requests travel over the event WebSocket when ``rest_transport`` is ``"websocket"`` and this Asterisk
answers there (22.3+, 21.8+, 20.13+; probed once per connection with ``GET asterisk/ping``): no HTTP round trip,
connection pool or HTTP session per request. Over HTTP otherwise, and while the socket is (re)connecting or
the probe is unanswered. Errors map the same on both: AriNotFound, AriError, AriUnavailable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from ground.logs import get_logger
from telephony.ari_ws_rest import (
    RESPONSE_TYPE,
    BadResponse,
    PendingRequests,
    RestResponse,
    encode_request,
    error_detail,
    parse_response,
)
from telephony.channel import ChannelError, ConnectionLost
from telephony.rtp import AudioLosses

log = get_logger(__name__)


class AriError(ChannelError):
    """ARI answered with an error status."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"ARI {method} {path} failed with HTTP {status}: {detail}")


class AriNotFound(AriError):
    """The channel, bridge or playback no longer exists (usually: the caller hung up)."""


class AriUnavailable(ChannelError):
    """A REST request got no answer: it timed out (also waiting for a free connection), or the HTTP connection
    was refused or reset. Not a lost event stream (that is ``ConnectionLost``): the call's events still arrive,
    so the call can still be told and hung up; and not the caller's doing."""


# REST requests that may be repeated without changing the outcome: reading, and deleting what may already be
# gone. POSTs are repeated only when the caller says so (``retry=True``): answering, and a playback under a new
# id; never an originate, whose first attempt may already be ringing a phone.
_IDEMPOTENT = frozenset({"GET", "DELETE", "PUT"})
# Attempts for a retried request, and the first pause between them (doubled each time, with jitter).
RETRY_ATTEMPTS = 3
RETRY_PAUSE = 0.2

RestTransport = Literal["websocket", "http"]
# The request that tells whether this Asterisk answers REST on the event socket: any RESTResponse says yes.
_PROBE = ("GET", "/asterisk/ping")
_PROBE_TAG = "probe-"


def is_retryable(error: ChannelError) -> bool:
    """A failure another attempt may not meet: no answer at all, or Asterisk's own 5xx (an internal error or
    an overloaded HTTP server); never a 4xx, which says the request itself is wrong for the channel's state."""
    return isinstance(error, AriUnavailable) or (isinstance(error, AriError) and error.status >= 500)


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
        timeout: float = 5.0,
        max_connections: int = 300,
        rest_transport: RestTransport = "websocket",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if rest_transport not in ("websocket", "http"):
            raise ValueError(f"rest_transport must be 'websocket' or 'http', not {rest_transport!r}")
        self.app = app
        self.rest_transport: RestTransport = rest_transport
        self._timeout = timeout
        # The event socket while it is connected, and whether REST goes over it now (its probe was answered).
        self._ws: ClientConnection | None = None
        self._ws_rest = False
        # False once a probe went unanswered: this Asterisk has no REST over WebSocket; HTTP for good.
        self._ws_rest_supported: bool | None = None
        self._pending = PendingRequests()
        self._probe: asyncio.Task[None] | None = None
        # Where Asterisk can reach this service's RTP receivers (external media); the ARI host by default.
        self.media_host = host
        # What this node's listening taps lost of callers' audio, since the start (a metric; docs/speech.md).
        self.audio_losses = AudioLosses()
        # HTTPS and WSS when Asterisk's ARI is behind TLS ([asterisk] tls): the context holds the trusted CA.
        self._ssl = ssl_context
        scheme, ws_scheme = ("https", "wss") if ssl_context is not None else ("http", "ws")
        self._base = f"{scheme}://{host}:{port}/ari"
        self._ws_url = f"{ws_scheme}://{host}:{port}/ari/events?" + urlencode({"app": app, "subscribeAll": "false"})
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._auth_header = f"Basic {token}"
        self._http = httpx.AsyncClient(
            base_url=self._base,
            auth=httpx.BasicAuth(username, password),
            transport=transport,
            verify=ssl_context if ssl_context is not None else True,
            timeout=timeout,
            # One connection per request in flight: every call waits on at most one request, so the pool is
            # sized for the calls the node carries (httpx's default of 100 made requests queue for a connection
            # at 200+ calls until the timeout). Keep-alive spares a TCP handshake and an Asterisk HTTP thread
            # start per request; Asterisk's ``sessionlimit`` (http.conf) is rendered above this size.
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=10.0,  # below Asterisk's session_keep_alive (15 s): never reuse a closed one
            ),
        )

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._http.aclose()

    @property
    def transport_in_use(self) -> RestTransport:
        """Where the next REST request goes."""
        return "websocket" if self._ws_rest and self._ws is not None else "http"

    async def request(
        self, method: str, path: str, params: Mapping[str, str] | None = None, *, retry: bool | None = None
    ) -> Any:
        """One REST call; returns the decoded JSON body (or None). Errors become AriError/AriUnavailable.

        A request that may safely be repeated (GET, DELETE, PUT; a POST only with ``retry=True``) is tried up
        to ``RETRY_ATTEMPTS`` times while it meets a timeout, a refused or reset connection or a 5xx, with
        growing pauses between; the last failure is raised.
        """
        attempts = RETRY_ATTEMPTS if (method in _IDEMPOTENT if retry is None else retry) else 1
        pause = RETRY_PAUSE
        for attempt in range(1, attempts + 1):
            try:
                return await self._request_once(method, path, params)
            except (AriError, AriUnavailable) as exc:
                if attempt == attempts or not is_retryable(exc):
                    raise
                log.warning("ari.request_retried", method=method, attempt=attempt, reason=str(exc))
                await asyncio.sleep(pause * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not security
                pause *= 2
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _request_once(self, method: str, path: str, params: Mapping[str, str] | None) -> Any:
        ws = self._ws
        if self._ws_rest and ws is not None:
            return _result(method, path, await self._over_ws(ws, method, path, params))
        return await self._over_http(method, path, params)

    async def _over_ws(
        self, ws: ClientConnection, method: str, path: str, params: Mapping[str, str] | None, tag: str = ""
    ) -> RestResponse:
        """One request on the event socket, matched to its response by request id, within the timeout."""
        request_id, answer = self._pending.open(tag)
        try:
            try:
                await ws.send(encode_request(request_id, method, path, params))
            except (WebSocketException, OSError) as exc:
                raise AriUnavailable(f"ARI {method} {path}: event socket lost ({type(exc).__name__})") from None
            try:
                async with asyncio.timeout(self._timeout):
                    return await answer
            except TimeoutError:
                raise AriUnavailable(f"ARI {method} {path}: no answer in time (over the event socket)") from None
        finally:
            self._pending.discard(request_id, answer)

    async def _over_http(self, method: str, path: str, params: Mapping[str, str] | None) -> Any:
        try:
            response = await self._http.request(method, path, params=params)
        except httpx.TimeoutException as exc:
            raise AriUnavailable(f"ARI {method} {path}: no answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise AriUnavailable(f"ARI {method} {path}: Asterisk unreachable ({type(exc).__name__})") from None
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

    async def events(self, on_connected: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Connect the event WebSocket and yield events until it closes; then raise ConnectionLost.

        ``on_connected`` is called once the socket is open (the application is registered in Asterisk from
        then on), before the first event. Reconnecting is the caller's decision (it knows about backoff and
        about calls in flight).
        """
        try:
            async with connect(
                self._ws_url,
                additional_headers={"Authorization": self._auth_header},
                open_timeout=10,
                ping_interval=10,
                ping_timeout=10,
                max_size=2**22,
                ssl=self._ssl,
            ) as ws:
                log.info("ari.connected", app=self.app)
                self._attach(ws)
                if on_connected is not None:
                    on_connected()
                try:
                    async for message in ws:
                        try:
                            event = json.loads(message)
                        except ValueError:
                            log.warning("ari.bad_event", reason="not JSON", size=len(message))
                            continue
                        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                            log.warning("ari.bad_event", reason="no event type")
                            continue
                        if event["type"] == RESPONSE_TYPE:
                            self._on_response(event)
                            continue
                        yield event
                finally:
                    self._detach()
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AriError("GET", "/events", status, "ARI credentials refused") from None
            raise ConnectionLost(f"ARI event stream refused with HTTP {status}") from None
        except (OSError, InvalidHandshake, WebSocketException, TimeoutError) as exc:
            raise ConnectionLost(f"ARI event stream lost: {type(exc).__name__}: {exc}") from None
        raise ConnectionLost("ARI event stream closed by Asterisk")

    def _attach(self, ws: ClientConnection) -> None:
        """A new event socket: REST moves onto it once the probe is answered (HTTP until then)."""
        self._ws = ws
        self._ws_rest = False
        if self.rest_transport == "websocket" and self._ws_rest_supported is not False:
            self._probe = asyncio.get_running_loop().create_task(self._probe_ws(ws))

    def _detach(self) -> None:
        """The socket is gone: REST back to HTTP; requests waiting on it fail as unanswered (retried where safe,
        now over HTTP)."""
        self._ws = None
        self._ws_rest = False
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        failed = self._pending.fail_all(AriUnavailable("ARI request: event socket lost before the answer"))
        lost = [request_id for request_id in failed if _PROBE_TAG not in request_id]
        if lost:
            log.warning("ari.requests_lost_with_socket", requests=len(lost))

    async def _probe_ws(self, ws: ClientConnection) -> None:
        method, path = _PROBE
        try:
            response = await self._over_ws(ws, method, path, None, _PROBE_TAG)
        except AriUnavailable as exc:
            if self._ws is not ws:
                return  # the socket went away meanwhile: the next one probes again
            self._ws_rest_supported = False
            log.warning("ari.rest_over_websocket_unavailable", reason=str(exc), using="http")
            return
        if self._ws is ws:
            self._ws_rest_supported = True
            self._ws_rest = True
            log.info("ari.rest_transport", transport="websocket", probe_status=response.status)

    def _on_response(self, message: dict[str, Any]) -> None:
        try:
            response = parse_response(message)
        except BadResponse as exc:
            log.warning("ari.bad_response", reason=str(exc))
            return
        if not self._pending.resolve(response):
            # Its request timed out (and may have been retried), or it was never ours: nobody waits for it.
            log.warning("ari.response_for_unknown_request", request_id=response.request_id, status=response.status)


def _result(method: str, path: str, response: RestResponse) -> Any:
    """A REST response over the socket as ``request`` returns it, errors mapped as for HTTP."""
    if response.status >= 400:
        error = AriNotFound if response.status == 404 else AriError
        raise error(method, path, response.status, error_detail(response))
    if not response.body:
        return None
    try:
        return json.loads(response.body)
    except ValueError:
        raise AriError(method, path, response.status, "response is not JSON") from None
