"""The ARI client (REST over httpx.MockTransport, events over a real local WebSocket) and the ARI channel."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from telephony import ari_channel
from telephony.ari_channel import AriCallChannel, AriDispatcher, event_channel_id
from telephony.ari_client import RETRY_ATTEMPTS, AriClient, AriError, AriNotFound, AriUnavailable
from telephony.channel import CallerHungUp, CallInfo, ConnectionLost

CHANNEL_ID = "1700000000.1"
INFO = CallInfo(channel_id=CHANNEL_ID, channel_name="PJSIP/trunk-00000001", transport="ari", flow="hotline", dialed="")

HandlerFn = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def _client(handler: HandlerFn, port: int = 8088, password: str = "secret") -> AriClient:
    return AriClient("127.0.0.1", port, "medhotline", password, "medhotline", transport=httpx.MockTransport(handler))


class FakeAri:
    """ARI's REST side: records requests and answers with a fixed status (and body) per path prefix."""

    def __init__(self, responses: dict[str, httpx.Response] | None = None) -> None:
        self.responses = responses or {}
        self.requests: list[httpx.Request] = []
        self.arrived = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.arrived.set()
        for prefix, response in self.responses.items():
            if request.url.path.startswith(prefix):
                return response
        return httpx.Response(204)

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]


# -- AriClient.request --------------------------------------------------------------------------------


async def test_request_returns_json_and_sends_basic_auth() -> None:
    fake = FakeAri({"/ari/channels": httpx.Response(200, json={"id": CHANNEL_ID, "state": "Up"})})
    client = _client(fake)
    try:
        assert await client.request("GET", f"/channels/{CHANNEL_ID}", {"x": "1"}) == {"id": CHANNEL_ID, "state": "Up"}
        assert await client.request("POST", "/other") is None  # 204: no body
    finally:
        await client.aclose()
    first = fake.requests[0]
    assert str(first.url) == f"http://127.0.0.1:8088/ari/channels/{CHANNEL_ID}?x=1"
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"medhotline:secret").decode()


@pytest.mark.parametrize(
    ("response", "error_type", "status", "detail"),
    [
        (httpx.Response(404, json={"message": "Channel not found"}), AriNotFound, 404, "Channel not found"),
        (httpx.Response(500, json={"message": "Allocation failed"}), AriError, 500, "Allocation failed"),
        (httpx.Response(503, text="Service Unavailable\n"), AriError, 503, "Service Unavailable"),
        (httpx.Response(502), AriError, 502, "Bad Gateway"),
        (httpx.Response(200, text="<html>not json</html>"), AriError, 200, "response is not JSON"),
    ],
)
async def test_request_errors(response: httpx.Response, error_type: type[AriError], status: int, detail: str) -> None:
    client = _client(FakeAri({"/": response}))
    try:
        with pytest.raises(AriError) as info:
            await client.request("POST", "/channels/x/answer")
    finally:
        await client.aclose()
    assert type(info.value) is error_type
    assert info.value.status == status
    assert str(info.value) == f"ARI POST /channels/x/answer failed with HTTP {status}: {detail}"


async def test_transport_error_is_unavailable_not_a_lost_connection() -> None:
    """A refused REST request is not a lost event stream: the call's events may still arrive."""
    attempts = 0

    async def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        raise httpx.ConnectError("Connection refused", request=request)

    client = _client(refuse)
    try:
        with pytest.raises(AriUnavailable, match="Asterisk unreachable") as info:
            await client.request("GET", "/asterisk/info")
    finally:
        await client.aclose()
    assert not isinstance(info.value, ConnectionLost)
    assert attempts == RETRY_ATTEMPTS  # a GET is repeated


class Flaky:
    """Fails the first ``failures`` requests (raising ``error`` or answering ``status``), then answers 204."""

    def __init__(self, failures: int, *, error: type[httpx.TransportError] | None = None, status: int = 500) -> None:
        self.failures = failures
        self.error = error
        self.status = status
        self.requests: list[httpx.Request] = []
        self.second = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) == 2:
            self.second.set()
        if len(self.requests) <= self.failures:
            if self.error is not None:
                raise self.error("injected", request=request)
            return httpx.Response(self.status, json={"message": "injected"})
        return httpx.Response(204)


