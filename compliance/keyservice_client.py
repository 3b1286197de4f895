"""Client of the key service, used by the application (and the ``medhotline keys`` commands).

One connection, opened and authenticated on first use, requests sent one at a time. Every failure surfaces as a
project error: ``KeyServiceUnavailable`` (can't connect, connection lost, timeout), ``KeyServiceRefused`` (the
service answered with an error, e.g. ``unauthorized`` or ``unwrap_failed``; a TLS handshake refusal too) or
``KeyServiceProtocolError`` (the answer did not follow the wire format).

No caching: the client keeps no plain data key, wrapped key or blind index after a call returns. Callers should
hold a plain data key only for the work at hand, ideally through ``async with client.data_key(wrapped, purpose)
as dek:``, which overwrites the key's ``bytearray`` with zeros on exit. That zeroing is best effort in Python:
the JSON text and base64 ``str`` the key travelled in, and any copy a library made (``AESGCM`` keeps its own),
are immutable objects the garbage collector frees but does not wipe. It shortens a key's life in memory; it does
not guarantee erasure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from compliance.keyservice_protocol import (
    E_BAD_FRAME,
    E_FRAME_TOO_LARGE,
    E_UNAUTHORIZED,
    OP_AUTH,
    OP_BLIND_INDEX,
    OP_GENERATE_DATA_KEY,
    OP_REWRAP,
    OP_ROTATE,
    OP_SIGN,
    OP_STATUS,
    OP_TIMESTAMP,
    OP_TRUST_ANCHORS,
    OP_UNWRAP,
    KeyServiceProtocolError,
    KeyServiceRefused,
    KeyServiceUnavailable,
    b64decode,
    b64encode,
    decode_body,
    encode_frame,
    frame_length,
    load_mutual_tls,
    parse_response,
    request,
)
from compliance.keystore import UnwrapError, wrapped_version

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

# After these the service closes the connection, so the client drops it too.
_FATAL_CODES = frozenset({E_UNAUTHORIZED, E_BAD_FRAME, E_FRAME_TOO_LARGE})


def wipe(buffer: bytearray) -> None:
    """Overwrite ``buffer`` with zeros in place (best effort: see the module docstring)."""
    buffer[:] = bytes(len(buffer))


@dataclass(eq=False)
class GeneratedDataKey:
    """A new data key: ``plain`` (wipe it when done; ``with`` does) and ``wrapped`` (store it with the data)."""

    plain: bytearray = field(repr=False)
    wrapped: bytes
    version: int

    def wipe(self) -> None:
        wipe(self.plain)

    def __enter__(self) -> GeneratedDataKey:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.wipe()


@dataclass(frozen=True)
class KeyServiceStatus:
    versions: tuple[int, ...]
    current: int


@dataclass(frozen=True)
class TrustAnchors:
    signing_key: bytes  # raw Ed25519 public key
    tsa_certificate_pem: bytes


def mutual_tls_client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A client context for the TCP transport: TLS 1.2+, the key service verified (certificate and name) against
    ``ca_file`` only (not the system's CAs), and ``cert_file``/``key_file`` presented as the client certificate.

    A file that is not PEM, or a key that does not match its certificate, raises ``KeyServiceError`` naming it.
    """
    # check_hostname and CERT_REQUIRED are the client context's defaults.
    return load_mutual_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca_file, cert_file, key_file)


