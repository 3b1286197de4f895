"""The key service process: a ``KeyStore`` behind a Unix socket (or mutual-TLS TCP), for authenticated clients only.

A client is served only if BOTH checks pass:

1. the transport's peer identity: on the Unix socket the kernel's ``SO_PEERCRED`` uid must be in the allowed set
   (default: the service's own uid); over TCP the client must have presented a certificate that the server's
   CA verified (the SSL context must have ``verify_mode = CERT_REQUIRED``) and that names one of the listed
   clients (a DNS subjectAltName or the common name);
2. the first frame must be ``{"op": "auth", "token": ...}`` with the shared client token (constant-time compare).

Anything else is answered with an ``unauthorized`` error and the connection is closed. A malformed or oversize
frame is answered with ``bad_frame``/``frame_too_large`` and that connection closed (its framing can't be trusted
any more); other connections are unaffected. Each request is logged with its op, outcome and purpose only: never
key material, wrapped keys or the values being indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import os
import signal
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from compliance.keyservice_protocol import (
    E_BAD_REQUEST,
    E_INTERNAL,
    E_UNAUTHORIZED,
    E_UNKNOWN_OP,
    E_UNWRAP_FAILED,
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
    KeyServiceError,
    KeyServiceProtocolError,
    Request,
    b64decode,
    b64encode,
    decode_body,
    encode_frame,
    error_response,
    frame_length,
    load_mutual_tls,
    ok_response,
    parse_request,
    require_str,
)
from compliance.keystore import (
    KeyStore,
    KeyStoreError,
    UnwrapError,
    check_private,
    check_purpose,
    read_token_file,
)
from ground.errors import EXIT_UNABLE, EXIT_USAGE, MedhotlineError
from ground.logs import get_logger

log = get_logger("medhotline.keyservice")

MAX_INDEX_VALUE_LENGTH: Final = 1024
_PEERCRED: Final = struct.Struct("3i")
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024

PeerCheck = Callable[[asyncio.StreamWriter], "tuple[bool, str]"]


class KeyServiceServer:
    """Serves one ``KeyStore`` to authenticated clients; ``start_unix_server``/``start_tls_server`` listen."""

    def __init__(
        self,
        keystore: KeyStore,
        token: bytes,
        allowed_uids: set[int] | frozenset[int] | None = None,
        *,
        auth_timeout: float = 10.0,
        idle_timeout: float = 300.0,
    ) -> None:
        if not token:
            raise KeyServiceError("the key service needs a non-empty client token")
        self._keystore = keystore
        self._token_digest = hashlib.sha256(token).digest()
        self._allowed_uids = frozenset(allowed_uids) if allowed_uids else frozenset({os.geteuid()})
        self._auth_timeout = auth_timeout
        self._idle_timeout = idle_timeout
        self._listeners: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._handshakes: set[asyncio.Task[None]] = set()

    # --- listening ------------------------------------------------------------------------------------------

    async def start_unix_server(self, socket_path: Path) -> asyncio.Server:
        """Listen on ``socket_path`` (mode 0600) inside a private (0700) directory, created if missing."""
        parent = socket_path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        check_private(parent, directory=True)
        await _remove_stale_socket(socket_path)
        server = await asyncio.start_unix_server(self._handle_unix, path=str(socket_path))
        os.chmod(socket_path, 0o600)
        self._listeners.append(server)
        log.info("keyservice_listening", transport="unix", socket=str(socket_path))
        return server

    async def start_tls_server(
        self, host: str, port: int, ssl_context: ssl.SSLContext, clients: frozenset[str]
    ) -> asyncio.Server:
        """Listen on TCP with mutual TLS: the context must require and verify a client certificate, and the
        certificate must name one of ``clients``."""
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise KeyServiceError("the key service's TLS context must require client certificates (CERT_REQUIRED)")
        if not clients:
            raise KeyServiceError("the key service's TLS listener needs the names of the clients it serves")
        # The handshake runs in the handler (start_tls) rather than in asyncio's server, which drops a failed
        # handshake without a word: a refused client certificate must leave a line in the key service's log.
        accept = functools.partial(self._accept_tls, ssl_context, functools.partial(_check_peer_certificate, clients))
        server = await asyncio.start_server(accept, host=host, port=port)
        self._listeners.append(server)
        log.info("keyservice_listening", transport="tls", host=host, port=port)
        return server

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop listening, close every client connection and wait for their handlers to finish.

        Handlers are ended by closing their transports rather than by cancellation, so each finishes through
        its own ``finally`` (on Python 3.11 a cancelled stream handler is also reported as an unhandled error).
        """
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        for writer in list(self._connections.values()):
            writer.close()
        for handshake in self._handshakes - set(self._connections):
            handshake.cancel()  # still in its TLS handshake: nothing served yet, nothing to finish
        tasks = set(self._connections) | self._handshakes
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        for listener in listeners:
            await listener.wait_closed()

    async def _handle_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.handle_connection(reader, writer, self._check_peer_uid)

    def _accept_tls(
        self,
        ssl_context: ssl.SSLContext,
        check_peer: PeerCheck,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # A plain function runs inside connection_made, before any byte is read: reading paused here, the
        # client's first TLS record reaches start_tls instead of the plain stream's buffer (where it would be lost).
        if isinstance(writer.transport, asyncio.ReadTransport):
            writer.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handle_tls(ssl_context, check_peer, reader, writer))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handle_tls(
        self,
        ssl_context: ssl.SSLContext,
        check_peer: PeerCheck,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        address = writer.get_extra_info("peername")
        host = address[0] if isinstance(address, tuple) and address else "?"
        try:
            await asyncio.wait_for(writer.start_tls(ssl_context), self._auth_timeout)
        except ssl.SSLError as exc:
            # A certificate refused (or none presented, or not TLS at all): one line, no certificate content.
            log.warning(
                "keyservice_refused",
                peer=f"tls-handshake:{host}",
                reason=f"TLS handshake failed: {exc.reason or type(exc).__name__}",
                outcome=E_UNAUTHORIZED,
            )
            _abort(writer)
            return
        except (OSError, TimeoutError) as exc:
            # The client left mid-handshake: a port probe, or a client that refused *our* certificate.
            log.info("keyservice_connection_lost", peer=f"tls-handshake:{host}", error=type(exc).__name__)
            _abort(writer)
            return
        await self.handle_connection(reader, writer, check_peer)

    def _check_peer_uid(self, writer: asyncio.StreamWriter) -> tuple[bool, str]:
        sock = writer.get_extra_info("socket")
        peercred = getattr(socket, "SO_PEERCRED", None)
        if sock is None or peercred is None:
            return False, "peer credentials unavailable"
        try:
            _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, peercred, _PEERCRED.size))
        except OSError:
            return False, "peer credentials unavailable"
        return uid in self._allowed_uids, f"uid:{uid}"

    # --- one connection -------------------------------------------------------------------------------------

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check_peer: PeerCheck
    ) -> None:
        """Authenticate, then answer requests until the client leaves, errs at the frame level, or idles out."""
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        allowed, peer = check_peer(writer)
        conn_log = log.bind(peer=peer)
        try:
            if not allowed:
                conn_log.warning("keyservice_refused", reason="peer not allowed", outcome=E_UNAUTHORIZED)
                await _send(writer, error_response(None, E_UNAUTHORIZED, "client is not authorised"))
                return
            if not await self._authenticate(reader, writer, conn_log):
                return
            while True:
                message = await asyncio.wait_for(_read_message(reader), self._idle_timeout)
                if message is None:
                    return
                await _send(writer, self.dispatch(message, conn_log))
        except KeyServiceProtocolError as exc:
            conn_log.warning("keyservice_bad_frame", outcome=exc.code, error=str(exc))
            with contextlib.suppress(OSError):
                await _send(writer, error_response(None, exc.code, str(exc)))
        except TimeoutError:
            conn_log.info("keyservice_connection_timeout")
        except (OSError, asyncio.IncompleteReadError) as exc:
            conn_log.info("keyservice_connection_lost", error=type(exc).__name__)
        finally:
            await _close_gracefully(reader, writer)
            if task is not None:
                self._connections.pop(task, None)

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn_log: Any) -> bool:
        message = await asyncio.wait_for(_read_message(reader), self._auth_timeout)
        if message is None:
            return False
        request_id = message.get("id") if isinstance(message.get("id"), str) else None
        token = message.get("token")
        if message.get("op") != OP_AUTH or not isinstance(token, str) or not self._token_matches(token):
            conn_log.warning("keyservice_refused", op=OP_AUTH, reason="missing or wrong token", outcome=E_UNAUTHORIZED)
            await _send(writer, error_response(request_id, E_UNAUTHORIZED, "client is not authorised"))
            return False
        conn_log.info("keyservice_request", op=OP_AUTH, outcome="ok")
        await _send(writer, ok_response(request_id))
        return True

    def _token_matches(self, token: str) -> bool:
        given = hashlib.sha256(token.encode("utf-8", errors="surrogatepass")).digest()
        return hmac.compare_digest(given, self._token_digest)

    # --- requests -------------------------------------------------------------------------------------------

    def dispatch(self, message: dict[str, Any], conn_log: Any = None) -> dict[str, Any]:
        """Answer one request of an authenticated client (sans-I/O apart from the key store's own files)."""
        logger = conn_log if conn_log is not None else log
        request_id = message.get("id") if isinstance(message.get("id"), str) else None
        op: str | None = None
        purpose: str | None = None
        try:
            request = parse_request(message)
            op = request.op
            raw_purpose = request.params.get("purpose")
            if isinstance(raw_purpose, str):
                with contextlib.suppress(KeyStoreError):
                    check_purpose(raw_purpose)
                    purpose = raw_purpose
            response = self._perform(request)
        except KeyServiceProtocolError as exc:
            response = error_response(request_id, exc.code, str(exc))
        except UnwrapError as exc:
            response = error_response(request_id, E_UNWRAP_FAILED, str(exc))
        except KeyStoreError as exc:
            response = error_response(request_id, E_BAD_REQUEST, str(exc))
        except OSError as exc:
            logger.error("keyservice_internal_error", op=op, error=type(exc).__name__)
            response = error_response(request_id, E_INTERNAL, "the key service failed to complete the operation")
        except MedhotlineError as exc:
            # E.g. the timestamp authority's key or certificate file is damaged: the operator must see which.
            logger.error("keyservice_internal_error", op=op, error=str(exc))
            response = error_response(request_id, E_INTERNAL, f"the key service failed: {exc}")
        outcome = "ok" if response["ok"] else response["error"]["code"]
        logger.info("keyservice_request", op=op, outcome=outcome, purpose=purpose)
        return response

    def _perform(self, request: Request) -> dict[str, Any]:
        params, keystore = request.params, self._keystore
        if request.op == OP_GENERATE_DATA_KEY:
            plain, wrapped = keystore.generate_data_key(require_str(params, "purpose"))
            return ok_response(request.id, plain=b64encode(plain), wrapped=b64encode(wrapped))
        if request.op == OP_UNWRAP:
            wrapped = b64decode(params.get("wrapped"), "wrapped")
            return ok_response(request.id, plain=b64encode(keystore.unwrap(wrapped, require_str(params, "purpose"))))
        if request.op == OP_REWRAP:
            wrapped = b64decode(params.get("wrapped"), "wrapped")
            return ok_response(request.id, wrapped=b64encode(keystore.rewrap(wrapped, require_str(params, "purpose"))))
        if request.op == OP_ROTATE:
            return ok_response(request.id, version=keystore.rotate())
        if request.op == OP_STATUS:
            status = keystore.status()
            return ok_response(request.id, versions=list(status.versions), current=status.current)
        if request.op == OP_BLIND_INDEX:
            value = require_str(params, "value", MAX_INDEX_VALUE_LENGTH)
            return ok_response(request.id, index=keystore.blind_index(value, require_str(params, "purpose")))
        if request.op == OP_SIGN:
            message = b64decode(params.get("message"), "message")
            signature = keystore.sign(message, require_str(params, "purpose"))
            return ok_response(request.id, signature=b64encode(signature))
        if request.op == OP_TRUST_ANCHORS:
            tsa = keystore.timestamp_authority()
            return ok_response(
                request.id,
                signing_key=b64encode(keystore.signing_public_key()),
                tsa_certificate=tsa.certificate_pem.decode("ascii"),
            )
        if request.op == OP_TIMESTAMP:
            # A malformed request gets an RFC 3161 rejection response from the authority, not an error here.
            query = b64decode(params.get("request"), "request")
            return ok_response(request.id, response=b64encode(keystore.timestamp_authority().respond(query)))
        if request.op == OP_AUTH:
            raise KeyServiceProtocolError("this connection is already authenticated", E_BAD_REQUEST)
        raise KeyServiceProtocolError(f"unknown operation {request.op!r}", E_UNKNOWN_OP)


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()


