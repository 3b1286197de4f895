"""A patient dials the hotline: answered, greeted, routed by keys, recorded — over ARI and over FastAGI.

Keys are real RFC 4733 telephone events sent by SIPp; what is asserted is what the patient's phone observed
and what the service wrote to the database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ivr.conditions import is_open
from ivr.flow_loader import load_flow
from medhotline.phones import Press
from tests.integration.conftest import CALLER, Hotline

pytestmark = pytest.mark.integration

TRANSPORTS = [("12320", "ari"), ("agi-12320", "fastagi")]
NOTICES = ["greeting", "scope_notice"]


@pytest.mark.parametrize(("dialled", "transport"), [*TRANSPORTS, ("ari-12320", "ari")])
def test_patient_hears_the_notices_then_chooses_from_the_menu(hotline: Hotline, dialled: str, transport: str) -> None:
    notices_ms = hotline.ms_of("hotline", NOTICES)
    before = hotline.call_ids()

    # Press 5 (other health questions) once both notices have been played in full.
    phone = hotline.call(dialled, presses=[Press(notices_ms + 1500, "5")])

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert (record.transport, record.flow, record.outcome) == (transport, "hotline", "routed")
    assert (record.route_category, record.route_priority, record.last_step) == ("general", "normal", "general")
    assert record.answered_at is not None
    assert record.ended_at is not None
    assert record.started_at <= record.answered_at <= record.ended_at
    assert record.channel_name.startswith("PJSIP/patients-")
    general = hotline.sound_of("hotline", "general")
    assert hotline.path(record) == [
        ("greeting", "next", None),  # played to the end, not skipped
        ("scope_notice", "next", None),
        ("ask", "fallback", "speech unavailable"),
        ("main_menu", "press 5", "5"),
        ("general", "general", "normal"),
        # No agent is configured on this hotline: nobody could ever take the call, so the caller is told at once
        # where to turn instead of waiting for ever (the routing tests have agents).
        ("queued", "general", "normal"),
        # On ARI the queue plays the route prompt (docs/routing.md); over FastAGI the IVR said it before routing.
        *([("route_prompt", "playing", general), ("route_prompt", "played", general)] if transport == "ari" else []),
        ("unavailable", "no_qualified_agent", None),
    ]
    # The phone was held for both notices and the route announcement: Asterisk really played them.
    heard = phone.stamps["HUNGUP_BY_SERVICE"] - phone.stamps["ANSWERED"]
    assert heard >= 0.9 * (notices_ms / 1000 + hotline.prompt_seconds(hotline.flow_texts("hotline", ["general"])))


def _menu_cases() -> list[tuple[list[str], str, str]]:
    """(keys, route node, category) for every branch of the main menu, as the shipped flow defines them."""
    return [
        (["0"], "emergency", "emergency"),
        (["2"], "medication", "medication"),
        (["3", "3"], "adverse_reaction", "adverse_reaction"),
        (["3", "2", "0"], "vaccination_staff", "vaccination"),  # vaccine FAQ, then a person
        (["4"], "chronic", "general"),
        (["5"], "general", "general"),
    ]


@pytest.mark.parametrize(("dialled", "transport"), TRANSPORTS)
@pytest.mark.parametrize(("keys", "node", "category"), _menu_cases())
def test_each_menu_branch_reaches_its_route(
    hotline: Hotline, dialled: str, transport: str, keys: list[str], node: str, category: str
) -> None:
    before = hotline.call_ids()

    # The first key interrupts the greeting (type-ahead); each further key answers the next menu.
    phone = hotline.call(dialled, presses=[Press(1500, keys[0]), *(Press(2500, k) for k in keys[1:])])

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert (record.transport, record.outcome, record.last_step) == (transport, "routed", node)
    assert record.route_category == category
    assert record.route_priority == ("emergency" if category == "emergency" else "normal")
    menus = [(n, e) for n, e, _ in hotline.path(record) if n in ("main_menu", "vaccination_menu")]
    assert menus[0] == ("main_menu", f"press {keys[0]}")


@pytest.mark.parametrize(("dialled", "transport"), TRANSPORTS)
def test_appointments_follow_the_opening_hours(hotline: Hotline, dialled: str, transport: str) -> None:
    flow = load_flow(hotline.config.hotline.flows_dir / "hotline.yaml").flow
    before = hotline.call_ids()
    open_now = is_open(flow.hours["outpatient"], datetime.now(UTC))

    # Closed: the opening hours are announced in full (no barge-in, keys during it are discarded), so the
    # second key comes after that announcement.
    second_after = 2500 if open_now else hotline.ms_of("hotline", ["appointments_closed"]) + 1500
    phone = hotline.call(dialled, presses=[Press(1500, "1"), Press(second_after, "2")])

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    # Open: 1 then 2 is prescription status. Closed: the caller hears the hours and is back at the menu,
    # where 2 is medication guidance.
    assert record.last_step == ("prescription_route" if open_now else "medication")
    assert ("appointments", "case 1" if open_now else "default", None) in hotline.path(record)


@pytest.mark.parametrize(("dialled", "transport"), TRANSPORTS)
def test_invalid_keys_and_silence_retry_then_fall_back_to_a_person(
    hotline: Hotline, dialled: str, transport: str
) -> None:
    before = hotline.call_ids()

    phone = hotline.call(dialled, presses=[Press(1500, "7"), Press(2500, "8")])

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert (record.outcome, record.last_step, record.route_category) == ("routed", "general", "general")
    assert ("main_menu", "fallback", "no_input") in hotline.path(record)


@pytest.mark.parametrize(("dialled", "transport"), TRANSPORTS)
def test_caller_hanging_up_mid_menu_leaves_a_complete_record(hotline: Hotline, dialled: str, transport: str) -> None:
    before = hotline.call_ids()

    # 3 opens the vaccination menu; the caller hangs up while it is being read.
    phone = hotline.call(dialled, presses=[Press(1500, "3")], hang_up_after_ms=1500)

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert (record.outcome, record.last_step) == ("caller_hangup", "vaccination_menu")
    assert record.ended_at is not None
    assert [n for n, _, _ in hotline.path(record)] == ["greeting", "scope_notice", "ask", "main_menu"]


@pytest.mark.parametrize("dialled", ["12320", "agi-12320"])
def test_caller_hanging_up_during_greeting_leaves_a_complete_record(hotline: Hotline, dialled: str) -> None:
    before = hotline.call_ids()

    phone = hotline.call(dialled, hang_up_after_ms=2000)

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert record.outcome == "caller_hangup"
    assert record.last_step == "greeting"
    assert record.ended_at is not None


def test_unknown_number_is_rejected_without_reaching_the_service(hotline: Hotline) -> None:
    before = hotline.call_ids()

    phone = hotline.call("99999")

    assert not phone.succeeded
    assert hotline.call_ids() == before


def test_caller_number_never_reaches_the_service_log_or_database(hotline: Hotline) -> None:
    hotline.call("12320", hang_up_after_ms=500)

    written = [hotline.log_path, hotline.config.service.state_dir / "service.jsonl"]
    written += list(hotline.config.service.state_dir.glob("medhotline.db*"))
    assert all(path.exists() for path in written[:2])
    for path in written:
        assert CALLER.encode() not in path.read_bytes(), f"caller number in clear in {path}"
