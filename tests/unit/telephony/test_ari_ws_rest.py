"""ARI REST over the event WebSocket: the framing and matching core (sans-I/O), then the client against a scripted
Asterisk on a real local WebSocket (answers, interleaved events, timeouts, unknown ids, a lost socket, an Asterisk
that does not answer REST there) with HTTP (httpx.MockTransport) as the fallback it must take."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve

from ground.config import ConfigError, load_config
from telephony.ari_client import AriClient, AriError, AriNotFound, AriUnavailable
from telephony.ari_ws_rest import (
    BadResponse,
    PendingRequests,
    RestResponse,
    encode_request,
    error_detail,
    parse_response,
)
from telephony.channel import ConnectionLost

# -- the sans-I/O core ----------------------------------------------------------------------------------


def test_a_request_is_framed_as_asterisk_parses_it() -> None:
    message = json.loads(encode_request("r-1", "POST", "/channels/c1/play/p1", {"media": "sound:hello", "lang": "zh"}))
    assert message == {
        "type": "RESTRequest",
        "request_id": "r-1",
        "method": "POST",
        "uri": "channels/c1/play/p1",  # relative to /ari, like Asterisk's HTTP dispatcher
        "query_strings": [{"name": "media", "value": "sound:hello"}, {"name": "lang", "value": "zh"}],
    }
    assert "query_strings" not in json.loads(encode_request("r-2", "POST", "/channels/c1/answer", None))


def test_a_response_is_parsed_and_one_without_id_or_status_refused() -> None:
    assert parse_response(
        {"type": "RESTResponse", "request_id": "r-1", "status_code": 200, "reason_phrase": "OK", "message_body": "{}"}
    ) == RestResponse("r-1", 200, "OK", "{}")
    assert parse_response({"request_id": "r-2", "status_code": 204}) == RestResponse("r-2", 204, "", "")
    with pytest.raises(BadResponse, match="request_id"):
        parse_response({"status_code": 204})
    with pytest.raises(BadResponse, match="numeric status_code"):
        parse_response({"request_id": "r-3", "status_code": "204"})


def test_error_detail_prefers_asterisks_message() -> None:
    assert error_detail(RestResponse("r", 404, "Not Found", '{"message":"Channel not found"}')) == "Channel not found"
    assert error_detail(RestResponse("r", 500, "Server error", "")) == "Server error"
    assert error_detail(RestResponse("r", 400, "Bad request", "not json")) == "not json"


async def test_pending_requests_match_by_id_and_fail_together() -> None:
    pending = PendingRequests()
    first, answer_1 = pending.open()
    second, answer_2 = pending.open("probe-")
    assert first != second
    assert "probe-" in second
    assert len(pending) == 2
    # Out of order: the second is answered first; each future gets its own response.
    assert pending.resolve(RestResponse(second, 200, "OK", "")) is True
    assert (await answer_2).request_id == second
    assert pending.resolve(RestResponse("nobody-1", 204, "", "")) is False  # unknown: the caller logs it
    assert pending.resolve(RestResponse(second, 204, "", "")) is False  # answered already
    third, answer_3 = pending.open()
    pending.discard(third, answer_3)  # timed out: a late answer is unknown
    assert answer_3.cancelled()
    assert pending.resolve(RestResponse(third, 204, "", "")) is False
    assert pending.fail_all(AriUnavailable("socket lost")) == [first]
    with pytest.raises(AriUnavailable, match="socket lost"):
        await answer_1
    assert len(pending) == 0


# -- the client against a scripted Asterisk ------------------------------------------------------------

Answer = Callable[[dict[str, Any]], list[dict[str, Any]] | str | None]


def ok(request: dict[str, Any], status: int = 204, body: Any = None, **extra: Any) -> list[dict[str, Any]]:
    response: dict[str, Any] = {
        "type": "RESTResponse",
        "request_id": request["request_id"],
        "status_code": status,
        "reason_phrase": {200: "OK", 204: "No Content", 404: "Not Found"}.get(status, "Error"),
        "uri": request["uri"],
    }
    if body is not None:
        response |= {"content_type": "application/json", "message_body": json.dumps(body)}
    return [response | extra]


@dataclass
class ScriptedAsterisk:
    """The event WebSocket of an Asterisk that answers REST there (``answer`` decides: messages to send back,
    ``"close"`` to drop the socket, None to stay silent); records every RESTRequest it got."""

    answer: Answer
    received: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[ServerConnection] = field(default_factory=list)

    async def handler(self, ws: ServerConnection) -> None:
        self.sockets.append(ws)
        async for raw in ws:
            request = json.loads(raw)
            self.received.append(request)
            reply = self.answer(request)
            if reply == "close":
                await ws.close()
                return
            for message in reply or ():
                await ws.send(json.dumps(message))

    def requests(self) -> list[tuple[str, str]]:
        return [(r["method"], r["uri"]) for r in self.received if r["uri"] != "asterisk/ping"]


def asterisk_22(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
    """Answers the probe and every request with 204."""
    return ok(request, 200, {"ping": "pong"}) if request["uri"] == "asterisk/ping" else ok(request)


class Http:
    """ARI's HTTP side (the fallback): records what reached it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return httpx.Response(200, json={"over": "http"})


