"""A patient dials the hotline: answered, greeted, hung up, recorded — over ARI and over FastAGI."""

from __future__ import annotations

import pytest

from tests.integration.conftest import CALLER, Hotline

pytestmark = pytest.mark.integration

GREETING_PATH = ["greeting", "scope_notice", "goodbye"]


@pytest.mark.parametrize(("dialled", "transport"), [("12320", "ari"), ("agi-12320", "fastagi"), ("ari-12320", "ari")])
def test_hotline_answers_plays_greeting_and_records_the_call(hotline: Hotline, dialled: str, transport: str) -> None:
    before = hotline.call_ids()

    phone = hotline.call(dialled)

    assert phone.succeeded, phone.errors
    record = hotline.finished_record(before)
    assert record.transport == transport
    assert record.flow == "hotline"
    assert record.flow_version
    assert record.outcome == "completed"
    assert record.last_step == "goodbye"
    assert record.answered_at is not None
    assert record.ended_at is not None
    assert record.started_at <= record.answered_at <= record.ended_at
    assert record.channel_name.startswith("PJSIP/patients-")
    # The phone was held for the length of all three prompts: Asterisk really played them before hanging up.
    heard = phone.stamps["HUNGUP_BY_SERVICE"] - phone.stamps["ANSWERED"]
    expected = hotline.prompt_seconds(hotline.flow_texts("hotline", GREETING_PATH))
    assert heard >= 0.9 * expected, f"the phone heard {heard:.1f}s of {expected:.1f}s of prompts"


@pytest.mark.parametrize("dialled", ["12320", "agi-12320"])
def test_caller_hanging_up_during_greeting_leaves_a_complete_record(hotline: Hotline, dialled: str) -> None:
    before = hotline.call_ids()

    phone = hotline.call(dialled, scenario="patient_hangs_up", pause_ms=2000)

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
    hotline.call("12320", scenario="patient_hangs_up", pause_ms=500)

    written = [hotline.log_path, hotline.config.service.state_dir / "service.jsonl"]
    written += list(hotline.config.service.state_dir.glob("medhotline.db*"))
    assert all(path.exists() for path in written[:2])
    for path in written:
        assert CALLER.encode() not in path.read_bytes(), f"caller number in clear in {path}"
