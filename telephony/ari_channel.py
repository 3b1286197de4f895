"""``CallChannel`` over ARI, and the dispatcher that hands each Stasis event to its call.

One WebSocket carries the events of every call. The dispatcher keeps a queue per channel in Stasis; a call's
task reads only its own queue. Events for channels the service does not know (left Stasis, or another
node's) are logged and dropped, never allowed to disturb another call.

Recording part of a call uses a snoop channel (spy on both directions) recorded by ARI. Like the external-media
tap of ``caller_audio`` it is a helper channel, never a call: it enters Stasis with the argument ``SNOOP_ARG``
and its name starts with ``SNOOP_CHANNEL_PREFIX``; the service must not start a flow for its StasisStart.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ground.logs import get_logger
from telephony.ari_client import (
    RETRY_ATTEMPTS,
    RETRY_PAUSE,
    AriClient,
    AriError,
    AriNotFound,
    AriUnavailable,
    is_retryable,
)
from telephony.channel import CallerHungUp, CallInfo, ChannelError, check_recording_name
from telephony.rtp import AudioLosses, RtpReceiver

log = get_logger(__name__)

_GONE_EVENTS = frozenset({"StasisEnd", "ChannelDestroyed", "ChannelHangupRequest"})
# Channels Asterisk creates for the service's own media taps; they are never calls.
MEDIA_CHANNEL_PREFIX = "UnicastRTP/"
# The snoop channels that record part of a call: their StasisStart carries this first argument, and Asterisk
# names them ``Snoop/<snooped channel id>-<n>``. Both mean "a helper of a call, not a call".
SNOOP_ARG = "snoop"
SNOOP_CHANNEL_PREFIX = "Snoop/"
# Our id for the snoop channel of recording ``<name>``: known without asking, so a stop needs no lookup.
SNOOP_ID_PREFIX = "snoop-"
# How long (attempts x pause) to wait for the snoop channel to enter Stasis, a recording to begin, and a stopped
# recording to close its file. Asterisk does each within milliseconds; the bound keeps a broken one from hanging.
_WAIT_ATTEMPTS = 40
_WAIT_PAUSE = 0.05
# How long to wait for the caller to leave a bridge we deleted before playing to them again. Asterisk does it
# within milliseconds; past this the prompt is tried anyway (and logged) rather than hold the call.
LEAVE_TIMEOUT = 2.0
# How many ended calls' channel ids the dispatcher remembers, to recognise their late events.
_CLOSED_REMEMBERED = 4096


def event_channel_id(event: dict[str, Any]) -> str | None:
    """The channel an event is about, from its channel or, for playbacks, its target URI."""
    channel = event.get("channel")
    if isinstance(channel, dict) and isinstance(channel.get("id"), str):
        return str(channel["id"])
    playback = event.get("playback")
    if isinstance(playback, dict):
        target = playback.get("target_uri", "")
        if isinstance(target, str) and target.startswith("channel:"):
            return target.removeprefix("channel:")
    return None


class AriCallChannel:
    """One call in Stasis."""

    def __init__(self, client: AriClient, info: CallInfo) -> None:
        self._client = client
        self._info = info
        self._events: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._heard = asyncio.Event()  # set by the first event (or error) delivered for this channel
        self._gone = False
        self._audio_losses = AudioLosses()

    def audio_losses(self) -> AudioLosses:
        """What this call's listening taps lost of the caller's audio, all taps so far (AudioLossReport)."""
        return self._audio_losses

    @property
    def info(self) -> CallInfo:
        return self._info

    def deliver(self, event: dict[str, Any] | BaseException) -> None:
        self._events.put_nowait(event)
        self._heard.set()

    async def heard_from(self, timeout: float) -> bool:
        """Whether Asterisk has reported anything about this channel yet, waiting up to ``timeout`` seconds; the
        event stays queued for ``next_event``. For a leg just originated, the first event (in practice its state
        turning to Ringing) means the phone has been sent the call."""
        if not self._heard.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._heard.wait()
        return self._heard.is_set()

    async def _call(
        self, method: str, path: str, params: dict[str, str] | None = None, *, retry: bool | None = None
    ) -> Any:
        if self._gone:
            raise CallerHungUp("caller hung up")
        try:
            return await self._client.request(method, path, params, retry=retry)
        except AriNotFound:
            # The channel vanished between the event and our request: that is a hang-up, not an error.
            self._gone = True
            raise CallerHungUp("caller hung up") from None

    async def _next_event(self) -> dict[str, Any]:
        item = await self._events.get()
        if isinstance(item, BaseException):
            raise item
        if item["type"] in _GONE_EVENTS:
            self._gone = True
            raise CallerHungUp("caller hung up")
        return item

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next raw event of this channel, hang-up events included (they mark it gone); None on timeout.

        For code that drives a channel beyond the IVR: the queue waiting for an agent, an agent's leg.
        """
        try:
            async with asyncio.timeout(timeout):
                item = await self._events.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        if item["type"] in _GONE_EVENTS:
            self._gone = True
        return item

    async def wait_gone(self) -> dict[str, Any]:
        """Wait until the channel hangs up or leaves Stasis; returns that event. Other events are dropped."""
        while True:
            event = await self.next_event()
            if event is not None and event["type"] in _GONE_EVENTS:
                return event

    @property
    def gone(self) -> bool:
        return self._gone

    async def answer(self) -> None:
        # Answering an answered channel changes nothing, so a request that got no answer is simply repeated.
        await self._call("POST", f"/channels/{self._info.channel_id}/answer", retry=True)

    def _discard_pending_digits(self) -> None:
        """Keys pressed before a prompt that does not allow barge-in are not input for what follows."""
        kept: list[dict[str, Any] | BaseException] = []
        while not self._events.empty():
            item = self._events.get_nowait()
            if isinstance(item, BaseException) or item.get("type") != "ChannelDtmfReceived":
                kept.append(item)
        for item in kept:
            self._events.put_nowait(item)

    async def play(self, sound: str, *, barge_in: bool = False) -> str | None:
        if not barge_in:
            self._discard_pending_digits()
        playback_id = await self._start_playback(sound)
        while True:
            event = await self._next_event()
            playback = event.get("playback") or {}
            if event["type"] == "PlaybackFinished" and playback.get("id") == playback_id:
                if playback.get("state") == "failed":
                    log.error("ari.playback_failed", sound=sound)
                return None
            if event["type"] == "ChannelDtmfReceived" and barge_in:
                with contextlib.suppress(AriNotFound):  # the prompt may have ended in the meantime
                    await self._client.request("DELETE", f"/playbacks/{playback_id}")
                return str(event.get("digit", ""))

    async def _start_playback(self, sound: str) -> str:
        """Start playing ``sound``; returns the playback id. A request that got no answer (or a 5xx) is repeated
        under a new playback id: should the first have started after all, its events carry the old id and are
        passed over by the wait for this one, so the caller hears the prompt rather than silence."""
        pause = RETRY_PAUSE
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            playback_id = str(uuid.uuid4())
            try:
                await self._call(
                    "POST",
                    f"/channels/{self._info.channel_id}/play/{playback_id}",
                    {"media": f"sound:{sound}"},
                    retry=False,
                )
            except (AriError, AriUnavailable) as exc:
                if attempt == RETRY_ATTEMPTS or not is_retryable(exc):
                    raise
                log.warning("ari.playback_retried", attempt=attempt, reason=str(exc))
                await asyncio.sleep(pause)
                pause *= 2
            else:
                return playback_id
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def read_digits(self, *, max_digits: int, timeout: float, terminator: str | None = None) -> str:
        digits = ""
        while len(digits) < max_digits:
            try:
                # The timeout is per key: other events (variables, bridges) arriving meanwhile don't extend it.
                async with asyncio.timeout(timeout):
                    event = await self._next_event()
                    while event["type"] != "ChannelDtmfReceived":
                        event = await self._next_event()
            except TimeoutError:
                break
            digit = str(event.get("digit", ""))
            if terminator is not None and digit == terminator:
                break
            digits += digit
        return digits

    async def set_variable(self, name: str, value: str) -> None:
        await self._call("POST", f"/channels/{self._info.channel_id}/variable", {"variable": name, "value": value})

    async def transfer(self, extension: str, trunk: str | None = None) -> None:
        await self.set_variable("MEDHOTLINE_TRUNK", trunk or "")
        await self._call(
            "POST",
            f"/channels/{self._info.channel_id}/continue",
            {"context": "medhotline-transfer", "extension": extension, "priority": "1"},
        )
        # The channel leaves Stasis; it is no longer ours to hang up.
        self._gone = True

    @asynccontextmanager
    async def caller_audio(self, max_seconds: float = 30.0) -> AsyncIterator[AsyncIterator[bytes]]:
        """Tap the caller's audio: an external-media channel sends it as RTP (μ-law) to a local port.

        The caller and the tap share a mixing bridge while the tap is open; everything is torn down on exit,
        also when the caller hangs up meanwhile.
        """
        # A silent caller sends no RTP at all, so silence may last the whole listening window.
        receiver = RtpReceiver(self._client.media_host, 0, idle_timeout=max_seconds)
        host, port = await receiver.start()
        bridge_id = f"listen-{uuid.uuid4()}"
        media_id = f"{self._info.channel_id}-listen"
        try:
            await self._call("POST", f"/bridges/{bridge_id}", {"type": "mixing"})
            await self._call(
                "POST",
                "/channels/externalMedia",
                {
                    "channelId": media_id,
                    "app": self._client.app,
                    "external_host": f"{host}:{port}",
                    "format": "ulaw",
                },
            )
            await self._call("POST", f"/bridges/{bridge_id}/addChannel", {"channel": self._info.channel_id})
            await self._add_when_in_stasis(bridge_id, media_id)
            yield aiter(receiver)
        finally:
            with contextlib.suppress(ChannelError):
                await self._client.request("DELETE", f"/channels/{media_id}")
            with contextlib.suppress(ChannelError):
                await self._client.request("DELETE", f"/bridges/{bridge_id}")
                await self._left(bridge_id)
            await receiver.close()
            self._count_losses(receiver.losses())

    def _count_losses(self, losses: AudioLosses) -> None:
        if losses == AudioLosses():
            return  # a clean stream: nothing to count (and no log line per listen)
        self._audio_losses += losses
        node = self._client.audio_losses = self._client.audio_losses + losses
        # The metric: per stream, with the node's running totals (a collector scrapes the structured log; there is
        # no metrics endpoint). call_id is bound in the log context; the call's record gets it from the IVR.
        log.info(
            "rtp.audio_losses",
            gaps=losses.gaps,
            late=losses.late,
            duplicates=losses.duplicates,
            overflow=losses.overflow,
            dropped=losses.dropped,
            dropped_total=node.dropped,
            gaps_total=node.gaps,
            overflow_total=node.overflow,
        )

    async def _left(self, bridge_id: str) -> None:
        """Wait until the caller has really left ``bridge_id`` (its ``ChannelLeftBridge``), keeping every other
        event for whoever reads next, in order.

        Why: ``DELETE /bridges/<id>`` answers before the caller's channel has left the bridge. A prompt started
        in that moment is queued on the bridge channel and dropped when the channel leaves: no PlaybackStarted,
        no PlaybackFinished, and the caller hears silence (seen with two callers leaving ``listen`` within
        100 ms on a loaded machine)."""
        kept: list[dict[str, Any] | BaseException] = []
        try:
            async with asyncio.timeout(LEAVE_TIMEOUT):
                while True:
                    item = await self._events.get()
                    kept.append(item)
                    if isinstance(item, BaseException) or item["type"] in _GONE_EVENTS:
                        return
                    if item["type"] == "ChannelLeftBridge" and (item.get("bridge") or {}).get("id") == bridge_id:
                        kept.pop()
                        return
        except TimeoutError:
            log.warning("ari.bridge_leave_unconfirmed", bridge=bridge_id, waited=LEAVE_TIMEOUT)
        finally:
            while not self._events.empty():
                kept.append(self._events.get_nowait())
            for item in kept:
                self._events.put_nowait(item)

    async def _add_when_in_stasis(self, bridge_id: str, channel_id: str, attempts: int = 40) -> None:
        """A new external-media channel enters Stasis a moment after it is created; until then Asterisk refuses
        to bridge it (422). Retrying briefly is simpler than routing that channel's StasisStart here."""
        for _ in range(attempts - 1):
            try:
                await self._client.request("POST", f"/bridges/{bridge_id}/addChannel", {"channel": channel_id})
            except AriError as exc:
                if exc.status != 422:
                    raise
                await asyncio.sleep(0.05)
            else:
                return
        await self._client.request("POST", f"/bridges/{bridge_id}/addChannel", {"channel": channel_id})

    async def hangup(self) -> None:
        """Hang up (a DELETE, retried on no answer). If Asterisk still does not answer, the failure is raised:
        the caller may still be on the line, and whoever hangs up must know."""
        if self._gone:
            return
        with contextlib.suppress(AriNotFound):
            await self._client.request("DELETE", f"/channels/{self._info.channel_id}")
        self._gone = True

    # -- recording ----------------------------------------------------------------------------------

    async def start_recording(self, name: str) -> None:
        """Snoop on both directions of the call and record the snoop channel as ``<name>.wav`` (8 kHz) in
        Asterisk's recording directory. Returns once Asterisk reports the recording as running, so nothing said
        after this returns is missing from the file."""
        check_recording_name(name)
        snoop_id = f"{SNOOP_ID_PREFIX}{name}"
        await self._call(
            "POST",
            f"/channels/{self._info.channel_id}/snoop",
            {"spy": "both", "whisper": "none", "app": self._client.app, "appArgs": SNOOP_ARG, "snoopId": snoop_id},
        )
        try:
            await self._record_when_in_stasis(snoop_id, name)
            await self._wait_until_recording(name)
        except BaseException:
            # No half-started recording left behind: the snoop channel goes, and with it any recording of it.
            with contextlib.suppress(ChannelError):
                await self._client.request("DELETE", f"/channels/{snoop_id}")
            raise

    async def _record_when_in_stasis(self, snoop_id: str, name: str) -> None:
        """A snoop channel enters Stasis a moment after it is created (its own thread); until then ARI answers 409
        "Channel not in Stasis application". Other 409s (the name exists: ifExists=fail) are not retried."""
        params = {"name": name, "format": "wav", "ifExists": "fail", "beep": "false", "terminateOn": "none"}
        for attempt in range(_WAIT_ATTEMPTS):
            try:
                await self._client.request("POST", f"/channels/{snoop_id}/record", params)
            except AriNotFound:
                # The snoop channel ends with the call: a vanished snoop channel means the caller hung up.
                self._gone = True
                raise CallerHungUp("caller hung up") from None
            except AriError as exc:
                if exc.status != 409 or "not in stasis" not in str(exc).lower() or attempt == _WAIT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(_WAIT_PAUSE)
            else:
                return

    async def _wait_until_recording(self, name: str) -> None:
        """The recording is queued on the snoop channel and starts shortly after; wait for state "recording"."""
        state = "queued"
        for _ in range(_WAIT_ATTEMPTS):
            try:
                live = await self._client.request("GET", f"/recordings/live/{name}")
            except AriNotFound:
                state = "gone"
            else:
                state = str(live.get("state", "")) if isinstance(live, dict) else ""
            if state == "recording":
                return
            if state != "queued":
                break
            await asyncio.sleep(_WAIT_PAUSE)
        if self._gone:
            raise CallerHungUp("caller hung up")
        raise ChannelError(f"recording {name!r} did not start (state {state!r})")

    async def stop_recording(self, name: str) -> None:
        """Stop, wait until Asterisk has closed the file (the live recording disappears only after that), and
        remove the snoop channel. Works after the caller hung up: everything already gone is skipped."""
        check_recording_name(name)
        try:
            await self._client.request("POST", f"/recordings/live/{name}/stop")
        except AriError as exc:
            # 404: never started, already stopped, or ended with the call and gone. 409 ("not in session"): it
            # has just ended by itself and is closing; the wait below sees it go.
            if exc.status not in (404, 409):
                raise
        for _ in range(_WAIT_ATTEMPTS):
            try:
                await self._client.request("GET", f"/recordings/live/{name}")
            except AriNotFound:
                break
            await asyncio.sleep(_WAIT_PAUSE)
        else:
            log.warning("ari.recording_still_live", recording=name)
        with contextlib.suppress(AriNotFound):
            await self._client.request("DELETE", f"/channels/{SNOOP_ID_PREFIX}{name}")