class KeyServiceClient:
    """Async client over a Unix socket (``unix``) or mutual-TLS TCP (``tls``); use as ``async with``."""

    def __init__(self, connect: Connector, token: str, *, timeout: float = 10.0) -> None:
        self._connect = connect
        self._token = token
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._tls = False

    @classmethod
    def unix(cls, socket_path: Path, token: str, *, timeout: float = 10.0) -> KeyServiceClient:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(str(socket_path))

        return cls(connect, token, timeout=timeout)

    @classmethod
    def tls(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        token: str,
        *,
        server_hostname: str | None = None,
        timeout: float = 10.0,
    ) -> KeyServiceClient:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=server_hostname or host)

        client = cls(connect, token, timeout=timeout)
        client._tls = True
        return client

    async def __aenter__(self) -> KeyServiceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        streams, self._streams = self._streams, None
        if streams is not None:
            _reader, writer = streams
            writer.close()
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await writer.wait_closed()

    # --- operations -----------------------------------------------------------------------------------------

    async def generate_data_key(self, purpose: str) -> GeneratedDataKey:
        result = await self._call(OP_GENERATE_DATA_KEY, purpose=purpose)
        plain = bytearray(b64decode(result.get("plain"), "plain"))
        wrapped = b64decode(result.get("wrapped"), "wrapped")
        try:
            version = wrapped_version(wrapped)
        except UnwrapError as exc:
            wipe(plain)
            raise KeyServiceProtocolError(f"key service returned a malformed wrapped key: {exc}") from None
        return GeneratedDataKey(plain=plain, wrapped=wrapped, version=version)

    @contextlib.asynccontextmanager
    async def new_data_key(self, purpose: str) -> AsyncIterator[GeneratedDataKey]:
        """A new data key whose plain bytes are wiped when the block ends."""
        generated = await self.generate_data_key(purpose)
        try:
            yield generated
        finally:
            generated.wipe()

    async def unwrap(self, wrapped: bytes, purpose: str) -> bytearray:
        """The plain data key; the caller owns (and should wipe) the returned buffer. Prefer ``data_key``."""
        result = await self._call(OP_UNWRAP, wrapped=b64encode(wrapped), purpose=purpose)
        return bytearray(b64decode(result.get("plain"), "plain"))

    @contextlib.asynccontextmanager
    async def data_key(self, wrapped: bytes, purpose: str) -> AsyncIterator[bytearray]:
        """``async with client.data_key(wrapped, purpose) as dek:``: the plain key, zeroed when the block ends."""
        dek = await self.unwrap(wrapped, purpose)
        try:
            yield dek
        finally:
            wipe(dek)

    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes:
        """``wrapped`` re-wrapped under the current KEK version (the data key itself is unchanged)."""
        result = await self._call(OP_REWRAP, wrapped=b64encode(wrapped), purpose=purpose)
        return b64decode(result.get("wrapped"), "wrapped")

    async def rotate(self) -> int:
        result = await self._call(OP_ROTATE)
        version = result.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KeyServiceProtocolError("rotate response lacks an integer 'version'")
        return version

    async def status(self) -> KeyServiceStatus:
        result = await self._call(OP_STATUS)
        versions, current = result.get("versions"), result.get("current")
        if not isinstance(versions, list) or not all(isinstance(v, int) for v in versions):
            raise KeyServiceProtocolError("status response lacks a list of integer 'versions'")
        if not isinstance(current, int):
            raise KeyServiceProtocolError("status response lacks an integer 'current'")
        return KeyServiceStatus(versions=tuple(versions), current=current)

    async def blind_index(self, value: str, purpose: str) -> str:
        result = await self._call(OP_BLIND_INDEX, value=value, purpose=purpose)
        index = result.get("index")
        if not isinstance(index, str):
            raise KeyServiceProtocolError("blind_index response lacks a string 'index'")
        return index

    async def sign(self, message: bytes, purpose: str) -> bytes:
        """The records key's Ed25519 signature of ``message`` (domain-separated by ``purpose``)."""
        result = await self._call(OP_SIGN, message=b64encode(message), purpose=purpose)
        return b64decode(result.get("signature"), "signature")

    async def trust_anchors(self) -> TrustAnchors:
        """The public halves a verifier needs: the records signing key and the local TSA's certificate."""
        result = await self._call(OP_TRUST_ANCHORS)
        certificate = result.get("tsa_certificate")
        if not isinstance(certificate, str):
            raise KeyServiceProtocolError("trust_anchors response lacks a 'tsa_certificate' PEM")
        return TrustAnchors(
            signing_key=b64decode(result.get("signing_key"), "signing_key"),
            tsa_certificate_pem=certificate.encode("ascii"),
        )

    async def timestamp(self, request_der: bytes) -> bytes:
        """The local timestamp authority's RFC 3161 response (DER) to ``request_der``."""
        result = await self._call(OP_TIMESTAMP, request=b64encode(request_der))
        return b64decode(result.get("response"), "response")

    # --- transport ------------------------------------------------------------------------------------------

    async def _call(self, op: str, **params: Any) -> dict[str, Any]:
        async with self._lock:
            try:
                reader, writer = await self._connected()
                return await self._exchange(reader, writer, request(op, self._next_id(), **params))
            except KeyServiceRefused as exc:
                if exc.code in _FATAL_CODES:
                    await self.close()
                raise
            except KeyServiceProtocolError:
                await self.close()
                raise

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is not None and not self._streams[1].is_closing():
            return self._streams
        await self.close()
        try:
            streams = await asyncio.wait_for(self._connect(), self._timeout)
        except ssl.SSLError as exc:
            raise KeyServiceRefused("tls_refused", f"TLS handshake failed: {exc.reason or exc}") from None
        except (OSError, TimeoutError) as exc:
            raise KeyServiceUnavailable(f"cannot reach the key service: {exc or type(exc).__name__}") from None
        self._streams = streams
        try:
            await self._exchange(*streams, request(OP_AUTH, self._next_id(), token=self._token))
        except KeyServiceUnavailable as exc:
            if not self._tls:
                raise
            # Under TLS 1.3 the server checks the client certificate after the client's handshake is done, so a
            # refused certificate reaches this side only as a reset before the first answer.
            raise KeyServiceUnavailable(
                f"{exc} before authentication: if it persists, the key service may refuse this node's client "
                "certificate (keyservice.cert_file; its log says why)"
            ) from None
        return streams

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: dict[str, Any]
    ) -> dict[str, Any]:
        frame = encode_frame(message)
        try:
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), self._timeout)
            header = await asyncio.wait_for(reader.readexactly(4), self._timeout)
            body = await asyncio.wait_for(reader.readexactly(frame_length(header)), self._timeout)
        except ssl.SSLError as exc:
            await self.close()
            raise KeyServiceRefused("tls_refused", f"TLS connection refused: {exc.reason or exc}") from None
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await self.close()
            raise KeyServiceUnavailable(f"connection to the key service failed: {type(exc).__name__}") from None
        return parse_response(decode_body(body), message["id"])

    def _next_id(self) -> str:
        return str(next(self._ids))
