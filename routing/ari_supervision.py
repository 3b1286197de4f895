"""The ARI requests of supervision (decisions in :mod:`routing.supervision`): read the call's bridges, dial the
supervisor's phone, snoop on the agent's leg, bridge the two; watch until either ends, then take it all down.

It needs only ARI's REST interface: the service's Stasis application owns the event stream, and every channel
made here enters that application (its event router leaves supervisor legs and snoop channels alone), so any
process with the ARI credentials (the API server, the CLI) can do it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ground.logs import get_logger
from routing.ari_queue import dial_string
from routing.supervision import ESCALATE_EVENT, SUPERVISOR_ARG, SupervisionError, Tap
from telephony.ari_client import AriClient, AriError, AriNotFound, AriUnavailable
from telephony.channel import ChannelError

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class PhoneSettings:
    """How the supervisor's phone is dialled: ring time, the caller id it shows (the hotline, never a patient's
    number), and the pause between the checks of whether the supervision has ended."""

    ring_seconds: float = 20.0
    caller_id: str = "12320"
    poll_seconds: float = 1.0


async def bridge_channels(ari: AriClient, bridge_id: str) -> list[str] | None:
    """The channel ids in ``bridge_id``; None when there is no such bridge."""
    try:
        bridge = await ari.request("GET", f"/bridges/{bridge_id}")
    except AriNotFound:
        return None
    channels = bridge.get("channels") if isinstance(bridge, dict) else None
    return [str(c) for c in channels] if isinstance(channels, list) else []


async def _exists(ari: AriClient, channel_id: str) -> dict[str, Any] | None:
    try:
        found = await ari.request("GET", f"/channels/{channel_id}")
    except AriNotFound:
        return None
    return found if isinstance(found, dict) else {}


async def connect(ari: AriClient, tap: Tap, endpoint: str, settings: PhoneSettings) -> None:
    """Dial the supervisor's ``endpoint``; once answered, snoop on the agent's leg as ``tap`` says and bridge the
    snoop with the phone. Raises SupervisionError (phone not answered, call ended) or ChannelError; whatever was
    created is removed again before it raises."""
    try:
        await ari.request("POST", "/bridges", {"type": "mixing", "bridgeId": tap.bridge, "name": tap.bridge})
        await ari.request(
            "POST",
            "/channels",
            {
                "endpoint": dial_string(endpoint),
                "app": ari.app,
                "appArgs": f"{SUPERVISOR_ARG},{tap.call_id}",
                "channelId": tap.supervisor_channel,
                "timeout": str(int(settings.ring_seconds)),
                "callerId": f'"{settings.caller_id}" <{settings.caller_id}>',
            },
        )
        await _answered(ari, tap, settings)
        try:
            await ari.request(
                "POST",
                f"/channels/{tap.agent_channel}/snoop",
                {"spy": tap.spy, "whisper": tap.whisper, "app": ari.app, "appArgs": SUPERVISOR_ARG,
                 "snoopId": tap.snoop_channel},
            )  # fmt: skip
        except AriNotFound:
            raise SupervisionError("ended", f"call {tap.call_id} ended before the supervisor joined") from None
        await _add_when_in_stasis(ari, tap)
    except BaseException:
        await disconnect(ari, tap)
        raise
    log.info("supervision.connected", call_id=tap.call_id, mode=tap.mode)


async def _answered(ari: AriClient, tap: Tap, settings: PhoneSettings) -> None:
    """Wait for the supervisor's phone to answer (its channel Up), at most its ring time and a little."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.ring_seconds + 2.0
    while loop.time() < deadline:
        found = await _exists(ari, tap.supervisor_channel)
        if found is None:
            raise SupervisionError("phone_unanswered", "the supervisor's phone did not answer (or refused the call)")
        if found.get("state") == "Up":
            return
        await asyncio.sleep(0.2)
    raise SupervisionError("phone_unanswered", f"the supervisor's phone did not answer in {settings.ring_seconds} s")


async def _add_when_in_stasis(ari: AriClient, tap: Tap) -> None:
    """A new channel enters Stasis a moment after it exists; until then ARI refuses to bridge it (409/422)."""
    for attempt in range(50):
        try:
            await ari.request(
                "POST",
                f"/bridges/{tap.bridge}/addChannel",
                {"channel": f"{tap.supervisor_channel},{tap.snoop_channel}"},
            )
        except AriNotFound:
            raise SupervisionError("ended", f"call {tap.call_id} ended while the supervisor joined") from None
        except AriError as exc:
            if exc.status not in (409, 422) or attempt == 49:
                raise
            await asyncio.sleep(0.1)
        else:
            return


async def disconnect(ari: AriClient, tap: Tap) -> None:
    """Hang up the phone leg and the snoop and remove the bridge; whatever is gone already is skipped. A removal
    that fails otherwise (a timeout, Asterisk busy) is tried once more and then logged: a supervisor's leg left
    behind would keep listening to the agent."""
    for path in (f"/channels/{tap.supervisor_channel}", f"/channels/{tap.snoop_channel}", f"/bridges/{tap.bridge}"):
        for attempt in (1, 2):
            try:
                await ari.request("DELETE", path)
            except AriNotFound:
                break
            except ChannelError as exc:
                if attempt == 2:
                    log.error("supervision.cleanup_failed", call_id=tap.call_id, path=path, reason=str(exc))
                else:
                    await asyncio.sleep(0.2)
            else:
                break


async def watch(ari: AriClient, tap: Tap, settings: PhoneSettings) -> None:
    """Until the supervisor hangs up or the call (and with it the snoop on the agent's leg) ends; then the rest
    goes. ARI trouble while watching ends the supervision too: nobody stays tapped into a call unobserved."""
    try:
        while True:
            await asyncio.sleep(settings.poll_seconds)
            phone = await _exists(ari, tap.supervisor_channel)
            snoop = await _exists(ari, tap.snoop_channel)
            if phone is None or snoop is None:
                log.info("supervision.ended", call_id=tap.call_id, by="supervisor" if phone is None else "call")
                return
    except (AriError, AriUnavailable) as exc:
        log.warning("supervision.watch_failed", call_id=tap.call_id, reason=str(exc))
    finally:
        await disconnect(ari, tap)


async def ask_escalation(ari: AriClient, caller_channel: str) -> None:
    """Ask the service, through its own Stasis application, to move the caller waiting on ``caller_channel`` to
    the emergency queue (the call's queue task does it, as for the caller's emergency key)."""
    try:
        await ari.request(
            "POST", f"/events/user/{ESCALATE_EVENT}", {"application": ari.app, "source": f"channel:{caller_channel}"}
        )
    except AriNotFound:
        raise SupervisionError("not_waiting", "the call left the queue meanwhile") from None