@pytest.mark.parametrize(
    "flaky",
    [
        Flaky(2, error=httpx.ReadTimeout),
        Flaky(2, error=httpx.PoolTimeout),  # waited for a free connection: the failure seen at 300 calls
        Flaky(1, error=httpx.RemoteProtocolError),
        Flaky(2, status=503),
    ],
    ids=["read-timeout", "pool-timeout", "reset", "503"],
)
async def test_idempotent_requests_are_retried_until_answered(flaky: Flaky) -> None:
    client = _client(flaky)
    try:
        assert await client.request("DELETE", f"/channels/{CHANNEL_ID}") is None
        assert await client.request("POST", f"/channels/{CHANNEL_ID}/answer", retry=True) is None
    finally:
        await client.aclose()
    assert len(flaky.requests) == flaky.failures + 2


@pytest.mark.parametrize(
    ("flaky", "error"),
    [
        (Flaky(1, error=httpx.ReadTimeout), AriUnavailable),  # a POST is not repeated unless said so
        (Flaky(1, status=500), AriError),
    ],
)
async def test_other_posts_are_tried_once(flaky: Flaky, error: type[Exception]) -> None:
    client = _client(flaky)
    try:
        with pytest.raises(error):
            await client.request("POST", "/channels", {"endpoint": "PJSIP/agent"})
    finally:
        await client.aclose()
    assert len(flaky.requests) == 1


async def test_client_errors_are_not_retried() -> None:
    flaky = Flaky(5, status=409)
    client = _client(flaky)
    try:
        with pytest.raises(AriError):
            await client.request("GET", "/recordings/live/x")
    finally:
        await client.aclose()
    assert len(flaky.requests) == 1  # a 409 says the request is wrong now; repeating it changes nothing


async def test_requests_waiting_for_a_connection_time_out_as_unavailable() -> None:
    """The limit the issue met at 300 calls: requests queue for the pool's connections. Over real sockets to a
    server that accepts and never answers, with a pool of one: both end as AriUnavailable within the timeout."""

    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # never answers; the client gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AriClient("127.0.0.1", port, "u", "p", "medhotline", timeout=0.2, max_connections=1)
    try:
        results = await asyncio.gather(
            client.request("POST", "/channels/a/answer"),
            client.request("POST", "/channels/b/answer"),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    assert all(isinstance(r, AriUnavailable) and "no answer in time" in str(r) for r in results), results
    assert {str(r).rsplit("(", 1)[1] for r in results} == {"ReadTimeout)", "PoolTimeout)"}


# -- event routing ------------------------------------------------------------------------------------


def _event(type_: str, channel_id: str = CHANNEL_ID, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "channel": {"id": channel_id, "name": "PJSIP/x"}, **extra}


def _finished(playback_id: str, channel_id: str = CHANNEL_ID, state: str = "done") -> dict[str, Any]:
    playback = {"id": playback_id, "target_uri": f"channel:{channel_id}", "state": state}
    return {"type": "PlaybackFinished", "playback": playback}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (_event("StasisStart"), CHANNEL_ID),
        (_finished("pb-1", "other.2"), "other.2"),
        ({"type": "PlaybackStarted", "playback": {"id": "p", "target_uri": "bridge:b1"}}, None),
        ({"type": "ApplicationReplaced"}, None),
        ({"type": "Weird", "channel": "not a dict"}, None),
    ],
)
def test_event_channel_id(event: dict[str, Any], expected: str | None) -> None:
    assert event_channel_id(event) == expected


