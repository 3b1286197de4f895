"""ARI REST over the event WebSocket (Asterisk 22.3+, 21.8+, 20.13+): framing and request matching, sans-I/O.

Asterisk answers a ``RESTRequest`` message on the event WebSocket with a ``RESTResponse`` on the same socket,
interleaved with events (``res/ari/ari_websocket_requests.c``). Query parameters travel as ``query_strings``, a
list of ``{"name", "value"}`` string pairs; a response's body is the JSON document as a string in
``message_body`` (absent for 204). Nothing here touches a socket or a clock: the client (``ari_client``) sends
what ``encode_request`` returns, feeds every ``RESTResponse`` it reads to ``PendingRequests.resolve`` and owns
the timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RESPONSE_TYPE = "RESTResponse"


class BadResponse(ValueError):
    """A ``RESTResponse`` message that lacks what matching it needs (a request id, a numeric status)."""


@dataclass(frozen=True)
class RestResponse:
    request_id: str
    status: int
    reason: str
    # The JSON body as Asterisk sent it (a string); "" when the response has none (204, most 4xx are not empty).
    body: str


def encode_request(request_id: str, method: str, path: str, params: Mapping[str, str] | None) -> str:
    """The ``RESTRequest`` message for one REST call; ``path`` as for HTTP (``/channels/…``, under ``/ari``)."""
    message: dict[str, Any] = {
        "type": "RESTRequest",
        "request_id": request_id,
        "method": method,
        "uri": path.lstrip("/"),
    }
    if params:
        message["query_strings"] = [{"name": str(name), "value": str(value)} for name, value in params.items()]
    return json.dumps(message, separators=(",", ":"))


def parse_response(message: Mapping[str, Any]) -> RestResponse:
    """A decoded ``RESTResponse`` message as a value; BadResponse when it can't be matched or judged."""
    request_id = message.get("request_id")
    status = message.get("status_code")
    if not isinstance(request_id, str) or not request_id:
        raise BadResponse("RESTResponse without request_id")
    if not isinstance(status, int) or isinstance(status, bool):
        raise BadResponse(f"RESTResponse {request_id} without a numeric status_code")
    body = message.get("message_body")
    reason = message.get("reason_phrase")
    return RestResponse(
        request_id=request_id,
        status=status,
        reason=reason if isinstance(reason, str) else "",
        body=body if isinstance(body, str) else "",
    )


def error_detail(response: RestResponse) -> str:
    """What Asterisk said about a failed request: the body's ``message``, else the body, else the reason."""
    try:
        decoded = json.loads(response.body) if response.body else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and "message" in decoded:
        return str(decoded["message"])
    return response.body.strip() or response.reason


class PendingRequests:
    """Requests sent on the socket and not yet answered, by request id.

    Ids are unique within a client's life (a random prefix per client, so a response that outlived a reconnect
    can never match a newer request of another client on the same Asterisk, and a counter).
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[RestResponse]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, tag: str = "") -> tuple[str, asyncio.Future[RestResponse]]:
        """A new request id (``tag`` in it, to tell the client's own requests from its callers') and the future
        its response will complete."""
        request_id = f"{self._prefix}-{tag}{next(self._counter)}"
        future: asyncio.Future[RestResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return request_id, future

    def resolve(self, response: RestResponse) -> bool:
        """Complete the request ``response`` answers; False when no request waits for it (timed out, unknown)."""
        future = self._waiting.pop(response.request_id, None)
        if future is None or future.done():
            return False
        future.set_result(response)
        return True

    def discard(self, request_id: str, future: asyncio.Future[RestResponse]) -> None:
        """Forget a request (answered, timed out or abandoned); a late response for it is then unknown. Its
        future is settled either way, so a failure nobody awaits any more is not reported as unretrieved."""
        self._waiting.pop(request_id, None)
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()

    def fail_all(self, error: BaseException) -> list[str]:
        """The socket is gone: every waiting request fails with ``error``; their ids."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
        return list(waiting)
