"""ARI events to their owners: a new call to the call lifecycle, a FastAGI call joining the queue to its hand-over,
everything else (agent and outbound legs, snoop channels, channel events) to the channel it belongs to."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ground.logs import get_logger
from medhotline.call_lifecycle import QUEUE_ARG
from routing.ari_queue import AGENT_LEG_ARG
from routing.supervision import SUPERVISOR_ARG, is_supervision_channel
from scheduler.outreach import OUTBOUND_ARG
from telephony.ari_channel import (
    MEDIA_CHANNEL_PREFIX,
    SNOOP_ARG,
    SNOOP_CHANNEL_PREFIX,
    AriCallChannel,
    AriDispatcher,
    event_channel_id,
)
from telephony.ari_client import AriClient, AriError
from telephony.channel import CallerId, CallInfo, ConnectionLost

log = get_logger("medhotline.service")


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so several nodes don't reconnect in lockstep."""

    initial: float = 0.5
    cap: float = 10.0
    _current: float = 0.0

    def next(self) -> float:
        self._current = self.initial if self._current == 0 else min(self.cap, self._current * 2)
        return self._current * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self._current = 0.0


class AriEventRouter:
    """Reads the ARI event stream (reconnecting with backoff) and routes each event; never raises."""

    def __init__(
        self,
        ari_of: Callable[[], AriClient],
        dispatcher: AriDispatcher,
        *,
        default_flow: Callable[[], str],
        on_call: Callable[[AriCallChannel], Awaitable[object]],
        on_handed_over: Callable[[AriCallChannel], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_first_connect: Callable[[], None] | None = None,
    ) -> None:
        # The service's ARI client, read at each use (a test or a reconnect may replace it).
        self._ari_of = ari_of
        self.dispatcher = dispatcher
        self._default_flow = default_flow
        self._on_call = on_call
        self._on_handed_over = on_handed_over
        self._spawn = spawn
        # Called once, when the event stream first connects (the service's sweep of an earlier process's
        # leftovers, medhotline.orphan_sweep); later reconnects find calls this process still owns.
        self._on_first_connect = on_first_connect
        self._connected_once = False

    @property
    def ari(self) -> AriClient:
        return self._ari_of()

    def on_ari_event(self, event: dict[str, Any]) -> None:
        channel_id = event_channel_id(event)
        log.debug("ari.event", event_type=event["type"], channel_id=channel_id)
        if is_supervision_channel(channel_id):
            return  # a supervisor's phone or its snoop: dialled, bridged and watched by routing.ari_supervision
        if event["type"] == "StasisStart":
            chan = event.get("channel") or {}
            args = event.get("args") or []
            if str(chan.get("name", "")).startswith(MEDIA_CHANNEL_PREFIX):
                return  # the service's own audio tap (external media) entering Stasis, not a call
            if (args and args[0] == SNOOP_ARG) or str(chan.get("name", "")).startswith(SNOOP_CHANNEL_PREFIX):
                self.dispatcher.dispatch(event)  # a recording's snoop channel: the recording waits for it
                return
            if args and args[0] == SUPERVISOR_ARG:
                return  # a supervisor's phone, dialled and bridged by whoever asked (routing.ari_supervision)
            if args and args[0] in (AGENT_LEG_ARG, OUTBOUND_ARG):
                self.dispatcher.dispatch(event)  # an agent or a patient answered a call we dialled
                return
            if args and args[0] == QUEUE_ARG and isinstance(chan.get("id"), str):
                queued = AriCallChannel(
                    self.ari,
                    CallInfo(chan["id"], str(chan.get("name", "")), "ari", "", ""),
                )
                self.dispatcher.register(queued)

                async def run_queued() -> None:
                    try:
                        await self._on_handed_over(queued)
                    finally:
                        self.dispatcher.unregister(queued.info.channel_id)

                self._spawn(run_queued())
                return
            if not isinstance(chan.get("id"), str):
                log.warning("ari.bad_event", reason="StasisStart without channel id")
                return
            info = CallInfo(
                channel_id=chan["id"],
                channel_name=str(chan.get("name", "")),
                transport="ari",
                flow=str(args[0]) if args else self._default_flow(),
                dialed=str((chan.get("dialplan") or {}).get("exten", "")),
                caller=CallerId(str((chan.get("caller") or {}).get("number", ""))),
            )
            channel = AriCallChannel(self.ari, info)
            self.dispatcher.register(channel)

            async def run() -> None:
                try:
                    await self._on_call(channel)
                finally:
                    self.dispatcher.unregister(info.channel_id)

            self._spawn(run())
            return
        self.dispatcher.dispatch(event)

    def _connected(self) -> None:
        if self._connected_once:
            return
        self._connected_once = True
        if self._on_first_connect is not None:
            self._on_first_connect()

    async def ari_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for event in self.ari.events(on_connected=self._connected):
                    backoff.reset()
                    self.on_ari_event(event)
            except ConnectionLost as exc:
                log.warning("ari.disconnected", reason=str(exc), calls_in_progress=len(self.dispatcher))
                self.dispatcher.fail_all(exc)
            except AriError as exc:
                log.error("ari.refused", reason=str(exc))
            await asyncio.sleep(backoff.next())
