"""The key service's wire format, sans-I/O: length-prefixed JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one object. Frames are
at most ``MAX_FRAME_SIZE`` bytes (64 KiB); a larger length prefix is refused before any of the body is read, so
a client can't make the service buffer an arbitrary amount.

Requests are ``{"op": ..., "id": ..., **params}``; responses are ``{"id": ..., "ok": true, **result}`` or
``{"id": ..., "ok": false, "error": {"code": ..., "message": ...}}``. Binary values (keys, wrapped keys) travel
as base64url text. The first request on a connection must be ``auth`` carrying the client token.

This module does no I/O: the server and the client feed it bytes and write what it returns, which is what lets
tests replay frames without a socket.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ground.errors import MedhotlineError

MAX_FRAME_SIZE: Final = 64 * 1024
HEADER: Final = struct.Struct(">I")

# Operations the service knows. There is deliberately none that returns a key-encryption key.
OP_AUTH: Final = "auth"
OP_GENERATE_DATA_KEY: Final = "generate_data_key"
OP_UNWRAP: Final = "unwrap"
OP_REWRAP: Final = "rewrap"
OP_ROTATE: Final = "rotate"
OP_STATUS: Final = "status"
OP_BLIND_INDEX: Final = "blind_index"
# Signed call records: an Ed25519 signature (domain-separated by purpose), the public trust anchors, and an
# RFC 3161 timestamp from the local timestamp authority. The private keys stay in the key service.
OP_SIGN: Final = "sign"
OP_TRUST_ANCHORS: Final = "trust_anchors"
OP_TIMESTAMP: Final = "timestamp"
OPERATIONS: Final = frozenset(
    {
        OP_AUTH,
        OP_GENERATE_DATA_KEY,
        OP_UNWRAP,
        OP_REWRAP,
        OP_ROTATE,
        OP_STATUS,
        OP_BLIND_INDEX,
        OP_SIGN,
        OP_TRUST_ANCHORS,
        OP_TIMESTAMP,
    }
)

# Error codes a response may carry.
E_BAD_FRAME: Final = "bad_frame"
E_FRAME_TOO_LARGE: Final = "frame_too_large"
E_BAD_REQUEST: Final = "bad_request"
E_UNKNOWN_OP: Final = "unknown_op"
E_UNAUTHORIZED: Final = "unauthorized"
E_UNWRAP_FAILED: Final = "unwrap_failed"
E_INTERNAL: Final = "internal"

_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_OP_PATTERN: Final = re.compile(r"^[a-z_]{1,32}$")


class KeyServiceError(MedhotlineError):
    """Anything that went wrong talking to, or inside, the key service."""


class KeyServiceProtocolError(KeyServiceError):
    """A frame or message that does not follow the wire format; ``code`` is the wire error code to answer with."""

    def __init__(self, message: str, code: str = E_BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


class KeyServiceUnavailable(KeyServiceError):
    """The key service could not be reached, or the connection broke mid-call."""


class KeyServiceRefused(KeyServiceError):
    """The key service answered with an error (``code`` is the wire code, e.g. ``unauthorized``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"key service refused the request ({code}): {message}")
        self.code = code
        self.detail = message