@asynccontextmanager
async def connected(
    answer: Answer, *, timeout: float = 1.0, rest_transport: str = "websocket", wait_for_ws: bool = True
) -> AsyncIterator[tuple[AriClient, ScriptedAsterisk, Http, list[dict[str, Any]]]]:
    """A client whose event stream runs against a ScriptedAsterisk; yields once REST goes over the socket."""
    asterisk, http, events = ScriptedAsterisk(answer), Http(), []
    async with serve(asterisk.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = AriClient(
            "127.0.0.1",
            port,
            "u",
            "p",
            "medhotline",
            transport=httpx.MockTransport(http),
            timeout=timeout,
            rest_transport=rest_transport,  # type: ignore[arg-type]  # the invalid value is tested too
        )

        async def consume() -> None:
            async for event in client.events():
                events.append(event)

        reader = asyncio.create_task(consume())
        try:
            if wait_for_ws:
                await until(lambda: client.transport_in_use == "websocket")
            yield client, asterisk, http, events
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await client.aclose()


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        # Polling: the client's transport and the captured logs have no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_requests_go_over_the_socket_once_the_probe_is_answered() -> None:
    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        if request["uri"].startswith("channels/c1/play"):
            return ok(request, 201, {"id": "p1", "state": "queued"})
        return asterisk_22(request)

    with capture_logs() as logs:
        async with connected(answer) as (client, asterisk, http, _):
            assert await client.request("POST", "/channels/c1/answer") is None
            playback = await client.request("POST", "/channels/c1/play/p1", {"media": "sound:hello"})
    assert playback == {"id": "p1", "state": "queued"}
    assert asterisk.requests() == [("POST", "channels/c1/answer"), ("POST", "channels/c1/play/p1")]
    assert asterisk.received[-1]["query_strings"] == [{"name": "media", "value": "sound:hello"}]
    assert http.requests == []  # nothing over HTTP
    assert ("ari.rest_transport", "websocket") in [(e["event"], e.get("transport")) for e in logs]


async def test_responses_interleaved_with_events_and_out_of_order_are_matched() -> None:
    held: list[dict[str, Any]] = []

    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        if request["uri"] == "asterisk/ping":
            return asterisk_22(request)
        held.append(request)
        if len(held) < 2:
            return None  # the first waits until the second arrives
        first, second = held
        event = {"type": "ChannelDtmfReceived", "channel": {"id": "c1"}, "digit": "5"}
        return [event, *ok(second, 200, {"n": 2}), event, *ok(first, 200, {"n": 1})]

    async with connected(answer) as (client, _, _, events):
        results = await asyncio.gather(client.request("GET", "/channels/c1"), client.request("GET", "/channels/c2"))
        await until(lambda: len(events) == 2)
    assert list(results) == [{"n": 1}, {"n": 2}]
    assert [e["type"] for e in events] == ["ChannelDtmfReceived", "ChannelDtmfReceived"]  # no RESTResponse


async def test_errors_map_as_over_http_and_5xx_is_retried() -> None:
    tries: list[str] = []

    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        if request["uri"] == "channels/gone/answer":
            return ok(request, 404, {"message": "Channel not found"})
        if request["uri"] == "channels/c1/hold":
            return ok(request, 409, {"message": "Channel not in Stasis application"})
        if request["uri"] == "bridges/b1":
            tries.append(request["request_id"])
            return ok(request, 500, {"message": "busy"}) if len(tries) == 1 else ok(request)
        return asterisk_22(request)

    async with connected(answer) as (client, _, http, _):
        with pytest.raises(AriNotFound, match="Channel not found"):
            await client.request("POST", "/channels/gone/answer")
        with pytest.raises(AriError, match="HTTP 409: Channel not in Stasis") as info:
            await client.request("POST", "/channels/c1/hold")
        assert info.value.status == 409
        assert await client.request("DELETE", "/bridges/b1") is None  # 500, then retried (DELETE is idempotent)
    assert len(set(tries)) == 2  # a new request id per attempt
    assert http.requests == []


async def test_an_unanswered_request_times_out_and_its_late_answer_is_dropped() -> None:
    late: list[dict[str, Any]] = []

    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        if request["uri"] == "channels/c1/answer":
            late.append(request)
            return None
        if request["uri"] == "channels/c1/ring":  # answers, then also the timed-out request's late response
            return [*ok(request), *ok(late[0])]
        return asterisk_22(request)

    with capture_logs() as logs:
        async with connected(answer, timeout=0.2) as (client, _, http, events):
            with pytest.raises(AriUnavailable, match="no answer in time"):
                await client.request("POST", "/channels/c1/answer")  # a POST: not retried
            await client.request("POST", "/channels/c1/ring")
            await until(lambda: any(e["event"] == "ari.response_for_unknown_request" for e in logs))
    assert events == []  # the late response is not an event
    assert http.requests == []
    unknown = [e for e in logs if e["event"] == "ari.response_for_unknown_request"]
    assert [e["request_id"] for e in unknown] == [late[0]["request_id"]]


async def test_a_response_for_an_id_nobody_sent_is_logged_and_dropped() -> None:
    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        if request["uri"] == "channels/c1/answer":
            stray = ok({"request_id": "someone-else-7", "uri": "x"})
            broken = {"type": "RESTResponse", "status_code": 204}
            return [*stray, broken, *ok(request)]
        return asterisk_22(request)

    with capture_logs() as logs:
        async with connected(answer) as (client, _, _, events):
            assert await client.request("POST", "/channels/c1/answer") is None
    assert events == []
    assert ("ari.response_for_unknown_request", "someone-else-7") in [(e["event"], e.get("request_id")) for e in logs]
    assert "ari.bad_response" in [e["event"] for e in logs]


async def test_a_socket_lost_mid_request_is_unavailable_and_the_retry_goes_over_http() -> None:
    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        return "close" if request["uri"].startswith("channels/") else asterisk_22(request)

    with capture_logs() as logs:
        async with connected(answer) as (client, _, http, _):
            with pytest.raises(AriUnavailable, match="event socket lost"):
                await client.request("POST", "/channels/c1/answer")  # a POST: not retried
            assert client.transport_in_use == "http"
            # A GET is retried: its next attempt goes over HTTP while the socket is down.
            assert await client.request("GET", "/channels/c1") == {"over": "http"}
    assert http.requests == [("GET", "/ari/channels/c1")]
    assert ("ari.requests_lost_with_socket", 1) in [(e["event"], e.get("requests")) for e in logs]


async def test_an_asterisk_without_rest_over_websocket_is_served_over_http() -> None:
    def older(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        return None  # before 22.3 Asterisk read and ignored what clients sent on the event socket

    with capture_logs() as logs:
        async with connected(older, timeout=0.2, wait_for_ws=False) as (client, asterisk, http, _):
            # Before the probe's answer (or its timeout) requests take HTTP; they never wait for the probe.
            assert await client.request("GET", "/channels/c1") == {"over": "http"}
            await until(lambda: any(e["event"] == "ari.rest_over_websocket_unavailable" for e in logs))
            assert await client.request("GET", "/channels/c2") == {"over": "http"}
            assert client.transport_in_use == "http"
    assert [r["uri"] for r in asterisk.received] == ["asterisk/ping"]  # probed once, nothing else sent there
    assert http.requests == [("GET", "/ari/channels/c1"), ("GET", "/ari/channels/c2")]


async def test_rest_transport_http_never_uses_the_socket() -> None:
    async with connected(asterisk_22, rest_transport="http", wait_for_ws=False) as (client, asterisk, http, _):
        await until(lambda: bool(asterisk.sockets))
        assert await client.request("GET", "/channels/c1") == {"over": "http"}
        await asyncio.sleep(0.05)
    assert asterisk.received == []
    assert http.requests == [("GET", "/ari/channels/c1")]


async def test_after_a_reconnect_rest_returns_to_the_socket() -> None:
    closes = 0

    def answer(request: dict[str, Any]) -> list[dict[str, Any]] | str | None:
        nonlocal closes
        if request["uri"] == "channels/c1/drop" and closes == 0:
            closes += 1
            return "close"
        return asterisk_22(request)

    async with connected(answer) as (client, asterisk, http, _):
        with pytest.raises(AriUnavailable):
            await client.request("POST", "/channels/c1/drop")
    # A fresh event stream (the router reconnects by calling events() again) probes and moves REST back.
    server_side = asterisk
    async with serve(server_side.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = AriClient("127.0.0.1", port, "u", "p", "medhotline", transport=httpx.MockTransport(http))

        async def consume() -> None:
            with pytest.raises(ConnectionLost):
                async for _ in client.events():
                    pass

        reader = asyncio.create_task(consume())
        await until(lambda: client.transport_in_use == "websocket")
        assert await client.request("POST", "/channels/c1/drop") is None
        await server_side.sockets[-1].close()
        await reader
        assert client.transport_in_use == "http"
        await client.aclose()
    assert http.requests == []


def test_an_unknown_rest_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="rest_transport must be 'websocket' or 'http'"):
        AriClient("127.0.0.1", 8088, "u", "p", "medhotline", rest_transport="carrier-pigeon")  # type: ignore[arg-type]


def test_config_refuses_an_unknown_rest_transport_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text('[asterisk]\nrest_transport = "carrier-pigeon"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "asterisk.rest_transport" in str(info.value)
    assert "websocket" in str(info.value)
    assert "http" in str(info.value)
    assert load_config(None, environ={}).asterisk.rest_transport == "websocket"
