"""The flow interpreter: walks a validated flow over a ``CallChannel``. Sans-I/O apart from the port.

It never raises for what a caller or Asterisk does: a hang-up, a lost connection or a failed operation ends
the walk with an outcome and the node where it happened, which the service writes to the call record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from ivr.channel import CallChannel, CallerHungUp, ChannelError, ConnectionLost
from ivr.flow_model import Flow, HangupNode, PlayNode

log = structlog.get_logger(__name__)

Outcome = Literal["completed", "caller_hangup", "connection_lost", "error"]
# A flow without waiting nodes can still loop (a → b → a); the bound turns that into an error, not a stuck call.
MAX_STEPS = 500


@dataclass(frozen=True)
class FlowResult:
    outcome: Outcome
    last_step: str
    error: str | None = None


SoundFor = Callable[[str], str]
OnStep = Callable[[str], Awaitable[None]]


def _sound(node: PlayNode | HangupNode, sound_for: SoundFor) -> str | None:
    if node.file:
        return node.file
    return sound_for(node.say) if node.say else None


async def run_flow(flow: Flow, channel: CallChannel, sound_for: SoundFor, on_step: OnStep) -> FlowResult:
    """Answer, walk the flow from its start node, and hang up at the end."""
    node_id = "answer"
    try:
        await channel.answer()
        node_id = flow.start
        for _ in range(MAX_STEPS):
            node = flow.nodes[node_id]
            await on_step(node_id)
            sound = _sound(node, sound_for)
            if sound:
                await channel.play(sound)
            if isinstance(node, HangupNode):
                await channel.hangup()
                return FlowResult("completed", node_id)
            node_id = node.next
        raise ChannelError(f"flow {flow.flow!r} ran {MAX_STEPS} steps without reaching an end")
    except CallerHungUp:
        return FlowResult("caller_hangup", node_id)
    except ConnectionLost as exc:
        return FlowResult("connection_lost", node_id, str(exc))
    except ChannelError as exc:
        log.error("flow.failed", node=node_id, error=str(exc))
        with contextlib.suppress(ChannelError):  # a failing channel may fail the hang-up too
            await channel.hangup()
        return FlowResult("error", node_id, str(exc))
