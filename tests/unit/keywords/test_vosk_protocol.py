"""The framing of Vosk's WebSocket protocol, both sides, on messages as vosk-server and its clients write them."""

from __future__ import annotations

import json

import pytest

from keywords.vosk_protocol import (
    CLOSE_INVALID_DATA,
    CLOSE_UNSUPPORTED,
    EOF_MESSAGE,
    AudioMessage,
    ConfigMessage,
    EofMessage,
    ProtocolError,
    ServerReply,
    config_message,
    parse_client_message,
    parse_server_reply,
)


def test_the_end_message_is_the_exact_text_vosk_server_compares() -> None:
    # asr_server.py: `if message == '{"eof" : 1}'` (a string comparison, not JSON).
    assert EOF_MESSAGE == '{"eof" : 1}'
    assert parse_client_message(EOF_MESSAGE) == EofMessage()
    assert parse_client_message('{"eof": 1}') == EofMessage()


def test_config_message_round_trips_and_is_what_vosk_server_reads() -> None:
    text = config_message(8000)
    assert json.loads(text) == {"config": {"sample_rate": 8000}}
    assert parse_client_message(text) == ConfigMessage(8000)
    # vosk-server's own test client: '{ "config" : { "sample_rate" : 16000 } }'; some clients send floats.
    assert parse_client_message('{ "config" : { "sample_rate" : 16000 } }') == ConfigMessage(16000)
    assert parse_client_message('{"config": {"sample_rate": 8000.0}}') == ConfigMessage(8000)
    assert parse_client_message('{"config": {"words": 1}}') == ConfigMessage(None)


@pytest.mark.parametrize(
    ("message", "reason", "code"),
    [
        (b"\x00\x01\x02", "not whole 16-bit samples", CLOSE_INVALID_DATA),
        ("hello", "not JSON", CLOSE_INVALID_DATA),
        ("[1, 2]", "not a JSON object", CLOSE_UNSUPPORTED),
        ('{"text": "x"}', "neither a config nor the end", CLOSE_UNSUPPORTED),
        ('{"config": 8000}', "config is not a JSON object", CLOSE_INVALID_DATA),
        ('{"config": {"sample_rate": 4000}}', "outside 8000..48000", CLOSE_INVALID_DATA),
        ('{"config": {"sample_rate": 8000.5}}', "not a whole number", CLOSE_INVALID_DATA),
        ('{"config": {"sample_rate": "8000"}}', "not a whole number", CLOSE_INVALID_DATA),
        ('{"config": {"sample_rate": true}}', "not a whole number", CLOSE_INVALID_DATA),
    ],
)
def test_bad_client_messages_name_why_and_the_close_code(message: str | bytes, reason: str, code: int) -> None:
    with pytest.raises(ProtocolError, match=reason) as caught:
        parse_client_message(message)
    assert caught.value.close_code == code


def test_audio_is_passed_through() -> None:
    assert parse_client_message(b"\x01\x00" * 160) == AudioMessage(b"\x01\x00" * 160)
    assert parse_client_message(b"") == AudioMessage(b"")


def test_config_of_an_impossible_rate_is_refused_before_sending() -> None:
    with pytest.raises(ProtocolError, match="outside"):
        config_message(100)


def test_server_replies_as_vosk_writes_them() -> None:
    # KaldiRecognizer.PartialResult(), Result() with words, FinalResult(): pretty-printed JSON, spaces between
    # Chinese characters.
    assert parse_server_reply('{\n  "partial" : "胸口 疼"\n}') == ServerReply(partial="胸口疼")
    words = {"result": [{"conf": 1.0, "end": 0.9, "start": 0.3, "word": "胸口"}], "text": "胸口 疼 得 厉害"}
    reply = parse_server_reply(json.dumps(words, ensure_ascii=False))
    assert reply == ServerReply(text="胸口疼得厉害")
    assert reply.final
    assert parse_server_reply('{"text" : ""}') == ServerReply(text="")
    assert not parse_server_reply('{"partial" : ""}').final
    alternatives = {"alternatives": [{"confidence": 9.1, "text": "안녕 하세요"}, {"confidence": 2.0, "text": "x"}]}
    assert parse_server_reply(json.dumps(alternatives)) == ServerReply(text="안녕 하세요")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\x00\x00", "binary message of 2 bytes"),
        ("not json", "not JSON"),
        ('"text"', "not a JSON object"),
        ('{"result": []}', "neither a partial nor a text"),
    ],
)
def test_bad_server_replies_name_why(message: str | bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_server_reply(message)