def _check_peer_certificate(clients: frozenset[str], writer: asyncio.StreamWriter) -> tuple[bool, str]:
    """The TLS handshake (CERT_REQUIRED) already verified the chain; make sure a certificate was really presented
    and that it names one of ``clients`` (a DNS subjectAltName, or the common name)."""
    certificate = writer.get_extra_info("peercert")
    if not certificate:
        return False, "tls:no-certificate"
    subject = dict(item[0] for item in certificate.get("subject", ()) if item)
    common_name = str(subject.get("commonName", ""))
    names = {str(value) for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"}
    if common_name:
        names.add(common_name)
    listed = sorted(names & clients)
    if not listed:
        return False, f"tls:{common_name or '?'} (not a listed client)"
    return True, f"tls:{listed[0]}"


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or ``None`` at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise KeyServiceProtocolError("connection closed inside a frame header") from None
    length = frame_length(header)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise KeyServiceProtocolError("connection closed inside a frame body") from None
    return decode_body(body)


async def _close_gracefully(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close after letting the client read our last frame.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the error frame just
    written before the client reads it. So: half-close our side, discard what the client still sends for a moment
    (bounded in time and size), then close.
    """
    with contextlib.suppress(OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
            async with asyncio.timeout(_LINGER_SECONDS):
                discarded = 0
                while discarded < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    discarded += len(chunk)
    writer.close()
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode_frame(message))
    await writer.drain()


async def _remove_stale_socket(socket_path: Path) -> None:
    """Remove a socket left by a dead service; refuse if a live one answers or the path is not a socket."""
    if not _existing_socket(socket_path):
        return
    try:
        _reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError:
        _unlink(socket_path)
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise KeyServiceError(f"a key service is already listening on {socket_path}")


def _existing_socket(path: Path) -> bool:
    """Whether ``path`` is an existing socket; refuses anything else that is in the way."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode):
        raise KeyServiceError(f"{path} exists and is not a socket; refusing to replace it")
    return True


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def mutual_tls_server_context(certfile: Path, keyfile: Path, client_ca: Path) -> ssl.SSLContext:
    """A server context for the TCP transport: TLS 1.2+, own certificate, client certificates required.

    A file that is not PEM, or a key that does not match its certificate, raises ``KeyServiceError`` naming it.
    """
    context = load_mutual_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), client_ca, certfile, keyfile)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class TlsListener:
    """Where the key service also listens for mutual TLS, with which context, for which clients (by the name in
    their certificate)."""

    host: str
    port: int
    context: ssl.SSLContext
    clients: frozenset[str]


