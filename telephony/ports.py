"""Ports the interpreter needs besides the call itself: speech recognition, the patient directory, for
``consent`` nodes a call recorder and a consent store, and for the outreach nodes (identity check, readings,
medication reminders, vaccination) the scheduler's outreach port.

Speech and the directory are pluggable with honest "not available" defaults here, so a flow written for speech
or patient lookup still works (through its fallback / not-found edges) on a node that has neither. Consent has
no such default on purpose: a flow that reaches a ``consent`` node without a consent store (or, when the node
records, without a recorder) ends with outcome "error" rather than pretend a consent was taken. Neither has
outreach: an identity check or a reading that can't be stored must not pass for a success.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from telephony.channel import CallChannel, ChannelError


class RecognitionUnavailable(ChannelError):
    """Speech recognition failed for this call (media could not be set up, engine error, no recognizer free): the
    ``listen`` node takes its key-menu fallback; the call goes on. ``heard``: what the caller had said before it
    broke off, classified, so the record keeps what was spotted (the transcript is never in the message)."""

    def __init__(self, message: str, *, heard: Recognition | None = None) -> None:
        super().__init__(message)
        self.heard = heard


class RecognizerBusy(RecognitionUnavailable):
    """No recognizer is free for this call now (the node's budget of concurrent recognitions is spent, or the
    speech engine is full): the ``listen`` node gives the caller its key menu at once, never a wait."""


@dataclass(frozen=True)
class Recognition:
    """What the caller said and what it means. ``matched`` explains the classification (terms that fired)."""

    transcript: str
    category: str | None
    emergency: bool = False
    matched: tuple[str, ...] = ()
    # Triage (docs/triage.md): "emergency", "urgent" (symptoms without a red flag: nurse triage) or "routine";
    # how sure the classifier is, and the discriminator that fired. ``confirm``: a single weak red-flag cue,
    # so the flow asks the caller once instead of deciding silently.
    level: str = "routine"
    confidence: float = 1.0
    discriminator: str = ""
    confirm: bool = False


class Recognizer(Protocol):
    def available_for(self, channel: CallChannel) -> bool:
        """Can this call be listened to? (No model loaded, or a transport without audio: no.)"""
        ...

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        """A place among this node's concurrent recognitions, held while the ``with`` block runs (a whole
        ``listen`` node: its question, the listening, a confirmation). Raises ``RecognizerBusy`` (when called or
        entered) when none is free; never waits. Released on any exit, a hang-up and a cancellation included."""
        ...

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        """Listen to the caller for up to ``max_seconds``; None when nothing intelligible was said."""
        ...


class NoRecognizer:
    """No speech recognition on this node: ``listen`` nodes take their fallback (the DTMF menu)."""

    def available_for(self, channel: CallChannel) -> bool:
        return False

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        return nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        return None


@dataclass
class ScriptedRecognizer:
    """A recognizer that returns prepared results in order (tests, demos). None entries mean silence."""

    results: list[Recognition | None] = field(default_factory=list)
    available: bool = True

    def available_for(self, channel: CallChannel) -> bool:
        return self.available

    def admit(self, channel: CallChannel) -> AbstractContextManager[object]:
        return nullcontext()

    async def recognize(self, channel: CallChannel, max_seconds: float) -> Recognition | None:
        return self.results.pop(0) if self.results else None


@dataclass(frozen=True)
class PatientMatch:
    """An opaque reference to the patient record; never the name or number itself."""

    patient_ref: str


class PatientDirectory(Protocol):
    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None: ...


class NoPatientDirectory:
    """No registry connected: every caller is unknown."""

    async def lookup_caller(self, channel: CallChannel) -> PatientMatch | None:
        return None


# -- consent ------------------------------------------------------------------------------------------------------


class ConsentUnavailable(ChannelError):
    """A ``consent`` node can't take a consent on this call: no consent store or recorder configured, or the
    recording could not be started or stopped, or the store refused the consent. The flow ends with outcome
    "error" and this message (naming the flow and node); no consent is reported as taken."""


@dataclass(frozen=True)
class ConsentExchange:
    """What the patient heard and answered, for the signed, timestamped consent record.

    The texts are the exact words read to the caller (the flow's ``text`` and ``confirm_again``); the times are
    UTC: ``asked_at`` when the consent text began, ``confirmed_at`` when each of the two confirming keys arrived.
    ``recording`` is the name ``CallRecorder.start`` returned; it has been stopped before this is reported (so
    the file is complete and can be hashed). None when the node does not record (``record: false``).
    """

    flow: str
    node: str
    document: str
    text: str
    confirm_text: str
    asked_at: datetime
    confirmed_at: tuple[datetime, datetime]
    recording: str | None
    # The key pressed twice to confirm (the texts tell the caller which).
    key: str = "1"


class ConsentSink(Protocol):
    """Where a given consent goes (signed, timestamped and linked to the call by the service).

    Called once per consent given, after the second confirmation and after the recording was stopped; never for
    a refusal or a hang-up. An error raised here (a ``MedhotlineError``) ends the flow with outcome "error".
    """

    async def consent_given(self, exchange: ConsentExchange) -> None: ...


class CallRecorder(Protocol):
    """Records part of a call (both directions). ``label`` says what is recorded, e.g. ``consent.hotline.ask``
    (only ``[a-z0-9_.-]``, so it may become part of a recording name); the returned name identifies the
    recording for ``stop`` and in the consent record.

    ``stop`` is called exactly once for every successful ``start``, also when the caller hung up meanwhile;
    it must not fail because the call has ended.
    """

    async def start(self, channel: CallChannel, label: str) -> str: ...

    async def stop(self, channel: CallChannel, name: str) -> None: ...


# -- outreach -----------------------------------------------------------------------------------------------------


class OutreachUnavailable(ChannelError):
    """A node that needs the outreach port (identity check, readings, medication, vaccination) can't do its work:
    no port is configured on this call, the port failed, or it answered something unusable. The flow ends with
    outcome "error" and this message, which names the flow and node and never a patient's data."""


@dataclass(frozen=True)
class ReadingsVerdict:
    """What the port made of the readings of a ``save_readings`` node."""

    # At least one reading is outside the plan's thresholds (a recall task was created).
    abnormal: bool


BookingOutcome = Literal["booked", "full", "no_slot", "not_identified", "failed"]


@dataclass(frozen=True)
class BookingResult:
    """The answer to a vaccination booking. ``sound`` (already rendered) tells the patient the booked date and
    time; the ``vaccination_book`` node plays it whatever the outcome, when it is given."""

    outcome: BookingOutcome
    booking_id: str | None = None
    sound: str | None = None


class OutreachPort(Protocol):
    """The scheduler's side of an outreach call (or of a hotline call for vaccination), for the nodes
    ``verify_identity``, ``save_readings``, ``medication_confirm``, ``vaccination_book``, ``vaccination_cancel``,
    ``report_adverse_reaction`` and ``record_survey``. The patient is the call's: the called patient of an outbound
    call, or the caller the IVR identified; the flow never learns who it is.

    Values handed in are the flow variables the node names (keypad text, a ``*`` typed as decimal point already
    turned into ``.``). Any error raised here ends the flow with outcome "error" at that node; a
    ``MedhotlineError``'s message is kept in the call record (so it must name no patient), any other exception
    only by its type.
    """

    async def verify_identity(self, values: Mapping[str, str]) -> bool:
        """E.g. ``{"birth_year": "1956"}``, compared with the registry inside the port; nothing leaks to the flow.
        False also when the call has no patient to compare with."""
        ...

    async def save_readings(self, values: Mapping[str, str]) -> ReadingsVerdict:
        """E.g. ``{"systolic": "182", "diastolic": "95"}``: stored encrypted, thresholds checked, recall made."""
        ...

    async def medication_sound(self) -> str:
        """The sound name (rendered before the call) that reads the medication and dose to take."""
        ...

    async def medication_result(self, confirmed: bool, keys: str) -> None:
        """The answer to a medication reminder: the keys at the two questions, e.g. "1,1", "1,2", "1,-", "2",
        "-" (``-``: no key in time); "1" alone when the caller hung up after the first confirmation."""
        ...

    async def book_vaccination(self, day: int, slot: str) -> BookingResult:
        """``day`` 1..7 (1 = tomorrow), ``slot`` "morning" or "afternoon"."""
        ...

    async def cancel_vaccination(self) -> bool:
        """Cancel the patient's next booking; False when there is none."""
        ...

    async def report_adverse_reaction(self) -> None:
        """A task for medical staff and a follow-up call scheduled."""
        ...

    async def record_survey(self, score: int) -> None:
        """A satisfaction score 1-5 (already checked) written back to what the call is about: a complaint's answer
        call marks the task answered with it. Idempotent: the same score again changes nothing."""
        ...


# -- the HIS, as the scheduler and the CLI see it -----------------------------------------------------------------

AppointmentEvent = Literal["book", "change", "cancel"]


@dataclass(frozen=True)
class AppointmentFacts:
    """A booking as the HIS is told of it (SIU): ids are opaque; the patient is the registry's id."""

    booking_id: str
    patient_id: str
    starts_at: datetime
    ends_at: datetime
    service: str  # what is booked, e.g. the vaccine code
    service_name: str
    location: str  # the clinic's code
    changed_from: str | None = None  # the booking a change replaced


@dataclass(frozen=True)
class ReadingFact:
    """One follow-up reading (ORU OBX): its kind (``systolic``…), value, and whether it broke the plan's limit."""

    kind: str
    value: float = field(repr=False)
    abnormal: bool = field(repr=False)


@dataclass(frozen=True)
class VaccinationFacts:
    """A vaccination the patient reported on the phone (VXU), with whether they reported an adverse reaction."""

    patient_id: str
    vaccine: str
    vaccine_name: str
    given_at: datetime
    reaction: bool = False


class HisMessages(Protocol):
    """Hands what the hotline learns to the HIS: each method queues one message in the durable outbox (written
    before it returns) and returns its control id, by which the HIS's answer is matched later."""

    async def appointment(self, event: AppointmentEvent, appointment: AppointmentFacts) -> str: ...

    async def readings(self, patient_id: str, readings: Sequence[ReadingFact], taken_at: datetime) -> str: ...

    async def vaccination(self, facts: VaccinationFacts) -> str: ...
