"""An in-memory ``CallChannel`` for unit tests of flows and of code that drives calls.

Shipped with the package (like ``structlog.testing``) so every test suite uses the same fake. It records each
operation it receives and can be scripted to fail at a chosen operation::

    channel = InMemoryCallChannel(hang_up_at=2)  # the caller hangs up during the 2nd operation
    result = await run_flow(flow, channel, sound_for, on_step)
    assert channel.operations == [("answer",), ("play", "greeting")]

The caller's keys are scripted in ``keys``, consumed in order by the waiting operations: a string is what the
caller presses (for ``play`` with barge-in only its first key, which interrupts the prompt), ``None`` is
silence until the timeout, and when the script runs out the caller hangs up::

    channel = InMemoryCallChannel(keys=["7", None, "1"])  # invalid, then no input, then choice 1

A prompt without barge-in leaves the script alone: the fake's caller presses keys after such a prompt, when
the real adapters accept them too. ``keys=None`` (the default) means a caller who never presses anything.

Operations are counted from 1 in the order they arrive (``answer``, ``play``, ``hangup`` alike). The failing
operation is recorded before it raises, like a real prompt that started and was cut off. After a hang-up
(scripted or by ``hangup()``) every further ``answer``/``play`` raises ``CallerHungUp`` and ``hangup()`` is a
recorded no-op, as the real adapters behave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ivr.channel import CallerHungUp, CallInfo, ChannelError, ConnectionLost

Operation = tuple[str, ...]


def _default_info() -> CallInfo:
    return CallInfo(channel_id="mem-1", channel_name="Memory/test-00000001", transport="ari", flow="test", dialed="")


@dataclass
class InMemoryCallChannel:
    """A scripted call. ``hang_up_at``/``lose_connection_at``/``fail_at`` are 1-based operation numbers."""

    info: CallInfo = field(default_factory=_default_info)
    hang_up_at: int | None = None
    lose_connection_at: int | None = None
    fail_at: int | None = None
    keys: list[str | None] | None = None
    operations: list[Operation] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    hung_up: bool = False
    transferred_to: tuple[str, str | None] | None = None

    @property
    def sounds(self) -> list[str]:
        """The sounds played, in order."""
        return [op[1] for op in self.operations if op[0] == "play"]

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

    async def play(self, sound: str, *, barge_in: bool = False) -> str | None:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("play", sound))
        if barge_in and self.keys and self.keys[0]:
            pressed = self.keys[0]
            self.keys[0] = pressed[1:] or None
            if self.keys[0] is None:
                self.keys.pop(0)
            return pressed[0]
        return None

    async def read_digits(self, *, max_digits: int, timeout: float, terminator: str | None = None) -> str:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("read_digits", str(max_digits)))
        if self.keys is None or max_digits <= 0:  # like the real adapters: nothing to wait for, no key used
            return ""
        if not self.keys:
            self.hung_up = True
            raise CallerHungUp("caller hung up (key script exhausted)")
        pressed = self.keys.pop(0)
        if pressed is None:
            return ""
        if terminator is not None and terminator in pressed:
            pressed = pressed[: pressed.index(terminator)]
        return pressed[:max_digits]

    async def set_variable(self, name: str, value: str) -> None:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("set_variable", name, value))
        self.variables[name] = value

    async def transfer(self, extension: str, trunk: str | None = None) -> None:
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("transfer", extension, trunk or ""))
        self.transferred_to = (extension, trunk)
        self.hung_up = True  # the call has left the IVR

    async def hangup(self) -> None:
        if self.hung_up:
            self.operations.append(("hangup",))
            return
        self._record(("hangup",))
        self.hung_up = True