@dataclass(frozen=True)
class Request:
    """A parsed request: its operation, its correlation id and its remaining parameters."""

    op: str
    id: str
    params: dict[str, Any] = field(default_factory=dict)


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message as a frame; refuses (rather than truncating) a message over the size limit."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > MAX_FRAME_SIZE:
        raise KeyServiceProtocolError(
            f"frame of {len(body)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit", E_FRAME_TOO_LARGE
        )
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header, refused if it exceeds the limit or is zero."""
    if len(header) != HEADER.size:
        raise KeyServiceProtocolError(f"frame header must be {HEADER.size} bytes, got {len(header)}")
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_SIZE:
        raise KeyServiceProtocolError(
            f"frame announces {length} bytes, over the {MAX_FRAME_SIZE}-byte limit", E_FRAME_TOO_LARGE
        )
    if length == 0:
        raise KeyServiceProtocolError("empty frame")
    return int(length)


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse a frame body: UTF-8 JSON that must be an object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyServiceProtocolError(f"frame is not UTF-8 (byte {exc.start})") from None
    try:
        message = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise KeyServiceProtocolError(f"frame is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(message, dict):
        raise KeyServiceProtocolError(f"frame must hold a JSON object, got {type(message).__name__}")
    return message


def _refuse_constant(name: str) -> Any:
    raise KeyServiceProtocolError(f"frame contains the non-standard JSON constant {name}")


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back the complete messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer.extend(data)
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= HEADER.size:
            length = frame_length(bytes(self._buffer[: HEADER.size]))
            if len(self._buffer) < HEADER.size + length:
                break
            body = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            messages.append(decode_body(body))
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


def parse_request(message: dict[str, Any]) -> Request:
    """Validate the envelope of a request; the operation's own parameters are checked by the handler."""
    op = message.get("op")
    request_id = message.get("id")
    if not isinstance(request_id, str) or not _ID_PATTERN.match(request_id):
        raise KeyServiceProtocolError("request 'id' must be 1-64 characters of [A-Za-z0-9_.:-]", E_BAD_REQUEST)
    if not isinstance(op, str) or not _OP_PATTERN.match(op):
        raise KeyServiceProtocolError("request 'op' must be 1-32 characters of [a-z_]", E_BAD_REQUEST)
    params = {key: value for key, value in message.items() if key not in ("op", "id")}
    return Request(op=op, id=request_id, params=params)


def request(op: str, request_id: str, **params: Any) -> dict[str, Any]:
    return {"op": op, "id": request_id, **params}


def ok_response(request_id: str | None, **result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, **result}


def error_response(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def parse_response(message: dict[str, Any], expected_id: str) -> dict[str, Any]:
    """Check a response's envelope; an error response becomes ``KeyServiceRefused``.

    The id is checked only on success: a connection-level refusal (``unauthorized`` sent before any request was
    read) carries no id.
    """
    ok = message.get("ok")
    if ok is False:
        error = message.get("error")
        if not isinstance(error, dict):
            raise KeyServiceProtocolError("error response without an 'error' object")
        code, text = error.get("code"), error.get("message")
        if not isinstance(code, str) or not isinstance(text, str):
            raise KeyServiceProtocolError("error response needs string 'code' and 'message'")
        raise KeyServiceRefused(code, text)
    if ok is not True:
        raise KeyServiceProtocolError("response lacks a boolean 'ok'")
    if message.get("id") != expected_id:
        raise KeyServiceProtocolError(f"response id {message.get('id')!r} does not match request id {expected_id!r}")
    return message


def b64encode(data: bytes | bytearray) -> str:
    return base64.urlsafe_b64encode(bytes(data)).decode("ascii")


def b64decode(text: object, name: str) -> bytes:
    """Decode a base64url field, naming the field (never its content) on failure."""
    if not isinstance(text, str):
        raise KeyServiceProtocolError(f"'{name}' must be base64url text", E_BAD_REQUEST)
    try:
        return base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise KeyServiceProtocolError(f"'{name}' is not valid base64url", E_BAD_REQUEST) from None


def require_str(params: dict[str, Any], name: str, max_length: int = 4096) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise KeyServiceProtocolError(
            f"'{name}' must be a non-empty string of at most {max_length} characters", E_BAD_REQUEST
        )
    return value


def load_mutual_tls(context: ssl.SSLContext, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """``context`` (client or server side) with TLS 1.2+, ``cert_file``/``key_file`` as its own certificate and
    ``ca_file`` as the only CA it trusts for the other side. A file that is not PEM, or a key that does not match
    its certificate, raises ``KeyServiceError`` naming it."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise KeyServiceError(
            f"keyservice.cert_file {cert_file} / key_file {key_file}: not a certificate and its key ({exc})"
        ) from None
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise KeyServiceError(f"keyservice.ca_file {ca_file}: not a usable CA certificate ({exc})") from None
    return context
