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

Recordings are operations too (``("start_recording", name)``, ``("stop_recording", name)``), so a test sees
where a recording began and ended relative to the prompts; ``recordings`` lists only those. Like the real
adapters, starting a name twice fails and stopping is idempotent and harmless after a hang-up.

``MemoryRecorder`` and ``MemoryConsentSink`` are the matching fakes of the interpreter's consent ports, and
``MemoryOutreach`` of its outreach port.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from ground.errors import MedhotlineError
from telephony.channel import CallChannel, CallerHungUp, CallInfo, ChannelError, ConnectionLost, check_recording_name
from telephony.ports import BookingOutcome, BookingResult, ConsentExchange, ReadingsVerdict

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
    # Recordings started and not stopped yet; every name ever started (a name can't be used twice).
    recording_now: set[str] = field(default_factory=set)
    recording_names: set[str] = field(default_factory=set)

    @property
    def sounds(self) -> list[str]:
        """The sounds played, in order."""
        return [op[1] for op in self.operations if op[0] == "play"]

    @property
    def recordings(self) -> list[Operation]:
        """The recording operations, in order: ``("start_recording", name)`` and ``("stop_recording", name)``."""
        return [op for op in self.operations if op[0] in ("start_recording", "stop_recording")]

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

    async def start_recording(self, name: str) -> None:
        check_recording_name(name)
        if self.hung_up:
            raise CallerHungUp("caller hung up")
        self._record(("start_recording", name))
        if name in self.recording_names:  # like ARI's ifExists=fail: a recording is never overwritten
            raise ChannelError(f"recording {name!r} already exists")
        self.recording_names.add(name)
        self.recording_now.add(name)

    async def stop_recording(self, name: str) -> None:
        check_recording_name(name)
        if self.hung_up:  # the recording ended with the call: nothing to stop, nothing to fail
            self.operations.append(("stop_recording", name))
        else:
            self._record(("stop_recording", name))
        self.recording_now.discard(name)


@dataclass
class MemoryRecorder:
    """A ``CallRecorder`` over the channel's own recording: names ``<label>-<n>``, kept in ``started``/``stopped``.

    ``fail_start`` makes ``start`` raise that error (after nothing was started), as a real recorder might.
    """

    fail_start: MedhotlineError | None = None
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    async def start(self, channel: CallChannel, label: str) -> str:
        if self.fail_start is not None:
            raise self.fail_start
        name = f"{label}-{next(self._numbers)}"
        await channel.start_recording(name)
        self.started.append(name)
        return name

    async def stop(self, channel: CallChannel, name: str) -> None:
        await channel.stop_recording(name)
        self.stopped.append(name)


@dataclass
class MemoryConsentSink:
    """A ``ConsentSink`` that keeps every exchange; ``fail`` makes it refuse to store (raise that error)."""

    fail: MedhotlineError | None = None
    exchanges: list[ConsentExchange] = field(default_factory=list)

    async def consent_given(self, exchange: ConsentExchange) -> None:
        if self.fail is not None:
            raise self.fail
        self.exchanges.append(exchange)


@dataclass
class MemoryOutreach:
    """An ``OutreachPort`` for tests and demos: a patient with a birth year, plan thresholds, a medication, and a
    week of vaccination slots; every call to it is kept in ``calls`` in order.

    ``fail`` maps an operation name (``"verify_identity"``, ``"save_readings"``, ``"medication_sound"``,
    ``"medication_result"``, ``"book_vaccination"``, ``"cancel_vaccination"``, ``"report_adverse_reaction"``,
    ``"record_survey"``) to
    the error it raises. A booking of a ``(day, slot)`` in ``full`` answers "full"; ``booking_outcome`` forces
    another answer ("no_slot", "not_identified", "failed"). ``booked`` holds the patient's bookings; a cancel
    takes back the last one.
    """

    identity: dict[str, str] = field(default_factory=lambda: {"birth_year": "1956"})
    # Inclusive plausible range per reading; outside it is abnormal (as the plans' thresholds are).
    thresholds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"systolic": (90, 139), "diastolic": (60, 89), "glucose": (3.9, 10.0)}
    )
    medication: str = "outreach/medication-test"
    full: set[tuple[int, str]] = field(default_factory=set)
    booking_outcome: BookingOutcome | None = None
    booked: list[tuple[int, str]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    calls: list[tuple[str, object]] = field(default_factory=list)

    def _call(self, operation: str, argument: object = None) -> None:
        self.calls.append((operation, argument))
        error = self.fail.get(operation)
        if error is not None:
            raise error

    def called(self, operation: str) -> list[object]:
        """The arguments of every call of ``operation``, in order."""
        return [argument for name, argument in self.calls if name == operation]

    async def verify_identity(self, values: Mapping[str, str]) -> bool:
        self._call("verify_identity", dict(values))
        return all(self.identity.get(name) == value for name, value in values.items())

    async def save_readings(self, values: Mapping[str, str]) -> ReadingsVerdict:
        self._call("save_readings", dict(values))
        outside = [
            name
            for name, value in values.items()
            if name in self.thresholds and not self.thresholds[name][0] <= float(value) <= self.thresholds[name][1]
        ]
        return ReadingsVerdict(abnormal=bool(outside))

    async def medication_sound(self) -> str:
        self._call("medication_sound")
        return self.medication

    async def medication_result(self, confirmed: bool, keys: str) -> None:
        self._call("medication_result", (confirmed, keys))

    async def book_vaccination(self, day: int, slot: str) -> BookingResult:
        self._call("book_vaccination", (day, slot))
        if self.booking_outcome is not None:
            return BookingResult(self.booking_outcome)
        if (day, slot) in self.full:
            return BookingResult("full")
        self.booked.append((day, slot))
        return BookingResult("booked", f"booking-{len(self.booked)}", f"outreach/booked-day{day}-{slot}")

    async def cancel_vaccination(self) -> bool:
        self._call("cancel_vaccination")
        if not self.booked:
            return False
        self.booked.pop()
        return True

    async def report_adverse_reaction(self) -> None:
        self._call("report_adverse_reaction")

    async def record_survey(self, score: int) -> None:
        self._call("record_survey", score)
