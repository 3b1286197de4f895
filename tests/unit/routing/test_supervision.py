"""The supervision core: which channel is tapped in which directions, and the refusals, from bridge contents."""

from __future__ import annotations

import pytest

from routing.supervision import SupervisionError, is_supervision_channel, tap, waiting_caller

TALK = ["1700000000.12", "agent-6f1c"]


@pytest.mark.parametrize(
    ("mode", "spy", "whisper"), [("listen", "both", "none"), ("whisper", "both", "out"), ("barge", "both", "both")]
)
def test_every_mode_snoops_on_the_agents_leg_never_the_patients(mode: str, spy: str, whisper: str) -> None:
    planned = tap(mode, "call-1", TALK, "abc")
    assert planned.agent_channel == "agent-6f1c"
    assert planned.patient_channel == "1700000000.12"
    assert (planned.spy, planned.whisper) == (spy, whisper)
    assert len({planned.snoop_channel, planned.supervisor_channel, planned.bridge}) == 3


def test_the_whisper_goes_out_to_the_agents_phone_only() -> None:
    # "out" on the agent's leg is what Asterisk sends to the agent's phone; "in" (what the conversation gets
    # from the agent) would reach the patient.
    assert tap("whisper", "c", TALK, "t").whisper == "out"


@pytest.mark.parametrize(
    ("conversation", "why"),
    [
        (None, "no conversation bridge"),
        (["1700000000.12"], "0 agent leg"),
        (["agent-a", "agent-b"], "2 agent leg"),
        (["agent-a", "x", "y"], "2 other channel"),
    ],
)
def test_a_call_not_talking_to_an_agent_is_refused_saying_why(conversation: list[str] | None, why: str) -> None:
    with pytest.raises(SupervisionError, match=why) as caught:
        tap("listen", "call-9", conversation, "t")
    assert caught.value.problem == "not_talking"
    assert "call-9" in str(caught.value)


def test_an_unknown_mode_names_the_known_ones() -> None:
    with pytest.raises(SupervisionError, match="listen, whisper, barge") as caught:
        tap("spy", "c", TALK, "t")
    assert caught.value.problem == "bad_request"


def test_the_waiting_caller_is_the_one_channel_in_the_holding_bridge() -> None:
    assert waiting_caller("c", ["1700000000.12"]) == "1700000000.12"
    nobody: tuple[list[str] | None, ...] = (None, [])
    for holding in nobody:
        with pytest.raises(SupervisionError, match="not waiting") as caught:
            waiting_caller("c", holding)
        assert caught.value.problem == "not_waiting"


def test_the_supervisors_leg_and_snoop_are_told_apart_from_calls() -> None:
    planned = tap("listen", "c", TALK, "t")
    assert is_supervision_channel(planned.supervisor_channel)
    assert is_supervision_channel(planned.snoop_channel)
    for other in ("agent-6f1c", "1700000000.12", None):
        assert not is_supervision_channel(other)