async def test_dispatch_routes_to_registered_channel_and_logs_unknown() -> None:
    dispatcher = AriDispatcher()
    channel = AriCallChannel(_client(FakeAri()), INFO)
    dispatcher.register(channel)
    assert len(dispatcher) == 1
    with capture_logs() as logs:
        assert dispatcher.dispatch(_event("ChannelDtmfReceived", digit="1"))
        assert not dispatcher.dispatch(_event("ChannelDtmfReceived", "stranger.9"))
        assert not dispatcher.dispatch(_event("StasisEnd", "stranger.9"))
        assert not dispatcher.dispatch(_event("ChannelDestroyed", "stranger.9"))
        assert not dispatcher.dispatch({"type": "ApplicationReplaced"})
    assert logs == [
        {
            "event": "ari.event_for_unknown_channel",
            "event_type": "ChannelDtmfReceived",
            "channel_id": "stranger.9",
            "log_level": "warning",
        }
    ]
    dispatcher.unregister(CHANNEL_ID)
    assert len(dispatcher) == 0
    with capture_logs() as logs:
        assert not dispatcher.dispatch(_event("StasisEnd"))
        # A closed call's late events are expected (a playback ending as it was hung up): not warnings.
        assert not dispatcher.dispatch(_finished("pb-late"))
        assert not dispatcher.dispatch(_event("ChannelDtmfReceived", digit="5"))
    assert {e["log_level"] for e in logs} == {"debug"}
    assert {e["event"] for e in logs} == {"ari.event_for_closed_call"}


# -- AriCallChannel ------------------------------------------------------------------------------------


@asynccontextmanager
async def _call(fake: FakeAri) -> AsyncIterator[tuple[AriCallChannel, AriDispatcher]]:
    client = _client(fake)
    channel = AriCallChannel(client, INFO)
    dispatcher = AriDispatcher()
    dispatcher.register(channel)
    try:
        yield channel, dispatcher
    finally:
        await client.aclose()


async def _started_play(fake: FakeAri, channel: AriCallChannel) -> tuple[asyncio.Task[str | None], str]:
    """Start play() and return its task and the playback id it posted."""
    task = asyncio.create_task(channel.play("medhotline/ab12"))
    await asyncio.wait_for(fake.arrived.wait(), 5)
    request = fake.requests[-1]
    prefix = f"/ari/channels/{CHANNEL_ID}/play/"
    assert request.method == "POST"
    assert request.url.path.startswith(prefix)
    assert request.url.params["media"] == "sound:medhotline/ab12"
    return task, request.url.path.removeprefix(prefix)


async def _listened(fake: FakeAri, channel: AriCallChannel, dispatcher: AriDispatcher) -> asyncio.Task[None]:
    """Open and close the caller's audio tap; returns the task, still waiting for the caller to leave the bridge."""

    async def tap() -> None:
        async with channel.caller_audio(1.0):
            pass

    task = asyncio.create_task(tap())
    for _ in range(200):
        if any(m == "DELETE" and p.startswith("/ari/bridges/listen-") for m, p in fake.calls()):
            break
        await asyncio.sleep(0.005)
    assert not task.done()
    return task


def _bridge_of_listen(fake: FakeAri) -> str:
    return next(p for m, p in fake.calls() if m == "DELETE" and p.startswith("/ari/bridges/")).rsplit("/", 1)[1]


async def test_the_tap_ends_only_when_the_caller_has_left_its_bridge_and_keeps_other_events() -> None:
    # A prompt requested before the caller has left the bridge would be dropped by Asterisk: silence.
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        task = await _listened(fake, channel, dispatcher)
        bridge = _bridge_of_listen(fake)
        dispatcher.dispatch(_event("ChannelDtmfReceived", digit="0"))
        dispatcher.dispatch(_event("ChannelLeftBridge", bridge={"id": "another-bridge"}))
        await asyncio.sleep(0.02)
        assert not task.done()
        dispatcher.dispatch(_event("ChannelLeftBridge", bridge={"id": bridge}))
        await asyncio.wait_for(task, 5)
        # The key pressed meanwhile is still there for the menu, and in order.
        first = await channel.next_event(1)
        second = await channel.next_event(1)
        assert first is not None
        assert first["type"] == "ChannelDtmfReceived"
        assert second is not None
        assert second["bridge"]["id"] == "another-bridge"
        assert await channel.next_event(0.01) is None


async def test_the_tap_stops_waiting_for_a_caller_who_hung_up_or_a_bridge_that_never_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        task = await _listened(fake, channel, dispatcher)
        dispatcher.dispatch(_event("StasisEnd"))
        await asyncio.wait_for(task, 5)
        assert (await channel.next_event(1) or {})["type"] == "StasisEnd"  # left for the flow to see
    monkeypatch.setattr(ari_channel, "LEAVE_TIMEOUT", 0.05)
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        with capture_logs() as logs:
            task = await _listened(fake, channel, dispatcher)
            await asyncio.wait_for(task, 5)
        assert [e["event"] for e in logs] == ["ari.bridge_leave_unconfirmed"]


