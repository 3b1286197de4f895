"""Redaction of patient identifiers, and the JSON-lines logging set up around it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import stat
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from ground import logs
from ground.logs import PHONE, REDACTED, bind_call, configure_logging, get_logger, redact


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Logging is process-global: leave it as we found it for the next test."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)
    for name in ("panoramisk", "websockets", "httpcore", "httpx", "asyncio"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _redact(**event: Any) -> dict[str, Any]:
    return dict(redact(None, "info", event))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("13800138000", PHONE),
        ("+8613800138000", PHONE),
        ("+86 138-0013-8000", PHONE),
        ("138 0013 8000", PHONE),
        ("010-12345678", PHONE),
        ("12345678", PHONE),
        ("1234567", PHONE),
        ("call from 13912345678 to 12320", f"call from {PHONE} to 12320"),
        ("PJSIP/13800138000-00000001", f"PJSIP/{PHONE}"),
        ("tel:+8613800138000;x", f"tel:{PHONE};x"),
        ("trunk13800138000", f"trunk{PHONE}"),
        ("PJSIP/trunk13800138000-00000001", f"PJSIP/trunk{PHONE}"),
        ("SIP/1380013-00000001", f"SIP/{PHONE}"),
        ("number-12345678", f"number-{PHONE}"),
        ("电话１３８００１３８０００", f"电话{PHONE}"),
        ("{'agi_callerid': '13912345678'}", f"{{'agi_callerid': '{PHONE}'}}"),
        # A number glued to a UUID by a hyphen is not part of the UUID: masked (with the UUID's tail).
        ("8b0e4a11-0000-4000-8000-000000000000-13800138000", f"8b0e4a{PHONE}"),
    ],
)
def test_phone_numbers_are_masked(text: str, expected: str) -> None:
    assert _redact(event=text)["event"] == expected


@pytest.mark.parametrize(
    "text",
    [
        "550e8400-e29b-41d4-a716-446655440000",
        "call 550e8400-e29b-41d4-a716-446655440000 started",
        "12345678-1234-1234-1234-123456789012",
        "1732623456.12",
        "channel 1732623456.12 hung up",
        "2024-11-26T12:22:03.123456Z",
        "2024-11-26T12:22:03+08:00",
        "2024-11-26 12:22:03,123",
        "2024-11-26",
        "listening on 127.0.0.1:5060",
        "port 4573",
        "took 12.5 s",
        "extension 12320",
        "PJSIP/agent-00000001",
        "Local/hotline@medhotline-0000002a;1",
        "PJSIP/trunk-00000017",
        "agent-20a192f6-1234-4d6e-8072-0a2470bc1234",  # the queue's agent legs and bridges
        "hold-12345678-1234-1234-1234-123456789012",
        "medhotline-6e086d03-ade9-498d-b73f-79f5f8555010-conversation-1",  # a recording's file name
    ],
)
def test_non_phone_tokens_are_kept(text: str) -> None:
    assert _redact(event=text)["event"] == text


@pytest.mark.parametrize(
    "key",
    [
        "caller",
        "callerid",
        "caller_id",
        "caller_number",
        "CallerIDNum",
        "CallerIDName",
        "ConnectedLineNum",
        "phone",
        "phone_number",
        "name",
        "patient_name",
        "patient",
        "mrn",
        "record_number",
        "id_number",
        "national_id",
        "birth_date",
        "agi_callerid",
        "agi_calleridname",
        "mobile_phone",
        "contact_name",
        "family-name",
    ],
)
def test_identifying_keys_are_masked(key: str) -> None:
    assert _redact(event="x", **{key: "Zhang San"})[key] == REDACTED


@pytest.mark.parametrize("key", ["logger", "flow", "node_name", "channel_name", "step_name", "queue_name"])
def test_our_own_names_are_kept(key: str) -> None:
    assert _redact(event="x", **{key: "hotline"})[key] == "hotline"


def test_absent_identifier_stays_none() -> None:
    assert _redact(event="x", caller=None)["caller"] is None


def test_nested_structures_are_redacted() -> None:
    event = _redact(
        event="headers",
        headers={
            "agi_callerid": "13912345678",
            "agi_channel": "PJSIP/13912345678-0001",
            "agi_uniqueid": "1732623456.1",
        },
        legs=[{"name": "Li Si"}, ("138-0013-8000", 5060)],
        number=13912345678,
        count=3,
        ok=True,
        ratio=0.5,
    )
    assert event["headers"] == {
        "agi_callerid": REDACTED,
        "agi_channel": f"PJSIP/{PHONE}",
        "agi_uniqueid": "1732623456.1",
    }
    assert event["legs"] == [{"name": REDACTED}, (PHONE, 5060)]
    assert event["number"] == PHONE
    assert (event["count"], event["ok"], event["ratio"]) == (3, True, 0.5)


def test_other_objects_are_rendered_and_scanned() -> None:
    class Patient:
        def __repr__(self) -> str:
            return "Patient(13912345678)"

        __str__ = __repr__

    assert _redact(event="x", who=Patient())["who"] == f"Patient({PHONE})"


def test_rendered_exception_is_redacted() -> None:
    try:
        raise ValueError("caller 13912345678 not found")
    except ValueError:
        event = structlog.processors.format_exc_info(None, "error", {"event": "failed", "exc_info": True})
    assert "13912345678" in event["exception"]
    redacted = dict(redact(None, "error", event))
    assert "13912345678" not in redacted["exception"]
    assert f"caller {PHONE} not found" in redacted["exception"]
    assert "Traceback" in redacted["exception"]


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_end_to_end_structlog_and_stdlib(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "medhotline.jsonl"
    stream = io.StringIO()
    configure_logging("debug", log_file=log_file, stream=stream)
    log = get_logger("medhotline.ivr")
    with bind_call("550e8400-e29b-41d4-a716-446655440000"):
        log.info("call started", caller="13912345678", channel="PJSIP/13912345678-00000001")
        logging.getLogger("panoramisk.fast_agi").info(
            "Incoming request: %r", {"agi_callerid": "13912345678", "agi_uniqueid": "1732623456.12"}
        )
        # panoramisk at DEBUG is filtered even with the service at debug: it dumps the AGI headers.
        logging.getLogger("panoramisk.fast_agi").debug("headers %r", {"agi_calleridname": "Zhang San"})
        try:
            raise RuntimeError("dial 13912345678 failed")
        except RuntimeError:
            log.exception("dial failed")
            logging.getLogger("httpx").exception("ARI request for 13912345678 failed")
    log.info("after the call")

    raw = log_file.read_text(encoding="utf-8")
    assert "13912345678" not in raw
    assert "Zhang San" not in raw
    assert raw == stream.getvalue()
    lines = _lines(raw)
    assert [line["event"] for line in lines] == [
        "call started",
        "Incoming request: {'agi_callerid': '[phone]', 'agi_uniqueid': '1732623456.12'}",
        "dial failed",
        "ARI request for [phone] failed",
        "after the call",
    ]
    for line in lines[:4]:
        assert line["call_id"] == "550e8400-e29b-41d4-a716-446655440000"
        assert line["timestamp"].endswith("Z")
    assert "call_id" not in lines[4]
    assert lines[0]["caller"] == REDACTED
    assert lines[0]["channel"] == f"PJSIP/{PHONE}"
    assert (lines[0]["logger"], lines[0]["level"]) == ("medhotline.ivr", "info")
    assert (lines[1]["logger"], lines[1]["level"]) == ("panoramisk.fast_agi", "info")
    assert "RuntimeError: dial [phone] failed" in lines[2]["exception"]
    assert "RuntimeError: dial [phone] failed" in lines[3]["exception"]
    assert stat.S_IMODE(os.stat(log_file).st_mode) == 0o600


def test_configure_logging_is_idempotent(tmp_path: Path) -> None:
    stream = io.StringIO()
    log_file = tmp_path / "medhotline.jsonl"
    configure_logging("info", log_file=log_file, stream=stream)
    configure_logging("info", log_file=log_file, stream=stream)
    get_logger("medhotline.test").info("once")
    logging.getLogger("panoramisk.manager").info("once too")
    assert len(_lines(stream.getvalue())) == 2
    assert len(_lines(log_file.read_text(encoding="utf-8"))) == 2


def test_level_filters_structlog_and_stdlib() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream=stream)
    get_logger("medhotline.test").info("hidden")
    logging.getLogger("alembic").info("hidden")
    get_logger("medhotline.test").warning("shown")
    assert [line["event"] for line in _lines(stream.getvalue())] == ["shown"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", stream=io.StringIO())


async def test_call_id_is_bound_per_task() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    log = get_logger("medhotline.test")

    async def call(call_id: str) -> None:
        with bind_call(call_id):
            await asyncio.sleep(0)
            log.info("step", step=call_id)

    await asyncio.gather(call("a"), call("b"))
    assert sorted((line["call_id"], line["step"]) for line in _lines(stream.getvalue())) == [
        ("a", "a"),
        ("b", "b"),
    ]


def test_the_shortcut_for_values_without_a_phone_like_run_masks_exactly_what_the_full_scan_masks() -> None:
    # Random text made of what the patterns care about: digits (also full-width), hex letters, separators, "+",
    # the pieces of UUIDs, unique ids and dates, and channel names.
    rng = random.Random(20261206)
    alphabet = [*"0123456789０１２abcdefABCDEF -+.:/TZx", "PJSIP/agent-", "2024-11-26", "1732623456.12"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        assert logs._mask_phones(text) == logs._mask_between_kept(text), text


def test_a_line_is_redacted_and_rendered_once_for_the_stream_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []

    def counting(logger: Any, method_name: str, event_dict: Any) -> Any:
        runs.append(str(event_dict.get("event")))
        return redact(logger, method_name, event_dict)

    monkeypatch.setattr(logs, "redact", counting)
    stream = io.StringIO()
    configure_logging("info", tmp_path / "service.jsonl", stream=stream)
    try:
        get_logger("routing.engine").info("routing.offer", agent="gen1", caller="13800138000")
        assert runs == ["routing.offer"]
        line = stream.getvalue()
        assert line == (tmp_path / "service.jsonl").read_text(encoding="utf-8")
        assert "13800138000" not in line
    finally:
        configure_logging("info")


def _written(stream: io.StringIO) -> list[dict[str, Any]]:
    return _lines(stream.getvalue())


def test_held_lines_wait_for_the_release_keep_their_order_time_and_context(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", tmp_path / "service.jsonl", stream=stream)
    log = get_logger("routing.engine")
    try:
        log.info("before")
        hold = logs.hold_lines()
        with bind_call("6a100430-6518-4158-80b8-e8dd4160770a"):
            log.info("call.start", caller="13800138000")
        log.info("routing.offer")
        assert [line["event"] for line in _written(stream)] == ["before"]
        hold.release()
        hold.release()  # a second release changes nothing
        lines = _written(stream)
        assert [line["event"] for line in lines] == ["before", "call.start", "routing.offer"]
        # The context and the time are those of the moment of logging, not of the writing.
        assert lines[1]["call_id"] == "6a100430-6518-4158-80b8-e8dd4160770a"
        assert "call_id" not in lines[2]
        assert lines[1]["caller"] == REDACTED
        assert lines[1]["timestamp"] <= lines[2]["timestamp"]
        assert stream.getvalue() == (tmp_path / "service.jsonl").read_text(encoding="utf-8")
    finally:
        configure_logging("info")


def test_warnings_and_other_libraries_lines_are_never_held_and_write_the_held_ones_first() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    hold = logs.hold_lines()
    try:
        get_logger("routing.engine").info("routing.queued")
        assert _written(stream) == []
        logging.getLogger("httpx").warning("a library's line")
        assert [line["event"] for line in _written(stream)] == ["routing.queued", "a library's line"]
        get_logger("routing.engine").info("routing.offer")
        get_logger("routing.engine").warning("routing.reservation_refused")
        assert [line["event"] for line in _written(stream)][2:] == ["routing.offer", "routing.reservation_refused"]
    finally:
        hold.release()
        configure_logging("info")


def test_a_hold_never_released_keeps_lines_at_most_the_hold_time(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    log = get_logger("routing.engine")
    hold = logs.hold_lines()
    try:
        log.info("first")
        now[0] += logs.HOLD_SECONDS / 2
        log.info("second")
        assert _written(stream) == []
        now[0] += logs.HOLD_SECONDS * 1.5
        log.info("third")  # the first kept line is too old: everything goes out, this one with it
        assert [line["event"] for line in _written(stream)] == ["first", "second", "third"]
        log.info("fourth")  # still held: a new window starts
        assert len(_written(stream)) == 3
        now[0] += logs.HOLD_SECONDS * 1.5
        logs._GATE.flush_if_due()  # what the event loop's timer does when nothing else is logged
        assert [line["event"] for line in _written(stream)][-1] == "fourth"
    finally:
        hold.release()
        configure_logging("info")


async def test_on_an_event_loop_held_lines_go_out_by_themselves_when_the_hold_time_is_up() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    hold = logs.hold_lines()
    try:
        get_logger("routing.engine").info("held")
        assert _written(stream) == []
        await asyncio.sleep(logs.HOLD_SECONDS * 3)
        assert [line["event"] for line in _written(stream)] == ["held"]
    finally:
        hold.release()
        configure_logging("info")


def test_a_held_line_is_written_with_its_own_context_and_time_wherever_it_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept as it was called (before structlog): the release happens in another call's context, later; the line
    still carries only what was bound when it was logged, and the time it was logged."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    log = get_logger("routing.engine")
    hold = logs.hold_lines()
    try:
        with bind_call("6a100430-6518-4158-80b8-e8dd4160770a"):
            log.info("routing.offer", agent="gen1")
        logged_at = time.time()
        monkeypatch.setattr(time, "time", lambda: logged_at + 60)  # written a minute "later"
        with bind_call("11111111-2222-4333-8444-555555555555"), structlog.contextvars.bound_contextvars(agent_leg="x"):
            hold.release()
    finally:
        hold.release()
        configure_logging("info")
    [line] = _written(stream)
    assert line["call_id"] == "6a100430-6518-4158-80b8-e8dd4160770a"
    assert "agent_leg" not in line
    assert line["agent"] == "gen1"
    assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp() <= logged_at
