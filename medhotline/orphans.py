"""What an earlier ``medhotline serve`` left in Asterisk, and what to do with each piece: a pure function.

When the service dies (SIGKILL, crash) while calls are in its Stasis application, Asterisk keeps those channels
in Stasis with nobody driving them: a caller hears silence until they hang up, agent legs ring or hold an agent
for nothing, holding bridges keep playing music to nobody. When the service connects to ARI again it reads
``GET /channels`` and ``GET /bridges`` and :func:`classify` decides, without I/O, one action per leftover:

- a patient's channel in this application (inbound, or an outbound call the patient answered) that is not
  talking to an agent: :class:`Restart` (``continue`` into the ARI entry of the dialplan, the hotline starts
  afresh for them; ``medhotline.orphan_sweep`` falls back to the unavailable prompt and a hang-up);
- a conversation bridge that holds a patient and an agent leg: :class:`KeepConversation` (hanging up a patient
  mid-consultation is worse than a call nobody supervises; the sweep watches it and ends the other side when
  one side hangs up, as the dead process would have);
- the service's own legs and taps that are not part of such a conversation (agent legs, supervisors' phones
  and snoops, recording snoops, external-media taps, outbound calls still ringing): :class:`HangUp`;
- holding bridges, listening and supervision bridges, conversation bridges without both parties, and empty
  leftover bridges (the service's, by their names): :class:`DestroyBridge`.

Channels that are not in this application and are not named by the service (a caller transferred to a
department by ``Dial``, another application's channels) are not ours to touch. ``owned`` lists channels the
running process drives itself; they are left alone too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from medhotline.callbacks import CHANNEL_PREFIX as CALLBACK_PREFIX
from routing.supervision import (
    AGENT_LEG_PREFIX,
    SUPERVISION_BRIDGE_PREFIX,
    SUPERVISOR_LEG_PREFIX,
    SUPERVISOR_SNOOP_PREFIX,
)
from scheduler.dialer import CHANNEL_PREFIX as OUTREACH_PREFIX
from telephony.ari_channel import MEDIA_CHANNEL_PREFIX, SNOOP_CHANNEL_PREFIX, SNOOP_ID_PREFIX

__all__ = [
    "ENTRY_CONTEXT",
    "Action",
    "DestroyBridge",
    "HangUp",
    "KeepConversation",
    "OrphanError",
    "Restart",
    "classify",
]

# Where a restarted caller goes: the ARI entry of asterisk-config/extensions.conf, which enters Stasis again
# (and plays the unavailable prompt itself should the application be gone once more).
ENTRY_CONTEXT: Final = ("hotline-ari", "s", 1)

# Bridges the service creates and names (routing.ari_queue, routing.ari_supervision, telephony.ari_channel).
HOLD_PREFIX: Final = "hold-"
TALK_PREFIX: Final = "talk-"
LISTEN_PREFIX: Final = "listen-"
_OUR_BRIDGES: Final = (HOLD_PREFIX, TALK_PREFIX, LISTEN_PREFIX, SUPERVISION_BRIDGE_PREFIX)
# Channels the service originates to a phone that is not a patient's, or creates as helpers of a call.
_HELPER_IDS: Final = (AGENT_LEG_PREFIX, SUPERVISOR_LEG_PREFIX, SUPERVISOR_SNOOP_PREFIX, SNOOP_ID_PREFIX)
_HELPER_NAMES: Final = (MEDIA_CHANNEL_PREFIX, SNOOP_CHANNEL_PREFIX)
# Calls the service dials to patients: theirs once answered (in Stasis), only a ring before.
_OUTBOUND_IDS: Final = (OUTREACH_PREFIX, CALLBACK_PREFIX)

Why = Literal[
    "agent_leg", "supervisor_leg", "snoop", "media_tap", "unanswered_outbound", "holding", "leftover", "empty"
]


class OrphanError(ValueError):
    """ARI's channel or bridge list is not what its API describes (says which item and why)."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Send the patient's channel back to the dialplan entry: the hotline starts afresh for them."""

    channel_id: str


@dataclass(frozen=True, slots=True)
class HangUp:
    channel_id: str
    why: Why


@dataclass(frozen=True, slots=True)
class DestroyBridge:
    bridge_id: str
    why: Why


@dataclass(frozen=True, slots=True)
class KeepConversation:
    """A patient and an agent talking: left alone, watched until one side hangs up."""

    bridge_id: str
    patient_id: str
    agent_id: str


Action = Restart | HangUp | DestroyBridge | KeepConversation


@dataclass(frozen=True, slots=True)
class _Channel:
    id: str
    name: str
    in_app: bool  # in this Stasis application (its current dialplan application is Stasis(<app>,…))
    created: datetime | None


def _created(value: object) -> datetime | None:
    """Asterisk's ``creationtime`` (``2026-12-06T04:24:48.123+0000``); None when absent or unreadable."""
    try:
        created = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return created if created.tzinfo is not None else None