async def test_heard_from_waits_for_the_first_event_and_leaves_it_queued() -> None:
    """An agent's leg just originated: the queue waits (briefly) for Asterisk's first report on it before the
    caller's side, and that event is still there for whoever reads the leg's events next."""
    dispatcher = AriDispatcher()
    leg = AriCallChannel(_client(FakeAri()), INFO)
    dispatcher.register(leg)
    assert not await leg.heard_from(0.01)  # nothing yet: False once the time is up
    waiting = asyncio.ensure_future(leg.heard_from(5))
    await asyncio.sleep(0)
    assert not waiting.done()
    dispatcher.dispatch(_event("Dial", dialstatus=""))
    assert await asyncio.wait_for(waiting, 1)
    assert await leg.heard_from(0)  # once heard, at once
    assert (await leg.next_event(1) or {})["type"] == "Dial"


async def test_play_returns_when_its_own_playback_finishes() -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        task, playback_id = await _started_play(fake, channel)
        assert playback_id
        dispatcher.dispatch(_finished("someone-elses-playback"))
        dispatcher.dispatch(_event("ChannelVarset"))
        await asyncio.sleep(0.01)
        assert not task.done()  # other playbacks and unrelated events don't end it
        dispatcher.dispatch(_finished(playback_id))
        await asyncio.wait_for(task, 5)


async def test_failed_playback_is_logged_and_the_flow_goes_on() -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        with capture_logs() as logs:
            task, playback_id = await _started_play(fake, channel)
            dispatcher.dispatch(_finished(playback_id, state="failed"))
            await asyncio.wait_for(task, 5)
    assert [(e["event"], e["sound"]) for e in logs] == [("ari.playback_failed", "medhotline/ab12")]


@pytest.mark.parametrize("gone", ["StasisEnd", "ChannelHangupRequest", "ChannelDestroyed"])
async def test_hangup_event_during_play_is_caller_hung_up(gone: str) -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        task, _ = await _started_play(fake, channel)
        dispatcher.dispatch(_event(gone))
        with pytest.raises(CallerHungUp):
            await asyncio.wait_for(task, 5)
        await channel.hangup()  # no-op: the caller is gone
        with pytest.raises(CallerHungUp):
            await channel.play("medhotline/next")
    assert [method for method, _ in fake.calls()] == ["POST"]


async def test_fail_all_wakes_a_waiting_play_with_connection_lost() -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, dispatcher):
        task, _ = await _started_play(fake, channel)
        dispatcher.fail_all(ConnectionLost("ARI event stream closed by Asterisk"))
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(task, 5)


async def test_answer_on_a_vanished_channel_is_caller_hung_up() -> None:
    fake = FakeAri({"/ari/channels": httpx.Response(404, json={"message": "Channel not found"})})
    async with _call(fake) as (channel, _):
        with pytest.raises(CallerHungUp):
            await channel.answer()
        await channel.hangup()
    assert fake.calls() == [("POST", f"/ari/channels/{CHANNEL_ID}/answer")]  # no DELETE after the hang-up


async def test_answer_then_hangup_deletes_the_channel_once() -> None:
    fake = FakeAri()
    async with _call(fake) as (channel, _):
        await channel.answer()
        await channel.hangup()
        await channel.hangup()
    assert fake.calls() == [("POST", f"/ari/channels/{CHANNEL_ID}/answer"), ("DELETE", f"/ari/channels/{CHANNEL_ID}")]


async def test_answer_that_timed_out_is_repeated() -> None:
    flaky = Flaky(1, error=httpx.ReadTimeout)
    client = _client(flaky)
    channel = AriCallChannel(client, INFO)
    try:
        await channel.answer()
    finally:
        await client.aclose()
    assert [r.url.path for r in flaky.requests] == [f"/ari/channels/{CHANNEL_ID}/answer"] * 2


