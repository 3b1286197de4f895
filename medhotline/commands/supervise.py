"""``medhotline supervise listen|whisper|barge|pause|unpause|escalate``: the supervisor actions from the host
(docs/api.md has the same over HTTP). Each is decided by the access policy for ``--as`` (a supervisor), needs a
``--reason`` and is audited. listen/whisper/barge ring the supervisor's own phone and stay in the foreground until
the supervisor or the call hangs up (Ctrl-C ends the supervision too)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from compliance.accounts import ACCOUNT_ID
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.config import Config
from ground.errors import CommandError
from medhotline.sandbox import asterisk_client_ssl
from medhotline.service import asterisk_credentials
from medhotline.supervision import AccessDenied, Supervision, SupervisionError, Supervisor
from routing.ari_supervision import PhoneSettings, disconnect
from telephony.ari_client import AriClient

__all__ = ["ari_client", "register"]


def ari_client(config: Config) -> AriClient:
    """A REST-only ARI client for the configured Asterisk (its Stasis application is the service's)."""
    creds = asterisk_credentials(config)
    ast = config.asterisk
    return AriClient(ast.host, ast.ari_connect_port or ast.ari_port, creds.ari_username, creds.ari_password,
                     ast.ari_app, timeout=ast.ari_timeout, rest_transport="http",
                     ssl_context=asterisk_client_ssl(config))  # fmt: skip


def _run(config: Config, work: Callable[[Supervision], Awaitable[str]]) -> str:
    async def main() -> str:
        ari = ari_client(config)
        try:
            with db.current_engine(config.database_url) as engine:
                supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), ari, lambda: datetime.now(UTC),
                                          PhoneSettings(caller_id=config.hotline.number))  # fmt: skip
                return await work(supervision)
        finally:
            await ari.aclose()

    try:
        return asyncio.run(main())
    except AccessDenied:
        raise CommandError("refused: supervisor actions need the supervisor role (the refusal is audited)") from None
    except SupervisionError as exc:
        raise CommandError(str(exc)) from None


def _who(args: argparse.Namespace) -> Supervisor:
    if not ACCOUNT_ID.match(args.as_):
        raise CommandError("--as must be an account id (2-64 of a-z 0-9 _ . - starting with a letter)")
    return Supervisor(args.as_)


def _cmd_step_in(config: Config, args: argparse.Namespace) -> int:
    who = _who(args)

    async def work(supervision: Supervision) -> str:
        tap, watching = await supervision.step_in(who, args.supervise_action, args.call, args.reason)
        print(f"{tap.mode}: connected to call {tap.call_id} (spy {tap.spy}, whisper {tap.whisper})", flush=True)
        try:
            await watching
        finally:
            if not watching.done():  # Ctrl-C: take the supervision down before leaving
                watching.cancel()
                await disconnect(supervision.ari, tap)
        return "ended"

    print(f"{args.supervise_action} of call {args.call}: {_run(config, work)}")
    return 0


def _cmd_agent(config: Config, args: argparse.Namespace) -> int:
    who = _who(args)

    async def work(supervision: Supervision) -> str:
        act = supervision.pause if args.supervise_action == "pause" else supervision.unpause
        await act(who, args.agent, args.reason)
        return "done"

    print(f"{args.supervise_action} of agent {args.agent}: {_run(config, work)}")
    return 0


def _cmd_escalate(config: Config, args: argparse.Namespace) -> int:
    who = _who(args)

    async def work(supervision: Supervision) -> str:
        await supervision.escalate(who, args.call, args.reason)
        return "asked (the call's path shows 'reclassified' once its queue moved it)"

    print(f"escalation of call {args.call}: {_run(config, work)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline supervise`` to the ``medhotline`` parser."""
    supervise = sub.add_parser("supervise", help="supervisor actions on live calls and agents (docs/api.md)")
    actions = supervise.add_subparsers(dest="supervise_action", required=True)
    for name, what, func, target in (
        ("listen", "hear patient and agent; nobody hears you", _cmd_step_in, "call"),
        ("whisper", "speak to the agent only; the patient never hears it", _cmd_step_in, "call"),
        ("barge", "join the conversation: both hear you", _cmd_step_in, "call"),
        ("pause", "take an agent out of routing", _cmd_agent, "agent"),
        ("unpause", "put an agent back into routing", _cmd_agent, "agent"),
        ("escalate", "move a waiting call to the emergency queue", _cmd_escalate, "call"),
    ):
        action = actions.add_parser(name, help=what)
        action.add_argument(target, metavar="CALL_ID" if target == "call" else "AGENT_ID")
        action.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own (supervisor) account")
        action.add_argument("--reason", required=True, help="why (10+ characters, no numbers; audited)")
        action.set_defaults(func=func)