def _channel(item: object, index: int, app: str) -> _Channel:
    if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or not item["id"]:
        raise OrphanError(f"ARI /channels[{index}]: expected an object with a non-empty string 'id'")
    dialplan = item.get("dialplan")
    dialplan = dialplan if isinstance(dialplan, Mapping) else {}
    app_data = str(dialplan.get("app_data") or "")
    in_app = str(dialplan.get("app_name") or "") == "Stasis" and app_data.split(",", 1)[0] == app
    return _Channel(item["id"], str(item.get("name") or ""), in_app, _created(item.get("creationtime")))


def _bridge(item: object, index: int) -> tuple[str, list[str]]:
    if not isinstance(item, Mapping) or not isinstance(item.get("id"), str) or not item["id"]:
        raise OrphanError(f"ARI /bridges[{index}]: expected an object with a non-empty string 'id'")
    members = item.get("channels", [])
    if not isinstance(members, list) or not all(isinstance(c, str) for c in members):
        raise OrphanError(f"ARI /bridges[{index}] ({item['id']}): 'channels' must be a list of channel ids")
    return item["id"], list(members)


def _helper_why(channel: _Channel) -> Why | None:
    """Why a channel is one of the service's own legs or taps (None: it is not)."""
    if channel.id.startswith(AGENT_LEG_PREFIX):
        return "agent_leg"
    if channel.id.startswith(SUPERVISOR_LEG_PREFIX):
        return "supervisor_leg"
    if channel.id.startswith((SUPERVISOR_SNOOP_PREFIX, SNOOP_ID_PREFIX)) or channel.name.startswith(
        SNOOP_CHANNEL_PREFIX
    ):
        return "snoop"
    if channel.name.startswith(MEDIA_CHANNEL_PREFIX):
        return "media_tap"
    return None


def classify(
    channels: Sequence[Any],
    bridges: Sequence[Any],
    *,
    app: str,
    owned: Iterable[str] = (),
    since: datetime | None = None,
) -> list[Action]:
    """The actions for what ARI lists, in the order to apply them: hang-ups, then bridges (a caller leaves a
    destroyed holding bridge and stays in Stasis), then restarts, then the conversations to watch.

    ``owned``: channels this process drives. ``since``: when this process started; a channel Asterisk created
    at or after it is this process's own new call (its StasisStart may not have been read yet), not a leftover.
    """
    if not isinstance(channels, Sequence) or not isinstance(bridges, Sequence):
        raise OrphanError("ARI /channels and /bridges must both be lists")
    parsed = {c.id: c for c in (_channel(item, i, app) for i, item in enumerate(channels))}
    keep = set(owned) | {
        c.id for c in parsed.values() if since is not None and c.created is not None and c.created >= since
    }
    patients = {
        c.id
        for c in parsed.values()
        if c.id not in keep and c.in_app and _helper_why(c) is None  # outbound answered: in Stasis, a patient
    }
    helpers = {c.id: why for c in parsed.values() if c.id not in keep and (why := _helper_why(c)) is not None}
    ringing = {c.id for c in parsed.values() if c.id not in keep and not c.in_app and c.id.startswith(_OUTBOUND_IDS)}

    kept: list[KeepConversation] = []
    destroyed: list[DestroyBridge] = []
    talking: set[str] = set()
    for index, item in enumerate(bridges):
        bridge_id, members = _bridge(item, index)
        if any(member in keep for member in members):
            continue  # the running process's own bridge
        in_patients = [m for m in members if m in patients]
        agents = [m for m in members if helpers.get(m) == "agent_leg"]
        # Exactly one of each (a bridge recording adds its own Recorder channel, which is neither).
        if len(in_patients) == 1 and len(agents) == 1:
            kept.append(KeepConversation(bridge_id, in_patients[0], agents[0]))
            talking.update(members)
        elif not bridge_id.startswith(_OUR_BRIDGES):
            continue  # another application's bridge, or one Asterisk made for a Dial: not ours
        elif bridge_id.startswith(HOLD_PREFIX):
            destroyed.append(DestroyBridge(bridge_id, "holding"))
        else:
            destroyed.append(DestroyBridge(bridge_id, "leftover" if members else "empty"))

    actions: list[Action] = [HangUp(cid, why) for cid, why in sorted(helpers.items()) if cid not in talking]
    actions += [HangUp(cid, "unanswered_outbound") for cid in sorted(ringing)]
    actions += destroyed
    actions += [Restart(cid) for cid in sorted(patients - talking)]
    actions += kept
    return actions
