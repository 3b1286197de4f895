"""Supervisors stepping into live calls, sans I/O: which channel to tap, in which directions, and why not.

A conversation is the mixing bridge ``talk-<call id>`` holding the patient's channel and the agent's leg (ids
``agent-…``, see :mod:`routing.ari_queue`); a waiting caller is alone in the holding bridge ``hold-<call id>``.
The supervisor's phone is dialled as a new channel and joined, in a bridge of its own, with an ARI *snoop* channel
on the AGENT's leg, never the patient's:

- ``listen``: spy both directions, whisper none. The supervisor hears patient and agent; nobody hears them.
- ``whisper``: spy both, whisper ``out``: the supervisor's audio is written towards the agent's phone only. It
  never enters what the agent's leg sends into the conversation bridge, so the patient cannot hear it.
- ``barge``: spy both, whisper ``both``: written towards the agent's phone and mixed into what the agent's leg
  sends into the conversation, so patient and agent both hear the supervisor (a three-way call).

Nothing is ever added to the conversation bridge itself: what the patient hears changes only in ``barge``.
This module decides from values (the bridges' channel lists as ARI reports them); the ARI requests are made by
:mod:`routing.ari_supervision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from ground.errors import MedhotlineError

__all__ = [
    "AGENT_LEG_PREFIX",
    "ESCALATE_EVENT",
    "ESCALATE_ITEM",
    "MODES",
    "SUPERVISOR_ARG",
    "SUPERVISOR_LEG_PREFIX",
    "Mode",
    "SupervisionError",
    "Tap",
    "check_mode",
    "conversation_bridge",
    "holding_bridge",
    "is_supervision_channel",
    "tap",
    "waiting_caller",
]

Mode = Literal["listen", "whisper", "barge"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
# (spy, whisper) of the snoop on the agent's leg; ARI's directions are seen from that channel: "out" is what
# Asterisk sends to the agent's phone, "in" what the agent's phone sends (and so what the conversation gets).
DIRECTIONS: Final[dict[Mode, tuple[str, str]]] = {
    "listen": ("both", "none"),
    "whisper": ("both", "out"),
    "barge": ("both", "both"),
}
# The agent's leg as ``routing.ari_queue`` names it; the supervisor's phone and its snoop as this feature does.
AGENT_LEG_PREFIX: Final = "agent-"
SUPERVISOR_LEG_PREFIX: Final = "supervisor-"
SUPERVISOR_SNOOP_PREFIX: Final = "supsnoop-"
SUPERVISION_BRIDGE_PREFIX: Final = "supervise-"
# The first Stasis argument of the supervisor's phone leg: the service's event router leaves it alone.
SUPERVISOR_ARG: Final = "supervisor"
# The ARI user event (on the waiting caller's channel) that asks the call's queue task to move it to the
# emergency queue, and what that task's key reader hands on for it (never a DTMF digit: those are one character).
ESCALATE_EVENT: Final = "medhotline_supervisor_escalate"
ESCALATE_ITEM: Final = "supervisor-escalation"

Problem = Literal["unknown_call", "not_talking", "not_waiting", "no_phone", "phone_unanswered", "ended", "bad_request"]


class SupervisionError(MedhotlineError):
    """A supervisor action that can't be done; ``problem`` says which kind (the API maps it to a status)."""

    def __init__(self, problem: Problem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def check_mode(mode: str) -> Mode:
    """``mode`` as a Mode, or SupervisionError("bad_request") naming the ones there are."""
    for known in MODES:
        if mode == known:
            return known
    raise SupervisionError("bad_request", f"mode {mode!r}: use one of {', '.join(MODES)}")


def is_supervision_channel(channel_id: str | None) -> bool:
    """Whether ``channel_id`` is a supervisor's phone leg or its snoop: the ARI requests that made it watch it
    over REST, so the service's event router has nothing to deliver it to (and no call to warn about)."""
    return channel_id is not None and channel_id.startswith((SUPERVISOR_LEG_PREFIX, SUPERVISOR_SNOOP_PREFIX))


def conversation_bridge(call_id: str) -> str:
    return f"talk-{call_id}"


def holding_bridge(call_id: str) -> str:
    return f"hold-{call_id}"


@dataclass(frozen=True, slots=True)
class Tap:
    """What to create for one supervision: the snoop on ``agent_channel`` with ``spy``/``whisper`` directions,
    the supervisor's phone leg ``supervisor_channel``, and the bridge ``bridge`` that joins the two."""

    mode: Mode
    call_id: str
    agent_channel: str
    patient_channel: str
    spy: str
    whisper: str
    snoop_channel: str
    supervisor_channel: str
    bridge: str


def tap(mode: str, call_id: str, conversation: Sequence[str] | None, token: str) -> Tap:
    """The tap for ``mode`` on the conversation of ``call_id``, whose bridge holds the channel ids
    ``conversation`` (None: there is no such bridge). ``token`` makes this supervision's ids unique.

    Raises SupervisionError("not_talking") unless exactly one agent leg and one other channel are in it."""
    checked = check_mode(mode)
    if conversation is None:
        raise SupervisionError("not_talking", f"call {call_id} is not talking to an agent (no conversation bridge)")
    agents = [c for c in conversation if c.startswith(AGENT_LEG_PREFIX)]
    others = [c for c in conversation if not c.startswith(AGENT_LEG_PREFIX)]
    if len(agents) != 1 or len(others) != 1:
        raise SupervisionError(
            "not_talking",
            f"call {call_id} is not talking to an agent (its conversation has {len(agents)} agent leg(s) and "
            f"{len(others)} other channel(s))",
        )
    spy, whisper = DIRECTIONS[checked]
    return Tap(
        mode=checked,
        call_id=call_id,
        agent_channel=agents[0],
        patient_channel=others[0],
        spy=spy,
        whisper=whisper,
        snoop_channel=f"{SUPERVISOR_SNOOP_PREFIX}{token}",
        supervisor_channel=f"{SUPERVISOR_LEG_PREFIX}{token}",
        bridge=f"{SUPERVISION_BRIDGE_PREFIX}{token}",
    )


def waiting_caller(call_id: str, holding: Sequence[str] | None) -> str:
    """The channel of the caller waiting in ``hold-<call id>`` (channel ids ``holding``; None: no such bridge).
    Raises SupervisionError("not_waiting") when nobody waits there (never queued, ringing's over, talking, gone)."""
    if not holding:
        raise SupervisionError("not_waiting", f"call {call_id} is not waiting in the queue")
    if len(holding) != 1:
        raise SupervisionError("not_waiting", f"call {call_id}: its holding bridge has {len(holding)} channels")
    return holding[0]