class AriDispatcher:
    """Routes events from the one WebSocket to the calls that own them."""

    def __init__(self) -> None:
        self._channels: dict[str, AriCallChannel] = {}
        # Channels whose calls have ended here, most recent last: their late events (a playback that finished as
        # the call was hung up, the hang-up itself) are routine and are not reported as strangers. Bounded, so a
        # long-running node does not grow it.
        self._closed: OrderedDict[str, None] = OrderedDict()

    def register(self, channel: AriCallChannel) -> None:
        self._channels[channel.info.channel_id] = channel

    def unregister(self, channel_id: str) -> None:
        if self._channels.pop(channel_id, None) is not None:
            self._closed[channel_id] = None
            if len(self._closed) > _CLOSED_REMEMBERED:
                self._closed.popitem(last=False)

    def __len__(self) -> int:
        return len(self._channels)

    def channel_ids(self) -> frozenset[str]:
        """The channels this process drives now (a sweep of leftovers must not touch them)."""
        return frozenset(self._channels)

    def dispatch(self, event: dict[str, Any]) -> bool:
        """Deliver an event; False (and a log line) when no call owns it."""
        channel_id = event_channel_id(event)
        if channel_id is None:
            return False
        channel = self._channels.get(channel_id)
        if channel is None:
            name = str((event.get("channel") or {}).get("name", ""))
            helper = name.startswith((MEDIA_CHANNEL_PREFIX, SNOOP_CHANNEL_PREFIX))  # our own taps: never calls
            if channel_id in self._closed:
                log.debug("ari.event_for_closed_call", event_type=event["type"], channel_id=channel_id)
            elif event["type"] not in _GONE_EVENTS and not helper:  # late hang-ups of finished calls are routine
                log.warning("ari.event_for_unknown_channel", event_type=event["type"], channel_id=channel_id)
            return False
        channel.deliver(event)
        return True

    def fail_all(self, error: BaseException) -> None:
        """The event stream is gone: every call waiting on an event learns it now instead of hanging."""
        for channel in self._channels.values():
            channel.deliver(error)


async def await_answer(leg: AriCallChannel, timeout: float) -> int | None:
    """For an outbound leg: None once the callee answered (the leg entered Stasis); else the hang-up cause
    (19, no answer, when ``timeout`` passed first). One wait for the dialer and the callback service alike."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return 19
        event = await leg.next_event(timeout=remaining)
        if event is None:
            continue
        if event["type"] == "StasisStart":
            return None
        if leg.gone:
            cause = event.get("cause")
            return cause if isinstance(cause, int) else 0
