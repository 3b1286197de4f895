"""Vosk's WebSocket speech-server protocol, sans-I/O: the messages both sides send, parsed and checked.

The protocol is the one of ``vosk-server`` (``websocket/asr_server.py``), so a farm of those servers and our own
``medhotline speech serve`` are interchangeable:

1. the client sends a text message ``{"config": {"sample_rate": 8000}}`` (not answered);
2. then binary messages of 16-bit little-endian mono PCM, each answered by one text message: ``{"partial": …}``
   while the utterance goes on, or ``{"text": …}`` (with ``result``, the words, when the server shows them) when
   the recogniser detected the end of an utterance;
3. at the end the text message ``{"eof" : 1}``, answered by the final result ``{"text": …}``; the server then
   closes the connection.

vosk-server compares the end message with the exact text ``{"eof" : 1}`` (space before the colon), so that is the
text sent; this module accepts any JSON spelling of it on the server side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from ground.errors import MedhotlineError
from keywords.speech import join_cjk

EOF_MESSAGE: Final = '{"eof" : 1}'
MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000

# WebSocket close codes (RFC 6455 §7.4.1) a server uses to refuse a message.
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_INVALID_DATA: Final = 1007
CLOSE_POLICY: Final = 1008


class ProtocolError(MedhotlineError):
    """A message that breaks the protocol; ``close_code`` is the WebSocket close code that says so."""

    def __init__(self, message: str, close_code: int = CLOSE_INVALID_DATA) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True)
class ConfigMessage:
    """The stream's settings; ``sample_rate`` None when the client left it to the server's default."""

    sample_rate: int | None


@dataclass(frozen=True)
class AudioMessage:
    pcm16: bytes


@dataclass(frozen=True)
class EofMessage:
    pass


ClientMessage = ConfigMessage | AudioMessage | EofMessage


@dataclass(frozen=True)
class ServerReply:
    """One answer of the server: a partial text while the caller speaks, or the final text of an utterance.
    Texts are as the recogniser wrote them, with the spaces between Chinese characters removed."""

    partial: str | None = None
    text: str | None = None

    @property
    def final(self) -> bool:
        return self.text is not None


def config_message(sample_rate: int) -> str:
    check_sample_rate(sample_rate)
    return json.dumps({"config": {"sample_rate": sample_rate}})


def check_sample_rate(sample_rate: int) -> int:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}")
    return sample_rate


def parse_client_message(message: str | bytes) -> ClientMessage:
    """What a client sent (server side). Audio must be whole 16-bit samples; text must be a config or the end."""
    if isinstance(message, bytes):
        if len(message) % 2:
            raise ProtocolError(f"audio message of {len(message)} bytes is not whole 16-bit samples")
        return AudioMessage(message)
    try:
        value = json.loads(message)
    except ValueError:
        raise ProtocolError("text message is not JSON (audio goes in binary messages)") from None
    if not isinstance(value, dict):
        raise ProtocolError("text message is not a JSON object", CLOSE_UNSUPPORTED)
    if "eof" in value:
        return EofMessage()
    if "config" not in value:
        raise ProtocolError(
            f"text message with keys {sorted(value)[:5]} is neither a config nor the end", CLOSE_UNSUPPORTED
        )
    config = value["config"]
    if not isinstance(config, dict):
        raise ProtocolError("config is not a JSON object")
    rate = config.get("sample_rate")
    if rate is None:
        return ConfigMessage(None)
    # vosk-server takes floats ("8000.0" from some clients); a recogniser runs at whole hertz.
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate != int(rate):
        raise ProtocolError(f"config sample_rate {rate!r} is not a whole number of hertz")
    return ConfigMessage(check_sample_rate(int(rate)))


def parse_server_reply(message: str | bytes) -> ServerReply:
    """What a server answered (client side): a JSON object with ``partial`` or ``text``."""
    if isinstance(message, bytes):
        raise ProtocolError(f"binary message of {len(message)} bytes where a JSON result was expected")
    try:
        value = json.loads(message)
    except ValueError:
        raise ProtocolError("reply is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("reply is not a JSON object")
    text = value.get("text")
    if isinstance(text, str):
        return ServerReply(text=join_cjk(text))
    partial = value.get("partial")
    if isinstance(partial, str):
        return ServerReply(partial=join_cjk(partial))
    # Alternatives mode (max_alternatives > 0): the best one comes first.
    alternatives = value.get("alternatives")
    if isinstance(alternatives, list) and alternatives and isinstance(alternatives[0], dict):
        best = alternatives[0].get("text")
        if isinstance(best, str):
            return ServerReply(text=join_cjk(best))
    raise ProtocolError(f"reply with keys {sorted(value)[:5]} has neither a partial nor a text")