async def test_play_that_got_no_answer_is_repeated_under_a_new_playback_id() -> None:
    flaky = Flaky(1, error=httpx.ReadTimeout)
    client = _client(flaky)
    channel = AriCallChannel(client, INFO)
    dispatcher = AriDispatcher()
    dispatcher.register(channel)
    try:
        task = asyncio.create_task(channel.play("medhotline/ab12"))
        await asyncio.wait_for(flaky.second.wait(), 5)
        first, second = (r.url.path.rsplit("/", 1)[1] for r in flaky.requests)
        assert first != second
        dispatcher.dispatch(_finished(first))  # the first started after all: its end is not this prompt's
        await asyncio.sleep(0.01)
        assert not task.done()
        dispatcher.dispatch(_finished(second))
        await asyncio.wait_for(task, 5)
    finally:
        await client.aclose()


async def test_play_that_keeps_failing_raises_unavailable() -> None:
    flaky = Flaky(99, status=500)
    client = _client(flaky)
    channel = AriCallChannel(client, INFO)
    try:
        with pytest.raises(AriError):
            await channel.play("medhotline/ab12")
    finally:
        await client.aclose()
    assert len(flaky.requests) == RETRY_ATTEMPTS
    assert len({r.url.path for r in flaky.requests}) == RETRY_ATTEMPTS  # a new playback id each time


@pytest.mark.parametrize("status", [404, 500])
async def test_hangup_tolerates_a_gone_channel_but_not_other_errors(status: int) -> None:
    fake = FakeAri({"/ari/channels": httpx.Response(status, json={"message": "x"})})
    async with _call(fake) as (channel, _):
        if status == 404:
            await channel.hangup()
        else:
            with pytest.raises(AriError):
                await channel.hangup()


# -- AriClient.events over a real WebSocket -------------------------------------------------------------

EVENTS = [
    {"type": "StasisStart", "channel": {"id": CHANNEL_ID}, "args": ["hotline"]},
    {"type": "ChannelDtmfReceived", "channel": {"id": CHANNEL_ID}, "digit": "1"},
]


@asynccontextmanager
async def _ari_websocket(password: str) -> AsyncIterator[tuple[int, list[str]]]:
    """A local ARI event endpoint: checks path and credentials, sends two events and junk, then closes."""
    expected = "Basic " + base64.b64encode(f"medhotline:{password}".encode()).decode()
    paths: list[str] = []

    def check(connection: ServerConnection, request: Request) -> Response | None:
        paths.append(request.path)
        if not request.path.startswith("/ari/events?"):
            return connection.respond(HTTPStatus.NOT_FOUND, "no such path\n")
        if request.headers.get("Authorization") != expected:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        for event in EVENTS:
            await ws.send(json.dumps(event))
        await ws.send("this is not JSON")
        await ws.send(json.dumps(["no", "type"]))
        await ws.close()

    async with serve(handler, "127.0.0.1", 0, process_request=check) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield port, paths


async def _noop(request: httpx.Request) -> httpx.Response:
    return httpx.Response(204)


async def _collect(client: AriClient, into: list[dict[str, Any]]) -> None:
    async for event in client.events():
        into.append(event)


async def test_events_yields_events_then_connection_lost() -> None:
    received: list[dict[str, Any]] = []
    async with _ari_websocket("secret") as (port, paths):
        client = _client(_noop, port=port, password="secret")
        with capture_logs() as logs, pytest.raises(ConnectionLost, match="closed by Asterisk"):
            await _collect(client, received)
        await client.aclose()
    assert received == EVENTS
    assert paths == ["/ari/events?app=medhotline&subscribeAll=false"]
    assert [(e["event"], e.get("reason")) for e in logs] == [
        ("ari.connected", None),
        ("ari.bad_event", "not JSON"),
        ("ari.bad_event", "no event type"),
    ]


async def test_events_with_wrong_credentials_is_ari_error() -> None:
    async with _ari_websocket("secret") as (port, _):
        client = _client(_noop, port=port, password="wrong")
        received: list[dict[str, Any]] = []
        with pytest.raises(AriError) as info:
            await _collect(client, received)
        await client.aclose()
    assert received == []
    assert info.value.status == 401
    assert "credentials refused" in str(info.value)


async def test_events_with_nothing_listening_is_connection_lost() -> None:
    async with _ari_websocket("secret") as (port, _):
        pass  # the port is free again
    client = _client(_noop, port=port)
    with pytest.raises(ConnectionLost, match="event stream lost"):
        await _collect(client, [])
    await client.aclose()
