"""The outreach nodes (identity check, readings, medication confirmation, vaccination booking, cancellation and
adverse-reaction reports): every edge, what the port hears, what the call record keeps, failures, the loader's
checks, and the shipped flows driven end to end over the in-memory channel against ``MemoryOutreach``.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ground.errors import MedhotlineError
from ivr.flow_graph import check_flows
from ivr.flow_loader import FlowError, LoadedFlow, load_flow, load_flows
from ivr.flow_model import (
    OUTREACH_TYPES,
    WAITING_TYPES,
    Flow,
    MedicationConfirmNode,
    SubflowNode,
    VaccinationBookNode,
)
from ivr.interpreter import FlowResult, FlowRunner, Step
from ivr.memory_channel import InMemoryCallChannel, MemoryOutreach, Operation
from medhotline.flows import render_dot, render_text, schema_text
from telephony.channel import UNAVAILABLE_SOUND
from telephony.ports import BookingResult, OutreachPort, ReadingsVerdict

REPO = Path(__file__).resolve().parents[3]
DIALPLANS = REPO / "dialplans"
Keys = list[str | None] | None
MEDICATION = "outreach/medication-test"

# The variables the synthetic flows set before their outreach node.
VARS = {
    "birth_year": "1956",
    "systolic": "135",
    "diastolic": "85",
    "vaccination_day": "3",
    "vaccination_slot": "morning",
    "satisfaction": "4",
}
# One ending per edge label, named after it, so a call's last step names the edge it took.
EDGE_ENDS = (
    "verified",
    "not_verified",
    "normal",
    "abnormal",
    "confirmed",
    "not_confirmed",
    "booked",
    "full",
    "not_booked",
    "cancelled",
    "none",
    "reported",
    "recorded",
)
MED: dict[str, Any] = {
    "type": "medication_confirm",
    "intro": "这里是用药提醒。请您按时服用：",
    "ask": "已服药请按1。",
    "repeat": "请再次确认：",
    "ask_again": "确认已服用请按1。",
    "timeout": 5,
    "next": {"confirmed": "confirmed", "not_confirmed": "not_confirmed"},
}
NODES: dict[str, dict[str, Any]] = {
    "verify_identity": {
        "type": "verify_identity",
        "vars": ["birth_year"],
        "next": {"verified": "verified", "not_verified": "not_verified"},
    },
    "save_readings": {
        "type": "save_readings",
        "vars": ["systolic", "diastolic"],
        "next": {"normal": "normal", "abnormal": "abnormal"},
    },
    "medication_confirm": MED,
    "vaccination_book": {
        "type": "vaccination_book",
        "next": {"booked": "booked", "full": "full", "not_booked": "not_booked"},
    },
    "vaccination_cancel": {"type": "vaccination_cancel", "next": {"cancelled": "cancelled", "none": "none"}},
    "report_adverse_reaction": {"type": "report_adverse_reaction", "next": "reported"},
    "record_survey": {"type": "record_survey", "var": "satisfaction", "next": "recorded"},
}


def _sound_for(text: str) -> str:
    return f"tts/{text}"


def _tts(text: str) -> Operation:
    return ("play", _sound_for(text))


def _flow(node: dict[str, Any], variables: dict[str, str] | None = None, **before: Any) -> Flow:
    """set (the variables) → [a play node given as ``before``] → the node under test → one hangup per edge."""
    nodes: dict[str, Any] = {"start": {"type": "set", "vars": variables or VARS, "next": "pre" if before else "n"}}
    if before:
        nodes["pre"] = {"type": "play", "next": "n", **before}
    nodes["n"] = node
    nodes.update({end: {"type": "hangup"} for end in EDGE_ENDS})
    return Flow.model_validate({"flow": "t", "start": "start", "nodes": nodes})


@dataclass
class Call:
    result: FlowResult
    steps: list[Step]
    channel: InMemoryCallChannel
    logs: list[MutableMapping[str, Any]]

    @property
    def path(self) -> list[str]:
        return [s.node if s.flow in ("t",) else f"{s.flow}:{s.node}" for s in self.steps]

    def step(self, node: str) -> Step:
        [found] = [s for s in self.steps if s.node == node]
        return found

    def heard(self, text: str) -> bool:
        return _tts(text) in self.channel.operations


_DEFAULT: Any = object()


async def _call(
    flow: Flow,
    keys: Keys = None,
    *,
    outreach: OutreachPort | None = _DEFAULT,
    subflows: tuple[Flow, ...] = (),
    channel: InMemoryCallChannel | None = None,
) -> Call:
    steps: list[Step] = []

    async def on_step(step: Step) -> None:
        steps.append(step)

    runner = FlowRunner(
        {f.flow: LoadedFlow(f, Path(f"{f.flow}.yaml"), "v1") for f in (flow, *subflows)},
        _sound_for,
        on_step,
        outreach=MemoryOutreach() if outreach is _DEFAULT else outreach,
    )
    channel = channel or InMemoryCallChannel(keys=keys)
    with capture_logs() as logs:
        result = await asyncio.wait_for(runner.run(flow, channel), timeout=5)
    return Call(result, steps, channel, logs)


def _no_values_recorded(call: Call, *values: str) -> None:
    for step in call.steps:
        for value in values:
            assert value not in f"{step.edge}|{step.input}", f"{value!r} recorded at {step.node}"


# -- verify_identity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("birth_year", "edge"), [("1956", "verified"), ("1957", "not_verified")])
async def test_verify_identity_edges_and_nothing_identifying_is_recorded(birth_year: str, edge: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["verify_identity"], {**VARS, "birth_year": birth_year}), outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == edge
    assert call.step("n") == Step("t", "n", "verify_identity", edge, None)
    assert outreach.called("verify_identity") == [{"birth_year": birth_year}]
    _no_values_recorded(call, birth_year)


async def test_verify_identity_hands_every_named_variable_to_the_port() -> None:
    outreach = MemoryOutreach(identity={"birth_year": "1956", "id_tail": "1234"})
    node = {**NODES["verify_identity"], "vars": ["birth_year", "id_tail"]}
    call = await _call(_flow(node, {"birth_year": "1956", "id_tail": "1234"}), outreach=outreach)
    assert call.result.last_step == "verified"
    assert outreach.called("verify_identity") == [{"birth_year": "1956", "id_tail": "1234"}]
    _no_values_recorded(call, "1956", "1234")


@dataclass
class Answers(MemoryOutreach):
    """A port answering with values of the wrong type, as a buggy implementation might."""

    verified: Any = True
    verdict: Any = None
    cancel: Any = True
    booking: Any = None

    async def verify_identity(self, values: Any) -> Any:
        return self.verified

    async def save_readings(self, values: Any) -> Any:
        return self.verdict

    async def cancel_vaccination(self) -> Any:
        return self.cancel

    async def book_vaccination(self, day: int, slot: str) -> Any:
        return self.booking


@pytest.mark.parametrize("answer", ["yes", 1, None])
async def test_only_a_plain_true_verifies(answer: object) -> None:
    call = await _call(_flow(NODES["verify_identity"]), outreach=Answers(verified=answer))
    assert call.result.last_step == "not_verified"


# -- save_readings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("systolic", "diastolic", "edge"),
    [("135", "85", "normal"), ("182", "95", "abnormal"), ("85", "70", "abnormal"), ("120", "95", "abnormal")],
)
async def test_save_readings_edges_and_no_reading_is_recorded(systolic: str, diastolic: str, edge: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["save_readings"], {"systolic": systolic, "diastolic": diastolic}), outreach=outreach)
    assert call.result.last_step == edge
    assert call.step("n") == Step("t", "n", "save_readings", edge, None)
    assert outreach.called("save_readings") == [{"systolic": systolic, "diastolic": diastolic}]
    _no_values_recorded(call, systolic, diastolic)


async def test_a_star_typed_as_decimal_point_reaches_the_port_as_a_point() -> None:
    outreach = MemoryOutreach()
    node = {**NODES["save_readings"], "vars": ["glucose"]}
    call = await _call(_flow(node, {"glucose": "7*2"}), outreach=outreach)
    assert outreach.called("save_readings") == [{"glucose": "7.2"}]
    assert call.result.last_step == "normal"


@pytest.mark.parametrize("value", ["7*2*9", "7*", "*5", "12\n", "", "1e3"])
async def test_a_value_that_is_no_number_is_an_error_that_does_not_show_it(value: str) -> None:
    outreach = MemoryOutreach()
    node = {**NODES["save_readings"], "vars": ["glucose"]}
    call = await _call(_flow(node, {"glucose": value}), outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.error == "flow 't' node 'n': variable 'glucose' is not a number"
    assert outreach.called("save_readings") == []


@pytest.mark.parametrize(
    ("verdict", "edge"),
    [(ReadingsVerdict(abnormal=False), "normal"), (ReadingsVerdict(abnormal=True), "abnormal")],
)
async def test_the_verdict_decides(verdict: ReadingsVerdict, edge: str) -> None:
    call = await _call(_flow(NODES["save_readings"]), outreach=Answers(verdict=verdict))
    assert call.result.last_step == edge


async def test_a_verdict_that_is_not_plainly_normal_counts_as_abnormal() -> None:
    # The safe side: the caller hears the recall suggestion rather than "all is well".
    verdict = ReadingsVerdict(abnormal="no")  # type: ignore[arg-type]
    call = await _call(_flow(NODES["save_readings"]), outreach=Answers(verdict=verdict))
    assert call.result.last_step == "abnormal"


async def test_no_verdict_is_an_error() -> None:
    call = await _call(_flow(NODES["save_readings"]), outreach=Answers(verdict={"abnormal": False}))
    assert call.result.outcome == "error"
    assert call.result.error == "flow 't' node 'n': saving the readings gave no verdict"


# -- medication_confirm ------------------------------------------------------------------------------------------


async def test_medication_key_twice_is_confirmed_with_the_medication_read_twice() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), ["1", "1"], outreach=outreach)
    assert call.result == FlowResult("completed", "confirmed", variables=VARS)
    assert call.step("n") == Step("t", "n", "medication_confirm", "confirmed", "1,1")
    assert outreach.called("medication_result") == [(True, "1,1")]
    assert call.channel.operations == [
        ("answer",),
        _tts(MED["intro"]),
        ("play", MEDICATION),
        _tts(MED["ask"]),
        ("read_digits", "1"),
        _tts(MED["repeat"]),
        ("play", MEDICATION),
        _tts(MED["ask_again"]),
        ("read_digits", "1"),
        ("hangup",),
    ]
    # The medication is fetched once, before anything is said.
    assert outreach.calls[0] == ("medication_sound", None)
    assert [name for name, _ in outreach.calls] == ["medication_sound", "medication_result"]


@pytest.mark.parametrize(
    ("keys", "recorded", "read_twice"),
    [
        pytest.param(["1", "2"], "1,2", True, id="1-then-2"),
        pytest.param(["1", None], "1,-", True, id="1-then-silence"),
        pytest.param(["1", "#"], "1,#", True, id="1-then-hash"),
        pytest.param(["2"], "2", False, id="2"),
        pytest.param(["*"], "*", False, id="star"),
        pytest.param([None], "-", False, id="silence"),
    ],
)
async def test_anything_else_is_not_confirmed_without_a_second_chance(
    keys: list[str | None], recorded: str, read_twice: bool
) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), keys, outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "not_confirmed"
    assert call.step("n") == Step("t", "n", "medication_confirm", "not_confirmed", recorded)
    assert outreach.called("medication_result") == [(False, recorded)]
    assert call.channel.sounds.count(MEDICATION) == (2 if read_twice else 1)
    assert call.heard(MED["ask_again"]) is read_twice
    assert call.channel.keys == []  # no key left unread: nothing was asked again
    # Asked once each: no retries inside the node (the scheduler calls again).
    assert call.channel.sounds.count(_sound_for(MED["ask"])) == 1


async def test_hang_up_after_the_first_key_is_reported_not_confirmed_and_ends_the_call() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), ["1"], outreach=outreach)  # the script ends: hang-up at the second question
    assert call.result.outcome == "caller_hangup"
    assert call.result.last_step == "n"
    assert outreach.called("medication_result") == [(False, "1")]
    assert "n" not in call.path


async def test_hang_up_while_the_medication_is_repeated_is_reported_not_confirmed() -> None:
    # answer, intro, medication, ask, read "1", repeat, medication ← the caller hangs up here (operation 7)
    channel = InMemoryCallChannel(keys=["1", "1"], hang_up_at=7)
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), channel=channel, outreach=outreach)
    assert call.result.outcome == "caller_hangup"
    assert channel.operations[-1] == ("play", MEDICATION)
    assert outreach.called("medication_result") == [(False, "1")]


async def test_a_lost_connection_after_the_first_key_is_reported_too_and_stays_the_outcome() -> None:
    channel = InMemoryCallChannel(keys=["1", "1"], lose_connection_at=6)
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), channel=channel, outreach=outreach)
    assert call.result.outcome == "connection_lost"
    assert outreach.called("medication_result") == [(False, "1")]


async def test_hang_up_before_the_first_answer_reports_nothing() -> None:
    channel = InMemoryCallChannel(keys=["1", "1"], hang_up_at=3)  # during the medication sound
    outreach = MemoryOutreach()
    call = await _call(_flow(MED), channel=channel, outreach=outreach)
    assert call.result.outcome == "caller_hangup"
    assert outreach.called("medication_result") == []


async def test_a_port_failing_to_record_the_hang_up_is_logged_and_the_hang_up_stays_the_outcome() -> None:
    outreach = MemoryOutreach(fail={"medication_result": MedhotlineError("database unavailable")})
    call = await _call(_flow(MED), ["1"], outreach=outreach)
    assert call.result.outcome == "caller_hangup"
    [event] = [e for e in call.logs if e["event"] == "outreach.medication_answer_lost"]
    assert event["node"] == "n"
    assert "recording the medication answer failed: database unavailable" in event["error"]


async def test_keys_typed_ahead_or_during_the_texts_do_not_answer() -> None:
    # A key skipping an earlier announcement (type-ahead) must not confirm a medication nobody has heard yet.
    outreach = MemoryOutreach()
    flow = _flow(MED, say="您好", barge_in=True)
    call = await _call(flow, ["1", "2"], outreach=outreach)
    assert outreach.called("medication_result") == [(False, "2")]
    assert call.heard(MED["intro"])
    assert call.channel.operations[1] == _tts("您好")


async def test_another_key_can_be_configured() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow({**MED, "key": 9}), ["9", "9"], outreach=outreach)
    assert call.result.last_step == "confirmed"
    call = await _call(_flow({**MED, "key": 9}), ["1", "1"], outreach=outreach)
    assert call.result.last_step == "not_confirmed"
    assert outreach.called("medication_result") == [(True, "9,9"), (False, "1")]


@pytest.mark.parametrize("sound", ["../../etc/passwd", "/var/lib/secret", "outreach/med\n", "", "a b"])
async def test_a_sound_name_the_port_should_not_give_is_an_error_and_nothing_is_asked(sound: str) -> None:
    outreach = MemoryOutreach(medication=sound)  # a path out of the sounds directory, or no name at all
    call = await _call(_flow(MED), ["1", "1"], outreach=outreach)
    assert call.result.outcome == "error"
    assert (
        call.result.error
        == "flow 't' node 'n': the medication sound is not a sound name (A-Z a-z 0-9 _ / -, not starting with /)"
    )
    assert not call.heard(MED["intro"])
    assert outreach.called("medication_result") == []


async def test_a_confirmation_that_cannot_be_recorded_is_an_error_not_a_thank_you() -> None:
    outreach = MemoryOutreach(fail={"medication_result": MedhotlineError("database unavailable")})
    call = await _call(_flow(MED), ["1", "1"], outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.error == ("flow 't' node 'n': recording the medication answer failed: database unavailable")
    assert "confirmed" not in call.path


# -- vaccination_book ---------------------------------------------------------------------------------------------


async def test_booked_plays_the_ports_sound_and_records_only_the_outcome() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["vaccination_book"]), outreach=outreach)
    assert call.result.last_step == "booked"
    assert call.step("n") == Step("t", "n", "vaccination_book", "booked", "booked")
    assert outreach.called("book_vaccination") == [(3, "morning")]
    assert call.channel.sounds == ["outreach/booked-day3-morning"]


async def test_full_slot() -> None:
    outreach = MemoryOutreach(full={(3, "morning")})
    call = await _call(_flow(NODES["vaccination_book"]), outreach=outreach)
    assert call.result.last_step == "full"
    assert call.step("n").input == "full"
    assert call.channel.sounds == []
    assert outreach.booked == []


@pytest.mark.parametrize("outcome", ["no_slot", "not_identified", "failed"])
async def test_every_other_outcome_is_not_booked_and_says_which(outcome: Any) -> None:
    call = await _call(_flow(NODES["vaccination_book"]), outreach=MemoryOutreach(booking_outcome=outcome))
    assert call.result.last_step == "not_booked"
    assert call.step("n") == Step("t", "n", "vaccination_book", "not_booked", outcome)


async def test_a_sound_given_with_another_outcome_is_played_too() -> None:
    booking = BookingResult("full", sound="outreach/next-free-day")
    call = await _call(_flow(NODES["vaccination_book"]), outreach=Answers(booking=booking))
    assert call.result.last_step == "full"
    assert call.channel.sounds == ["outreach/next-free-day"]


async def test_other_variable_names_can_be_given() -> None:
    outreach = MemoryOutreach()
    node = {**NODES["vaccination_book"], "day_var": "day", "slot_var": "part"}
    call = await _call(_flow(node, {"day": "7", "part": "afternoon"}), outreach=outreach)
    assert call.result.last_step == "booked"
    assert outreach.called("book_vaccination") == [(7, "afternoon")]


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        ({"vaccination_day": "8", "vaccination_slot": "morning"}, "variable 'vaccination_day' is not a day 1-7"),
        ({"vaccination_day": "0", "vaccination_slot": "morning"}, "variable 'vaccination_day' is not a day 1-7"),
        ({"vaccination_day": "３", "vaccination_slot": "morning"}, "variable 'vaccination_day' is not a day 1-7"),
        ({"vaccination_day": "3\n", "vaccination_slot": "morning"}, "variable 'vaccination_day' is not a day 1-7"),
        (
            {"vaccination_day": "3", "vaccination_slot": "evening"},
            "variable 'vaccination_slot' is not a slot (morning, afternoon)",
        ),
        (
            {"vaccination_slot": "morning"},
            "variable 'vaccination_day' has no value (collect it before this node)",
        ),
    ],
)
async def test_an_unusable_day_or_slot_is_an_error_and_nothing_is_booked(variables: dict[str, str], error: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["vaccination_book"], variables), outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.error == f"flow 't' node 'n': {error}"
    assert outreach.called("book_vaccination") == []


@pytest.mark.parametrize(
    "booking",
    [None, BookingResult("maybe"), {"outcome": "booked"}],  # type: ignore[arg-type]
    ids=["nothing", "unknown-outcome", "not-a-result"],
)
async def test_a_booking_answer_without_a_known_outcome_is_an_error(booking: object) -> None:
    call = await _call(_flow(NODES["vaccination_book"]), outreach=Answers(booking=booking))
    assert call.result.outcome == "error"
    assert call.result.error == "flow 't' node 'n': the booking gave no known outcome"


async def test_a_booking_sound_that_is_no_sound_name_is_an_error() -> None:
    booking = BookingResult("booked", "b1", "sound with spaces")
    call = await _call(_flow(NODES["vaccination_book"]), outreach=Answers(booking=booking))
    assert call.result.outcome == "error"
    assert call.result.error is not None
    assert "the booking's sound is not a sound name" in call.result.error


# -- vaccination_cancel, report_adverse_reaction -----------------------------------------------------------------


@pytest.mark.parametrize(("booked", "edge"), [([(2, "morning")], "cancelled"), ([], "none")])
async def test_cancel_edges(booked: list[tuple[int, str]], edge: str) -> None:
    outreach = MemoryOutreach(booked=list(booked))
    call = await _call(_flow(NODES["vaccination_cancel"]), outreach=outreach)
    assert call.result.last_step == edge
    assert call.step("n") == Step("t", "n", "vaccination_cancel", edge, None)
    assert outreach.booked == []


@pytest.mark.parametrize("answer", ["yes", 1, None])
async def test_only_a_plain_true_is_cancelled(answer: object) -> None:
    call = await _call(_flow(NODES["vaccination_cancel"]), outreach=Answers(cancel=answer))
    assert call.result.last_step == "none"


async def test_report_adverse_reaction() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["report_adverse_reaction"]), outreach=outreach)
    assert call.result.last_step == "reported"
    assert call.step("n") == Step("t", "n", "report_adverse_reaction", "next", None)
    assert outreach.called("report_adverse_reaction") == [None]


# -- record_survey --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["1", "3", "5"])
async def test_record_survey_hands_the_score_to_the_port_and_the_record_keeps_only_the_edge(score: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["record_survey"], {"satisfaction": score}), outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "recorded"
    assert call.step("n") == Step("t", "n", "record_survey", "next", None)
    assert outreach.called("record_survey") == [int(score)]


@pytest.mark.parametrize("value", ["0", "6", "9", "45", "a", "4.5", " 4", "４"])
async def test_a_value_that_is_no_score_1_to_5_is_refused_and_nothing_is_written(value: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["record_survey"], {"satisfaction": value}), outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.last_step == "n"
    assert call.result.error == "flow 't' node 'n': variable 'satisfaction' is not a satisfaction score 1-5"
    assert outreach.calls == []
    _no_values_recorded(call, value)


async def test_record_survey_without_the_score_collected_asks_nothing() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["record_survey"], {"other": "x"}), outreach=outreach)
    assert call.result.error == "flow 't' node 'n': variable 'satisfaction' has no value (collect it before this node)"
    assert outreach.calls == []


def test_record_survey_is_refused_with_a_prompt_or_a_variable_no_node_sets() -> None:
    with pytest.raises(ValueError, match="record_survey node has no prompt"):
        _flow({**NODES["record_survey"], "say": "谢谢"})
    with pytest.raises(ValueError, match="var"):
        _flow({**NODES["record_survey"], "var": "9bad"})
    flow = Flow.model_validate({"flow": "t", "start": "n", "nodes": {"n": NODES["record_survey"],
                                "recorded": {"type": "hangup"}}})  # fmt: skip
    problems = check_flows({"t": LoadedFlow(flow, Path("t.yaml"), "v1")})
    assert any("'satisfaction' is not set by any" in str(p) for p in problems)


# -- no port, a failing port -------------------------------------------------------------------------------------


def test_the_outreach_types_are_the_ones_tested_here() -> None:
    assert set(NODES) == OUTREACH_TYPES
    assert "medication_confirm" in WAITING_TYPES


@pytest.mark.parametrize("kind", sorted(NODES))
async def test_without_a_port_the_flow_ends_in_error_naming_flow_and_node(kind: str) -> None:
    call = await _call(_flow(NODES[kind]), ["1", "1"], outreach=None)
    assert call.result.outcome == "error"
    assert call.result.last_step == "n"
    assert call.result.error == "flow 't' node 'n': no outreach port configured, so this node can't do its work"
    # Nothing of the node said or asked; the caller is told the service can't take the call, then hung up.
    assert call.channel.sounds == [UNAVAILABLE_SOUND]
    assert call.channel.operations[-1] == ("hangup",)
    assert call.path == ["start"]
    [failed] = [e for e in call.logs if e["event"] == "flow.failed"]
    assert failed["node"] == "n"


OPERATION_OF = {
    "verify_identity": ("verify_identity", "the identity check"),
    "save_readings": ("save_readings", "saving the readings"),
    "medication_confirm": ("medication_sound", "fetching the medication sound"),
    "vaccination_book": ("book_vaccination", "the booking"),
    "vaccination_cancel": ("cancel_vaccination", "the cancellation"),
    "report_adverse_reaction": ("report_adverse_reaction", "the adverse reaction report"),
    "record_survey": ("record_survey", "recording the satisfaction score"),
}


@pytest.mark.parametrize("kind", sorted(NODES))
async def test_a_project_error_of_the_port_ends_in_error_with_its_message(kind: str) -> None:
    operation, what = OPERATION_OF[kind]
    outreach = MemoryOutreach(fail={operation: MedhotlineError("the registry is not connected yet")})
    call = await _call(_flow(NODES[kind]), ["1", "1"], outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.last_step == "n"
    assert call.result.error == f"flow 't' node 'n': {what} failed: the registry is not connected yet"
    assert call.channel.operations[-1] == ("hangup",)
    assert [e["event"] for e in call.logs] == ["flow.failed"]


@pytest.mark.parametrize("kind", sorted(NODES))
async def test_any_other_exception_of_the_port_is_an_error_named_by_its_type_only(kind: str) -> None:
    # A driver's error text may quote the data it was given; it must reach neither the call record nor a log.
    operation, what = OPERATION_OF[kind]
    secret = "patient 13800138000 born 1956"
    outreach = MemoryOutreach(fail={operation: RuntimeError(secret)})
    call = await _call(_flow(NODES[kind]), ["1", "1"], outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.error == f"flow 't' node 'n': {what} failed (RuntimeError)"
    assert secret not in repr(call.logs)
    assert "13800138000" not in repr(call.logs)


async def test_a_missing_variable_is_an_error_and_the_port_is_not_asked() -> None:
    outreach = MemoryOutreach()
    call = await _call(_flow(NODES["verify_identity"], {"other": "x"}), outreach=outreach)
    assert call.result.outcome == "error"
    assert call.result.error == ("flow 't' node 'n': variable 'birth_year' has no value (collect it before this node)")
    assert outreach.calls == []


async def test_a_node_inside_a_subflow_names_the_subflow_and_the_node() -> None:
    child = Flow.model_validate(
        {
            "flow": "child",
            "start": "book",
            "nodes": {
                "book": {
                    "type": "vaccination_book",
                    "next": {"booked": "back", "full": "back", "not_booked": "back"},
                },
                "back": {"type": "return"},
            },
        }
    )
    parent = Flow.model_validate(
        {
            "flow": "t",
            "start": "start",
            "nodes": {
                "start": {"type": "set", "vars": VARS, "next": "sub"},
                "sub": {"type": "subflow", "flow": "child", "next": "bye"},
                "bye": {"type": "hangup"},
            },
        }
    )
    call = await _call(parent, subflows=(child,), outreach=None)
    assert call.result.outcome == "error"
    assert call.result.last_step == "child:book"
    assert call.result.error == "flow 'child' node 'book': no outreach port configured, so this node can't do its work"


# -- the flow language ---------------------------------------------------------------------------------------------


def test_defaults() -> None:
    flow = Flow.model_validate(
        {
            "flow": "t",
            "start": "m",
            "nodes": {"m": MED, "b": NODES["vaccination_book"], **{e: {"type": "hangup"} for e in EDGE_ENDS}},
        }
    )
    med, book = flow.nodes["m"], flow.nodes["b"]
    assert isinstance(med, MedicationConfirmNode)
    assert (med.key, med.barge_in) == ("1", False)
    assert isinstance(book, VaccinationBookNode)
    assert (book.day_var, book.slot_var) == ("vaccination_day", "vaccination_slot")
    assert book.targets() == {"booked": "booked", "full": "full", "not_booked": "not_booked"}


def test_medication_texts_are_rendered_by_prompts_build() -> None:
    texts = _flow(MED).prompt_texts()
    for key in ("intro", "ask", "repeat", "ask_again"):
        assert MED[key] in texts


HEAD = "flow: t\nstart: s\nnodes:\n  s:\n    type: set\n    vars: {birth_year: '1956', systolic: '1'}\n    next: n\n"
BYE = "  bye:\n    type: hangup\n"


def _node(text: str) -> str:
    return "  n:\n" + "".join(f"    {line}\n" for line in text.strip().splitlines())


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        pytest.param(
            "type: verify_identity\nsay: 请稍候\nvars: [birth_year]\nnext: {verified: bye, not_verified: bye}",
            "8:3: nodes.n: a verify_identity node has no prompt of its own; put any announcement in a play node "
            "before it",
            id="say-on-a-port-node",
        ),
        pytest.param(
            "type: save_readings\nbarge_in: true\nvars: [systolic]\nnext: {normal: bye, abnormal: bye}",
            "8:3: nodes.n: a save_readings node has no prompt, so barge_in can't be true",
            id="barge-in",
        ),
        pytest.param(
            "type: verify_identity\nvars: [birth_year, birth_year]\nnext: {verified: bye, not_verified: bye}",
            "10:5: nodes.n.vars: variables named more than once: birth_year",
            id="repeated-var",
        ),
        pytest.param(
            "type: verify_identity\nvars: []\nnext: {verified: bye, not_verified: bye}",
            "10:5: nodes.n.vars: List should have at least 1 item after validation, not 0",
            id="no-vars",
        ),
        pytest.param(
            "type: verify_identity\nvars: [birth_year]\nnext: {verified: bye}",
            "11:5: nodes.n.next: missing required key `not_verified`",
            id="missing-edge",
        ),
        pytest.param(
            "type: save_readings\nvars: [systolic]\nnext: bye",
            "11:5: nodes.n.next: Input should be a valid dictionary or instance of ReadingsNext",
            id="next-is-not-a-mapping",
        ),
        pytest.param(
            "type: vaccination_book\nday_var: day\nslot_var: day\nnext: {booked: bye, full: bye, not_booked: bye}",
            "8:3: nodes.n: day_var and slot_var must name different variables",
            id="same-var-twice",
        ),
        pytest.param(
            "type: medication_confirm\nintro: a\nask: b\nrepeat: c\nask_again: d\nkey: 12\n"
            "next: {confirmed: bye, not_confirmed: bye}",
            "14:5: nodes.n.key: key must be one key of the phone: 0-9, * or # (got '12')",
            id="two-digit-key",
        ),
        pytest.param(
            "type: medication_confirm\nintro: a\nask: b\nask_again: d\nnext: {confirmed: bye, not_confirmed: bye}",
            "8:3: nodes.n: missing required key `repeat`",
            id="missing-text",
        ),
        pytest.param(
            "type: medication_confirm\nintro: a\nask: b\nrepeat: c\nask_again: d\nretries: 2\n"
            "next: {confirmed: bye, not_confirmed: bye}",
            "14:5: nodes.n.retries: unknown key `retries`",
            id="no-retries-inside-the-node",
        ),
        pytest.param(
            "type: vaccination_cancel\nnext: {cancelled: bye, none: nowhere}",
            "10:28: nodes.n.next.none: node 'nowhere' is not defined",
            id="undefined-target",
        ),
    ],
)
def test_loader_names_line_node_and_field(tmp_path: Path, node: str, expected: str) -> None:
    assert _problems(tmp_path, HEAD + _node(node) + BYE) == [expected]


def test_a_variable_no_node_sets_is_reported_where_it_is_named(tmp_path: Path) -> None:
    node = "type: verify_identity\nvars: [birth_year, birth_yaer]\nnext: {verified: bye, not_verified: bye}"
    assert _problems(tmp_path, HEAD + _node(node) + BYE) == [
        "10:24: nodes.n.vars.1: variable 'birth_yaer' is not set by any collect, listen or set node of this flow"
    ]


def test_default_booking_variables_no_node_sets_are_reported_at_the_node(tmp_path: Path) -> None:
    node = "type: vaccination_book\nnext: {booked: bye, full: bye, not_booked: bye}"
    assert _problems(tmp_path, HEAD + _node(node) + BYE) == [
        "8:3: nodes.n.day_var: variable 'vaccination_day' is not set by any collect, listen or set node of this flow",
        "8:3: nodes.n.slot_var: variable 'vaccination_slot' is not set by any collect, listen or set node of this flow",
    ]


def test_variables_from_collect_listen_and_lookup_count_as_set(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "flow: t\nstart: c\nnodes:\n"
        "  c:\n    type: collect\n    say: 请输入\n    var: birth_year\n    next: l\n    fallback: bye\n"
        "  l:\n    type: listen\n    categories: {general: p}\n    default: p\n    fallback: p\n"
        "  p:\n    type: lookup_patient\n    found: n\n    not_found: n\n"
        + _node(
            "type: verify_identity\nvars: [birth_year, transcript, priority, patient_ref]\n"
            "next: {verified: bye, not_verified: bye}"
        )
        + BYE,
        encoding="utf-8",
    )
    assert load_flow(path).flow.nodes["n"].type == "verify_identity"


def test_a_loop_of_outreach_nodes_that_never_waits_is_reported_and_a_medication_question_waits(
    tmp_path: Path,
) -> None:
    busy = (
        "flow: t\nstart: s\nnodes:\n  s:\n    type: set\n    vars: {birth_year: '1956'}\n    next: n\n"
        "  n:\n    type: verify_identity\n    vars: [birth_year]\n    next: {verified: bye, not_verified: r}\n"
        "  r:\n    type: report_adverse_reaction\n    next: n\n" + BYE
    )
    assert _problems(tmp_path, busy) == [
        "8:3: nodes.n: loop that never waits for the caller: n → r → n (put a menu, collect, listen or confirm "
        "node in it)"
    ]
    waits = (
        "flow: t\nstart: m\nnodes:\n"
        + _node(
            "type: medication_confirm\nintro: a\nask: b\nrepeat: c\nask_again: d\n"
            "next: {confirmed: bye, not_confirmed: r}"
        ).replace("  n:", "  m:")
        + "  r:\n    type: report_adverse_reaction\n    next: m\n"
        + BYE
    )
    path = tmp_path / "w.yaml"
    path.write_text(waits, encoding="utf-8")
    assert load_flow(path).flow.nodes["m"].type == "medication_confirm"


def test_show_and_dot_draw_the_outreach_edges() -> None:
    loaded = load_flows(DIALPLANS)["vaccination"]
    text = render_text(loaded)
    assert "book               vaccination_book day=vaccination_day slot=vaccination_slot\n" in text
    assert "                     full → slot_full\n" in text
    assert "                     none → no_booking\n" in text
    dot = render_dot(loaded.flow)
    for edge in (
        '"verify" -> "choose_service" [label="verified"];',
        '"verify" -> "not_verified" [label="not_verified"];',
        '"book" -> "booked" [label="booked"];',
        '"book" -> "slot_full" [label="full"];',
        '"book" -> "not_booked" [label="not_booked"];',
        '"cancel" -> "cancelled" [label="cancelled"];',
        '"cancel" -> "no_booking" [label="none"];',
        '"report_reaction" -> "reaction_reported" [label="next"];',
    ):
        assert edge in dot
    medication = render_text(load_flows(DIALPLANS)["medication"])
    assert "remind        medication_confirm key=1 «这里是用药提醒。请您按时服用：»\n" in medication
    assert "                not_confirmed → remind_later\n" in medication


def test_schema_knows_the_outreach_nodes() -> None:
    text = schema_text()
    for kind in OUTREACH_TYPES:
        assert f'"const": "{kind}"' in text


# -- the shipped flows, end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, Flow]:
    loaded = load_flows(DIALPLANS)
    assert check_flows(loaded) == []
    return {name: flow.flow for name, flow in loaded.items()}


def _said(flow: Flow, node: str) -> str:
    text = flow.nodes[node].say
    assert text is not None
    return _sound_for(text)


def test_the_hotline_still_calls_the_vaccination_flow(shipped: dict[str, Flow]) -> None:
    node = shipped["hotline"].nodes["book_vaccination"]
    assert isinstance(node, SubflowNode)
    assert node.flow == "vaccination"
    assert {"followup", "followup_diabetes", "medication", "vaccination", "hotline"} <= set(shipped)


async def test_followup_normal_readings(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup"], ["1956", "135#", "85#"], outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "thanks"
    assert call.path == [
        "followup:intro",
        "followup:identity",
        "followup:verify",
        "followup:systolic",
        "followup:diastolic",
        "followup:save",
        "followup:thanks",
    ]
    assert outreach.called("save_readings") == [{"systolic": "135", "diastolic": "85"}]
    _no_values_recorded(call, "1956", "135", "85")


async def test_followup_abnormal_readings_hear_the_recall_suggestion(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup"], ["1956", "182#", "95#"], outreach=outreach)
    assert call.result.last_step == "recall_bye"
    assert call.step("save").edge == "abnormal"
    assert _said(shipped["followup"], "recall") in call.channel.sounds
    assert _said(shipped["followup"], "thanks") not in call.channel.sounds
    _no_values_recorded(call, "182", "95")


async def test_followup_implausible_reading_is_asked_again(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup"], ["1956", "400#", "135#", "85#"], outreach=outreach)
    assert call.result.last_step == "thanks"
    assert outreach.called("save_readings") == [{"systolic": "135", "diastolic": "85"}]


async def test_followup_wrong_birth_year_asks_no_health_question(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup"], ["1957", "135#", "85#"], outreach=outreach)
    assert call.result.last_step == "not_verified"
    assert call.step("verify").edge == "not_verified"
    assert _said(shipped["followup"], "systolic") not in call.channel.sounds
    assert outreach.called("save_readings") == []


@pytest.mark.parametrize(
    ("keys", "sent", "end"),
    [
        (["7*2#"], "7.2", "thanks"),
        (["12#"], "12", "recall_bye"),
        (["3*1#"], "3.1", "recall_bye"),
        (["72#", "7*2#"], "7.2", "thanks"),  # 72 is no meter reading: asked again, not stored as 72
        (["0*8#", "33*4#", "5#"], "5", "thanks"),
    ],
)
async def test_followup_diabetes_glucose(shipped: dict[str, Flow], keys: list[str | None], sent: str, end: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup_diabetes"], ["1956", *keys], outreach=outreach)
    assert call.result.last_step == end
    assert outreach.called("save_readings") == [{"glucose": sent}]
    assert call.step("glucose").input == "valid"


async def test_followup_diabetes_wrong_birth_year(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["followup_diabetes"], ["2001", "7*2#"], outreach=outreach)
    assert call.result.last_step == "not_verified"
    assert outreach.called("save_readings") == []


async def test_medication_flow_confirmed(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["medication"], ["1956", "1", "1"], outreach=outreach)
    assert call.result.last_step == "thanks"
    assert outreach.called("medication_result") == [(True, "1,1")]
    assert call.channel.sounds.count(MEDICATION) == 2


@pytest.mark.parametrize(("keys", "recorded"), [(["1", "2"], "1,2"), (["2"], "2"), ([None], "-"), (["1", None], "1,-")])
async def test_medication_flow_not_confirmed(shipped: dict[str, Flow], keys: list[str | None], recorded: str) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["medication"], ["1956", *keys], outreach=outreach)
    assert call.result.last_step == "remind_later"
    assert outreach.called("medication_result") == [(False, recorded)]


async def test_medication_flow_hang_up_after_one_confirmation(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["medication"], ["1956", "1"], outreach=outreach)
    assert call.result.outcome == "caller_hangup"
    assert outreach.called("medication_result") == [(False, "1")]


async def test_medication_flow_wrong_birth_year_never_reads_the_medication(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["medication"], ["1957", "1", "1"], outreach=outreach)
    assert call.result.last_step == "not_verified"
    assert MEDICATION not in call.channel.sounds
    assert outreach.called("medication_sound") == []
    assert outreach.called("medication_result") == []


# identity (the first key skips the intro), 1 book, day, slot, confirm
BOOK: list[str | None] = ["1956", "1"]


async def test_vaccination_full_then_booked(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach(full={(3, "morning")})
    keys = [*BOOK, "3", "1", "1", "1", "4", "2", "1"]  # day 3 morning: full; 1 choose again; day 4 afternoon
    call = await _call(shipped["vaccination"], keys, outreach=outreach)
    assert call.result.outcome == "completed"
    assert outreach.called("book_vaccination") == [(3, "morning"), (4, "afternoon")]
    assert outreach.booked == [(4, "afternoon")]
    flow = shipped["vaccination"]
    full_at = call.channel.sounds.index(_said(flow, "slot_full"))
    booked_at = call.channel.sounds.index("outreach/booked-day4-afternoon")
    assert full_at < booked_at < call.channel.sounds.index(_said(flow, "booked"))
    assert [s.edge for s in call.steps if s.node == "book"] == ["full", "booked"]


async def test_vaccination_full_three_times_stops_offering(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach(booking_outcome="full")
    keys = [*BOOK, "3", "1", "1", "1", "4", "1", "1", "1", "5", "2", "1"]
    call = await _call(shipped["vaccination"], keys, outreach=outreach)
    assert len(outreach.called("book_vaccination")) == 3
    assert call.result.last_step == "done"
    assert call.path[-2:] == ["vaccination:no_free_slot", "vaccination:done"]
    assert call.channel.keys == []


async def test_vaccination_full_then_giving_up(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach(full={(3, "morning")})
    call = await _call(shipped["vaccination"], [*BOOK, "3", "1", "1", "2"], outreach=outreach)
    assert call.path[-3:] == ["vaccination:choose_again", "vaccination:not_booked", "vaccination:done"]
    assert outreach.booked == []


@pytest.mark.parametrize(("booked", "end", "left"), [([(2, "morning")], "cancelled", []), ([], "no_booking", [])])
async def test_vaccination_cancel(
    shipped: dict[str, Flow], booked: list[tuple[int, str]], end: str, left: list[tuple[int, str]]
) -> None:
    outreach = MemoryOutreach(booked=list(booked))
    call = await _call(shipped["vaccination"], ["1956", "2"], outreach=outreach)
    assert call.path[-2:] == [f"vaccination:{end}", "vaccination:done"]
    assert outreach.booked == left
    assert outreach.called("cancel_vaccination") == [None]


async def test_vaccination_adverse_reaction_report(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    call = await _call(shipped["vaccination"], ["1956", "3"], outreach=outreach)
    assert call.path[-2:] == ["vaccination:reaction_reported", "vaccination:done"]
    assert outreach.called("report_adverse_reaction") == [None]
    assert _said(shipped["vaccination"], "reaction_reported") in call.channel.sounds


async def test_vaccination_wrong_birth_year_does_nothing_to_the_record(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach(booked=[(2, "morning")])
    call = await _call(shipped["vaccination"], ["1957", "2"], outreach=outreach)
    assert call.path[-2:] == ["vaccination:not_verified", "vaccination:done"]
    assert [name for name, _ in outreach.calls] == ["verify_identity"]
    assert outreach.booked == [(2, "morning")]


async def test_vaccination_through_the_hotline_returns_to_its_goodbye(shipped: dict[str, Flow]) -> None:
    outreach = MemoryOutreach()
    keys: list[str | None] = ["3", "1", *BOOK, "6", "2", "1"]  # hotline: 3 vaccination, 1 booking
    call = await _call(shipped["hotline"], keys, subflows=(shipped["vaccination"],), outreach=outreach)
    assert call.result.outcome == "completed"
    assert call.result.last_step == "goodbye"
    assert outreach.booked == [(6, "afternoon")]
    assert "vaccination:book" in call.path


async def test_complaint_survey_takes_a_score_from_1_to_5(shipped: dict[str, Flow]) -> None:
    flow = shipped["complaint_survey"]
    outreach = MemoryOutreach()
    call = await _call(flow, ["1956", "4"], outreach=outreach)
    assert call.result.last_step == "thanks"
    assert call.path[-3:] == ["complaint_survey:score", "complaint_survey:record", "complaint_survey:thanks"]
    assert outreach.called("record_survey") == [4]
    # 0, 9 and 6 are not scores: asked again (twice), then thanked without a score, and nothing is written back.
    outreach = MemoryOutreach()
    refused = await _call(flow, ["1956", "0", "9", "6"], outreach=outreach)
    assert refused.result.last_step == "no_score"
    assert _said(flow, "thanks") not in refused.channel.sounds
    assert outreach.called("record_survey") == []
    outreach = MemoryOutreach()
    stranger = await _call(flow, ["1957", "5"], outreach=outreach)
    assert stranger.result.last_step == "not_verified"
    assert _said(flow, "score") not in stranger.channel.sounds
    assert outreach.called("record_survey") == []
    # A hang-up before the score: nothing written, the task stays unanswered (the dialer retries as before).
    outreach = MemoryOutreach()
    gone = await _call(flow, ["1956", None], outreach=outreach)
    assert gone.result.outcome == "caller_hangup"
    assert outreach.called("record_survey") == []
