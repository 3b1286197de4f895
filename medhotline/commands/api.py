"""``medhotline api`` (serve the HTTP API and the wallboard) and ``medhotline signin password|totp``.

The API binds to loopback by default. Any other address is refused unless TLS is configured (``--tls-cert`` and
``--tls-key``): passwords, TOTP codes and session tokens must not cross a network in clear. ``--port 0`` takes a
free port; the address actually bound is printed on stdout (``listening on http://127.0.0.1:PORT``) once the
server accepts connections. docs/api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from datetime import UTC, datetime
from pathlib import Path

import uvicorn

from compliance.access_records import cli_actor
from compliance.audit import AuditLog, SqlAuditStore
from compliance.credential_admin import SignInAdministration
from compliance.data_keys import LazyKeyService
from ground import db
from ground.config import Config
from ground.errors import CommandError
from medhotline.api import ApiSettings, create_app
from medhotline.api.board import settings_of
from medhotline.commands.complaints import rules_of
from medhotline.commands.keys import run_keyed
from medhotline.commands.supervise import ari_client
from medhotline.supervision import Supervision
from routing.ari_supervision import PhoneSettings

__all__ = ["check_bind", "register"]


def check_bind(host: str, cert: Path | None, key: Path | None) -> None:
    """Loopback, or TLS with both files readable; else a CommandError saying what to do."""
    if (cert is None) != (key is None):
        raise CommandError("--tls-cert and --tls-key: give both (the server's certificate and its private key)")
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not path.is_file():
            raise CommandError(f"{option} {path}: no such file")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise CommandError(f"--host {host!r}: give an IP address (e.g. 127.0.0.1, or the hospital LAN's)") from None
    if not loopback and cert is None:
        raise CommandError(
            f"--host {host}: not a loopback address, and TLS is not configured. Passwords and session tokens "
            "would cross the network in clear: give --tls-cert FILE and --tls-key FILE, or bind to 127.0.0.1 "
            "behind a TLS proxy"
        )


async def _serve(server: uvicorn.Server, scheme: str, keys: LazyKeyService) -> None:
    try:
        await _serve_until_stopped(server, scheme)
    finally:
        await keys.close()


async def _serve_until_stopped(server: uvicorn.Server, scheme: str) -> None:
    task = asyncio.create_task(server.serve())
    # uvicorn.Server says it accepts connections only by a plain flag, not an event to wait on.
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if server.started:
        for listener in server.servers:
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                print(f"listening on {scheme}://{host}:{port}", flush=True)
    await task


def _cmd_api(config: Config, args: argparse.Namespace) -> int:
    check_bind(args.host, args.tls_cert, args.tls_key)
    ari = ari_client(config)
    # Connected on first use (and again after an outage): the API starts without the key service, and a
    # second-factor sign-in is refused (503) while it is unreachable.
    keys = LazyKeyService(config)
    with db.current_engine(config.database_url) as engine:
        supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), ari, lambda: datetime.now(UTC),
                                  PhoneSettings(caller_id=config.hotline.number))  # fmt: skip
        app = create_app(ApiSettings(engine=engine, statistics=settings_of(config), flows_dir=config.hotline.flows_dir,
                                     secure_cookie=args.tls_cert is not None, supervision=supervision,
                                     complaints=rules_of(config), keys=keys))  # fmt: skip
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
        ))  # fmt: skip
        asyncio.run(_serve(server, "https" if args.tls_cert else "http", keys))
    return 0


def _cmd_credentials(config: Config, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    actor = cli_actor(args.by)
    if args.action == "password":
        with db.current_engine(config.database_url) as engine:
            # From stdin, never an argument: an argument is visible to every user in the process list.
            password = sys.stdin.readline().rstrip("\n")
            change = SignInAdministration.for_engine(engine).set_password(args.account, password, actor=actor, at=now)
    else:
        # The secret is sealed under a data key the key service wraps: it needs the running key service.
        change = run_keyed(config, lambda k: SignInAdministration.for_engine(k.engine, k.keys).enroll_totp(
            args.account, actor=actor, at=now))  # fmt: skip
    if change.totp_uri is None:
        print(f"password of {change.account_id} set")
    else:
        print(f"second factor of {change.account_id} enrolled; add it to the authenticator app:\n{change.totp_uri}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``api`` and ``signin`` to the ``medhotline`` parser."""
    api = sub.add_parser("api", help="serve the HTTP API and the live wallboard (docs/api.md)")
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need TLS)")
    api.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed on start)")
    api.add_argument("--tls-cert", type=Path, metavar="FILE", help="the server's certificate (PEM)")
    api.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    api.set_defaults(func=_cmd_api)
    creds = sub.add_parser("signin", help="an account's API sign-in: password (from stdin) or TOTP second factor")
    creds.add_argument("action", choices=["password", "totp"])
    creds.add_argument("account", metavar="ACCOUNT")
    creds.add_argument("--by", metavar="ACCOUNT", help="the staff account making the change (default: the OS user)")
    creds.set_defaults(func=_cmd_credentials)
