"""The sweep of what an earlier service process left in Asterisk (the decisions: :mod:`medhotline.orphans`).

Run once when this process's ARI event stream first connects: the Stasis application is registered again then,
so a caller sent back to the dialplan's ARI entry reaches this process and hears the greeting again. Not after a
later reconnect: then the calls still belong to this process, which ends each of them itself (outcome
``connection_lost``); sweeping would race with that. Every step is best effort: a channel or bridge that left
meanwhile (404) is skipped quietly, any other failure is logged and the next item is tried. Log lines carry
channel and bridge ids only, never a caller's number.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Final

from ground.logs import get_logger
from medhotline.orphans import ENTRY_CONTEXT, Action, DestroyBridge, HangUp, KeepConversation, Restart, classify
from telephony.ari_client import AriClient, AriNotFound
from telephony.channel import UNAVAILABLE_SOUND, ChannelError

__all__ = ["WATCH_EVERY", "sweep_orphans", "watch_conversation"]

log = get_logger("medhotline.orphans")

# How often a kept conversation is looked at; when one side has hung up, the other is hung up within this.
WATCH_EVERY: Final = 1.0
# The unavailable prompt lasts about 8 s: a caller who could not be restarted hears it, then is hung up.
_APOLOGY_SECONDS: Final = 10.0


async def sweep_orphans(
    ari: AriClient, *, owned: Callable[[], Iterable[str]] = frozenset, since: datetime | None = None
) -> list[Action]:
    """Read ARI's channels and bridges, apply :func:`~medhotline.orphans.classify`'s actions and return them
    (the caller watches the conversations kept). ``owned`` is read after the lists (calls that arrived
    meanwhile are this process's own); ``since``: when this process started. Never raises for an ARI failure:
    an unreadable list is logged and nothing is done."""
    try:
        channels = await ari.request("GET", "/channels")
        bridges = await ari.request("GET", "/bridges")
        actions = classify(channels or [], bridges or [], app=ari.app, owned=owned(), since=since)
    except (ChannelError, ValueError) as exc:
        log.error("orphans.sweep_failed", reason=str(exc))
        return []
    apologies: list[asyncio.Task[None]] = []
    for action in actions:
        if isinstance(action, HangUp):
            if await _quietly(ari, "DELETE", f"/channels/{action.channel_id}"):
                log.warning("orphans.hung_up", channel_id=action.channel_id, why=action.why)
        elif isinstance(action, DestroyBridge):
            if await _quietly(ari, "DELETE", f"/bridges/{action.bridge_id}"):
                log.warning("orphans.bridge_destroyed", bridge_id=action.bridge_id, why=action.why)
        elif isinstance(action, Restart):
            apology = await _restart(ari, action.channel_id)
            if apology is not None:
                apologies.append(apology)
        else:
            log.warning(
                "orphans.conversation_kept",
                bridge_id=action.bridge_id,
                channel_id=action.patient_id,
                agent_leg=action.agent_id,
            )
    if apologies:
        await asyncio.gather(*apologies, return_exceptions=True)
    return actions


async def _quietly(ari: AriClient, method: str, path: str, params: dict[str, str] | None = None) -> bool:
    """One request; False when what it names is gone (404, quietly) or it failed (logged)."""
    try:
        await ari.request(method, path, params)
    except AriNotFound:
        return False
    except ChannelError as exc:
        log.error("orphans.request_failed", method=method, path=path, reason=str(exc))
        return False
    return True


async def _restart(ari: AriClient, channel_id: str) -> asyncio.Task[None] | None:
    """``continue`` into the ARI entry; if that is refused, the unavailable prompt then a hang-up (a task)."""
    context, extension, priority = ENTRY_CONTEXT
    params = {"context": context, "extension": extension, "priority": str(priority)}
    try:
        await ari.request("POST", f"/channels/{channel_id}/continue", params)
    except AriNotFound:
        return None  # the caller hung up meanwhile
    except ChannelError as exc:
        log.error("orphans.restart_failed", channel_id=channel_id, reason=str(exc))
        return asyncio.create_task(_apologise(ari, channel_id))
    log.warning("orphans.restarted", channel_id=channel_id, context=context)
    return None


async def _apologise(ari: AriClient, channel_id: str) -> None:
    played = await _quietly(ari, "POST", f"/channels/{channel_id}/play", {"media": f"sound:{UNAVAILABLE_SOUND}"})
    if played:
        await asyncio.sleep(_APOLOGY_SECONDS)
    if await _quietly(ari, "DELETE", f"/channels/{channel_id}"):
        log.warning("orphans.told_and_hung_up", channel_id=channel_id, prompt_played=played)


async def watch_conversation(ari: AriClient, kept: KeepConversation, every: float = WATCH_EVERY) -> None:
    """Until one side of a kept conversation is gone; then hang up the other and remove the bridge, as the
    process that connected them would have (the patient is not left alone on a silent line)."""
    while True:
        await asyncio.sleep(every)
        try:
            bridge = await ari.request("GET", f"/bridges/{kept.bridge_id}")
        except AriNotFound:
            bridge = None
        except ChannelError as exc:
            log.warning("orphans.watch_failed", bridge_id=kept.bridge_id, reason=str(exc))
            continue
        members = set(bridge.get("channels", [])) if isinstance(bridge, dict) else set()
        if kept.patient_id in members and kept.agent_id in members:
            continue
        for channel_id in (kept.patient_id, kept.agent_id):
            if await _quietly(ari, "DELETE", f"/channels/{channel_id}"):
                log.warning("orphans.conversation_ended", bridge_id=kept.bridge_id, channel_id=channel_id)
        with contextlib.suppress(ChannelError):
            await ari.request("DELETE", f"/bridges/{kept.bridge_id}")
        return