async def serve_keyservice(
    keystore: KeyStore,
    socket_path: Path,
    token: bytes,
    allowed_uids: set[int],
    *,
    stop: asyncio.Event,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    tls: TlsListener | None = None,
) -> None:
    """Serve on the Unix socket (and on ``tls`` when given) until ``stop`` is set, then close and remove the
    socket. Both listeners serve the same key store with the same token check."""
    service = KeyServiceServer(keystore, token, allowed_uids)
    await service.start_unix_server(socket_path)
    try:
        if tls is not None:
            await service.start_tls_server(tls.host, tls.port, tls.context, tls.clients)
        if on_ready is not None:
            await on_ready()
        await stop.wait()
    finally:
        await service.aclose()
        _unlink(socket_path)
        log.info("keyservice_stopped")


def run_keyservice(
    directory: Path,
    socket_path: Path,
    token_path: Path,
    allowed_uids: set[int],
    *,
    tls_files: tuple[str, Path, Path, Path] | None = None,
    tls_clients: frozenset[str] = frozenset(),
) -> int:
    """Entry point of ``medhotline keyservice``: returns 0 after SIGTERM/SIGINT, 2 on a configuration error.

    The key directory is initialised (KEK version 1, blind-index key) on first start if missing or empty.
    ``allowed_uids`` empty means only this process's own uid may connect. ``tls_files``: (listen ``host:port``,
    CA of the accepted client certificates, server certificate, its key) to also listen for mutual TLS, for the
    clients named in ``tls_clients``.
    """
    try:
        keystore = KeyStore.open_or_create(directory)
        token = read_token_file(token_path)
        tls = None
        if tls_files is not None:
            listen, ca_file, cert_file, key_file = tls_files
            host, _sep, port = listen.rpartition(":")
            context = mutual_tls_server_context(cert_file, key_file, ca_file)
            tls = TlsListener(host.removeprefix("[").removesuffix("]"), int(port), context, tls_clients)
    except (MedhotlineError, OSError) as exc:
        log.error("keyservice_config_error", error=str(exc))
        print(f"medhotline keyservice: {exc}", file=sys.stderr)
        return EXIT_USAGE  # its key directory, token or certificate files are wrong: nothing was started

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await serve_keyservice(keystore, socket_path, token, allowed_uids, stop=stop, tls=tls)
        except (MedhotlineError, OSError) as exc:
            log.error("keyservice_failed", error=str(exc))
            print(f"medhotline keyservice: {exc}", file=sys.stderr)
            return EXIT_UNABLE
        return 0

    return asyncio.run(main())
