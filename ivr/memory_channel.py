"""An in-memory ``CallChannel`` for unit tests of flows and of code that drives calls.

Shipped with the package (like ``structlog.testing``) so every test suite uses the same fake. It records each
operation it receives and can be scripted to fail at a chosen operation::

    channel = InMemoryCallChannel(hang_up_at=2)  # the caller hangs up during the 2nd operation
    result = await run_flow(flow, channel, sound_for, on_step)
    assert channel.operations == [("answer",), ("play", "greeting")]

Operations are counted from 1 in the order they arrive (``answer``, ``play``, ``hangup`` alike). The failing
operation is recorded before it raises, like a real prompt that started and was cut off. After a hang-up
(scripted or by ``hangup()``) every further ``answer``/``play`` raises ``CallerHungUp`` and ``hangup()`` is a
recorded no-op, as the real adapters behave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ivr.channel import CallerHungUp, CallInfo, ChannelError, ConnectionLost

Operation = tuple[str] | tuple[str, str]


def _default_info() -> CallInfo:
    return CallInfo(channel_id="mem-1", channel_name="Memory/test-00000001", transport="ari", flow="test", dialed="")


@dataclass
class InMemoryCallChannel:
    """A scripted call. ``hang_up_at``/``lose_connection_at``/``fail_at`` are 1-based operation numbers."""

    info: CallInfo = field(default_factory=_default_info)
    hang_up_at: int | None = None
    lose_connection_at: int | None = None
    fail_at: int | None = None
    operations: list[Operation] = field(default_factory=list)
    hung_up: bool = False

    @property
    def sounds(self) -> list[str]:
        """The sounds played, in order."""
        return [op[1] for op in self.operations if op[0] == "play" and len(op) == 2]

    def _record(self, operation: Operation) -> None:
        self.operations.append(operation)
        number = len(self.operations)
        if number == self.hang_up_at:
            self.hung_up = True
            raise CallerHungUp("caller hung up (scripted)")
        if number == self.lose_connection_at:
            raise ConnectionLost("connection lost (scripted)")
        if number == self.fail_at:
            raise ChannelError("channel operation failed (scripted)")

    async def answer(self) -> None:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("answer",))

    async def play(self, sound: str) -> None:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("play", sound))

    async def hangup(self) -> None:
        if self.hung_up:
            self.operations.append(("hangup",))
            return
        self._record(("hangup",))
        self.hung_up = True
