"""The ``medhotline`` command line: what administrators and operators run.

Every command loads and validates the configuration first, so a wrong value is reported before anything is
started, touched or half-written. Expected failures print one clear message and exit non-zero; a traceback
means a bug.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from compliance.audit import Ed25519Signer
from compliance.audit_witness import HeadWitness
from compliance.keyservice_server import run_keyservice
from ground import db
from ground.config import Config, ConfigError, load_config
from ground.db import CallRecord
from ground.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    MedhotlineError,
)
from ground.logs import configure_logging
from keywords.lexicon import DEFAULT_LEXICON_DIR
from keywords.speech_models import fetch_command
from medhotline import db_roles
from medhotline import flows as flow_tools
from medhotline.commands import access as access_commands
from medhotline.commands import api as api_commands
from medhotline.commands import cluster as cluster_commands
from medhotline.commands import complaints as complaints_commands
from medhotline.commands import hisops as his_link_commands
from medhotline.commands import keys as key_commands
from medhotline.commands import keywords as commands
from medhotline.commands import outreach as scheduler_commands
from medhotline.commands import patients as his_commands
from medhotline.commands import quality as quality_commands
from medhotline.commands import recordings as recordings_commands
from medhotline.commands import routing as routing_commands
from medhotline.commands import speech as speech_commands
from medhotline.commands import stats as stats_commands
from medhotline.commands import supervise as supervise_commands
from medhotline.commands import surge as surge_commands
from medhotline.commands import vaccination as vaccination_commands
from medhotline.commands.audit import prove_command, verify_command
from medhotline.demo import SCENES, run_demo
from medhotline.prompts import build_prompts
from medhotline.sandbox import Sandbox
from medhotline.service import run_service

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "CommandError", "main"]


def _cmd_asterisk(config: Config, args: argparse.Namespace) -> int:

    sandbox = Sandbox(config)
    if args.action == "up":
        status = sandbox.up()
        print(f"asterisk sandbox {status.instance!r} running (pid {status.pid}): {status.version or '?'}")
        ast = config.asterisk
        print(
            f"  SIP udp {ast.host}:{ast.sip_port}  ARI http {ast.host}:{ast.ari_port}  AMI {ast.host}:{ast.ami_port}"
            f"  RTP {ast.rtp_start}-{ast.rtp_end}"
        )
        return EXIT_OK
    if args.action == "down":
        stopped = sandbox.down()
        print(f"asterisk sandbox {sandbox.instance!r} {'stopped' if stopped else 'was not running'}")
        return EXIT_OK
    if args.action == "status":
        status = sandbox.status()
        if status.running:
            print(f"running (pid {status.pid}) {status.version or ''}".rstrip())
            return EXIT_OK
        print("not running")
        return EXIT_NOT_RUNNING  # like `systemctl status`: scripts can tell "stopped" from "failed"
    return sandbox.cli(" ".join(args.command) if args.command else None)


def _cmd_db(config: Config, args: argparse.Namespace) -> int:

    if args.action in db_roles.ACTIONS:
        return db_roles.command(config, args)
    if args.role:
        print(f"medhotline: db {args.action} takes no role name", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "upgrade":
        db.upgrade(config.database_url)
        print(f"database at revision {db.current_revision(config.database_url)}")
    else:
        print(db.current_revision(config.database_url) or "(empty database)")
    return EXIT_OK


def _cmd_prompts(config: Config, args: argparse.Namespace) -> int:

    report = build_prompts(config)
    print(f"prompts: {report.rendered} rendered, {report.cached} cached, in {report.directory}")
    return EXIT_OK


def _cmd_serve(config: Config, args: argparse.Namespace) -> int:

    return run_service(config)


def _cmd_demo(config: Config, args: argparse.Namespace) -> int:

    return run_demo(config, calls=args.calls, keep_running=args.keep_running, config_path=args.config)


def _triage_text(call: CallRecord) -> str:
    """The call's triage in one word: its level, ``!`` when an agent upgraded it, ``?`` when the caller was asked."""
    if call.triage_level is None:
        return "emergency!" if call.upgraded_at is not None else "-"
    return call.triage_level + ("?" if call.triage_confirm_asked else "") + ("!" if call.upgraded_at else "")


def _show_call(call: CallRecord) -> None:
    """Every column of the call record but none of what the caller said (the record never has it)."""

    def when(at: datetime | None) -> str:
        return at.isoformat(timespec="seconds") if at is not None else "-"

    rows = [
        ("call", call.id),
        ("node", call.node),
        ("transport", f"{call.transport} ({call.channel_name})"),
        ("flow", f"{call.flow} {call.flow_version or ''}".rstrip()),
        ("started", when(call.started_at)),
        ("answered", when(call.answered_at)),
        ("ended", when(call.ended_at)),
        ("outcome", call.outcome + (f" ({call.error})" if call.error else "")),
        ("last step", call.last_step or "-"),
        ("route", f"{call.route_category or '-'} priority={call.route_priority or '-'}"),
        ("transfer to", call.transfer_to or "-"),
    ]
    if call.triage_level is not None:
        confidence = f"{call.triage_confidence:.2f}" if call.triage_confidence is not None else "-"
        rows.append(
            ("triage", f"{call.triage_level} confidence={confidence} discriminator={call.triage_discriminator or '-'}")
        )
        asked = f"asked, answer={call.triage_confirm_answer or '-'}" if call.triage_confirm_asked else "not asked"
        rows.append(("confirmation", asked))
    if call.speech_admission is not None:
        listened = "listened to" if call.speech_admission == "admitted" else "refused (no recognizer free: key menu)"
        rows.append(("speech", listened))
    if call.upgraded_at is not None:
        rows.append(("upgraded", f"to emergency by {call.upgraded_by} at {when(call.upgraded_at)}"))
    for label, value in rows:
        print(f"{label + ':':<14}{value}")


def _cmd_calls(config: Config, args: argparse.Namespace) -> int:

    db.ensure_current(config.database_url)
    sessions = db.make_sessionmaker(config.database_url)
    try:
        return _calls(db.CallRepository(sessions), args)
    finally:
        # The engine's pooled connection is closed here, not left for the garbage collector (an open psycopg
        # connection collected later is a ResourceWarning in whatever runs then).
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        engine.dispose()


def _calls(repo: db.CallRepository, args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.call_id:
            raise CommandError("calls show needs a CALL_ID (see `medhotline calls list`)")
        call = repo.get(args.call_id)
        if call is None:
            raise CommandError(f"no call {args.call_id!r} recorded")
        _show_call(call)
        return EXIT_OK
    if args.call_id:
        raise CommandError("calls list takes no CALL_ID (use `calls show CALL_ID`)")
    for call in repo.list_recent(args.limit):
        print(
            f"{call.id}  {call.started_at:%Y-%m-%d %H:%M:%S}  {call.transport:<7}  {call.flow:<10}  "
            f"{call.outcome:<15}  {_triage_text(call):<11}  {call.last_step or '-'}"
        )
    return EXIT_OK


def _cmd_flows(config: Config, args: argparse.Namespace) -> int:

    if args.action == "check":
        paths = [Path(p) for p in args.paths] or [config.hotline.flows_dir]
        sounds_dir = args.sounds_dir or config.prompts.sounds_dir
        return flow_tools.print_check(paths, sounds_dir)
    if args.action == "show":
        if len(args.paths) != 1:
            print("medhotline: flows show needs exactly one flow name", file=sys.stderr)
            return EXIT_USAGE
        return flow_tools.print_show(config.hotline.flows_dir, args.paths[0], dot=args.dot)
    if args.paths:
        print("medhotline: flows schema takes no arguments", file=sys.stderr)
        return EXIT_USAGE
    return flow_tools.print_schema(config.hotline.flows_dir / flow_tools.SCHEMA_FILE if args.write else None)


def _cmd_keywords(config: Config, args: argparse.Namespace) -> int:

    if args.action == "classify":
        if args.paths:
            print("medhotline: keywords classify reads stdin and takes no arguments", file=sys.stderr)
            return EXIT_USAGE
        return commands.classify_stream(sys.stdin.buffer, sys.stdout, sys.stderr, args.lexicon)
    paths = [Path(p) for p in args.paths] or [args.lexicon or DEFAULT_LEXICON_DIR]
    return commands.print_check(paths)


def _cmd_models(config: Config, args: argparse.Namespace) -> int:

    return fetch_command(args.name, args.dest or config.service.state_dir / "models", args.sha256)


def _cmd_keyservice(config: Config, args: argparse.Namespace) -> int:

    state = config.service.state_dir
    token_path = state / "keyservice.token"
    if not token_path.exists():
        # The clients' shared secret, created once; clients on this host read the same 0600 file.
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    ks = config.keyservice
    files = ks.tls_files()
    # listen: also serve mutual TLS for nodes on other hosts; the socket stays for this host's own clients.
    tls_files = (ks.listen, *files) if ks.listen and files else None
    return run_keyservice(
        ks.directory,
        config.keyservice_socket,
        token_path,
        {os.getuid()},
        tls_files=tls_files,
        tls_clients=frozenset(ks.clients),
    )


def _cmd_audit(config: Config, args: argparse.Namespace) -> int:

    public_key = args.public_key or config.audit_key_dir / Ed25519Signer.PUBLIC_FILE
    if args.action == "verify":
        witness = HeadWitness(config.audit_key_dir, config.audit_witness_file)
        return verify_command(config.database_url, public_key, witness=witness)
    if args.seq is None:
        raise CommandError("audit prove needs the entry number: medhotline audit prove N")
    return prove_command(config.database_url, args.seq, public_key)


def _feature_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Feature packages own their command groups (agents, credentials, patients, keys, accounts, break-glass)."""
    for register in (
        recordings_commands.register,
        scheduler_commands.register,
        vaccination_commands.register,
        routing_commands.register,
        surge_commands.register,
        supervise_commands.register,
        his_commands.register,
        his_link_commands.register,
        key_commands.register,
        access_commands.register,
        stats_commands.register,
        quality_commands.register,
        complaints_commands.register,
        api_commands.register,
        speech_commands.register,
        cluster_commands.register,
    ):
        register(sub)


def _calls_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    calls = sub.add_parser("calls", help="recent calls from the database (list), or one call's record (show)")
    calls.add_argument("action", choices=["list", "show"])
    calls.add_argument("call_id", nargs="?", metavar="CALL_ID", help="show: the call")
    calls.add_argument("--limit", type=int, default=20)
    calls.set_defaults(func=_cmd_calls)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medhotline", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--config", type=Path, help="configuration file (default: $MEDHOTLINE_CONFIG or ./medhotline.toml)"
    )
    sub = parser.add_subparsers(dest="group", required=True)

    ast = sub.add_parser("asterisk", help="the embedded Asterisk sandbox")
    ast.add_argument("action", choices=["up", "down", "status", "cli"])
    ast.add_argument("command", nargs="*", help="for `cli`: one CLI command to run (default: interactive console)")
    ast.set_defaults(func=_cmd_asterisk)

    dbp = sub.add_parser("db", help="database schema")
    dbp.add_argument("action", choices=["upgrade", "current", "grant-service-role", "check-service-role"])
    dbp.add_argument("role", nargs="?", help="grant-/check-service-role: the service's PostgreSQL role")
    dbp.set_defaults(func=_cmd_db)

    prompts = sub.add_parser("prompts", help="render the flows' prompt texts to audio")
    prompts.add_argument("action", choices=["build"])
    prompts.set_defaults(func=_cmd_prompts)

    flows = sub.add_parser("flows", help="check, show and describe the IVR flows in YAML")
    flows.add_argument("action", choices=["check", "show", "schema"])
    flows.add_argument(
        "paths",
        nargs="*",
        metavar="PATH|NAME",
        help="check: files or directories (default: hotline.flows_dir); show: a flow name",
    )
    flows.add_argument("--dot", action="store_true", help="show: Graphviz dot instead of text")
    flows.add_argument("--write", action="store_true", help="schema: write flow.schema.json into hotline.flows_dir")
    flows.add_argument("--sounds-dir", type=Path, help="check: also check `file:` prompts exist in this directory")
    flows.set_defaults(func=_cmd_flows)

    keywords = sub.add_parser("keywords", help="classify utterances; check the keyword lexicon")
    keywords.add_argument("action", choices=["classify", "check"])
    keywords.add_argument(
        "paths", nargs="*", metavar="PATH", help="check: lexicon files or directories (default: keywords/lexicon)"
    )
    keywords.add_argument("--lexicon", type=Path, help="lexicon directory (default: keywords/lexicon)")
    keywords.set_defaults(func=_cmd_keywords)

    keyservice = sub.add_parser("keyservice", help="run the key service (holds the key-encryption keys)")
    keyservice.set_defaults(func=_cmd_keyservice)

    audit = sub.add_parser("audit", help="verify the audit trail, or prove one entry's inclusion")
    audit.add_argument("action", choices=["verify", "prove"])
    audit.add_argument("seq", nargs="?", type=int, help="prove: the entry number")
    audit.add_argument("--public-key", type=Path, help="the tree-head signing public key (PEM)")
    audit.set_defaults(func=_cmd_audit)

    models = sub.add_parser("models", help="speech models for deployers (needs internet access)")
    models.add_argument("action", choices=["fetch"])
    models.add_argument("name", help="small-cn (vosk-model-small-cn-0.22, 44 MB) or cn (vosk-model-cn-0.22, 1.4 GB)")
    models.add_argument("--dest", type=Path, help="directory for models (default: <state_dir>/models)")
    models.add_argument("--sha256", help="SHA-256 of the archive, from a copy you trust (required)")
    models.set_defaults(func=_cmd_models)

    serve = sub.add_parser("serve", help="run the hotline service (ARI, AMI, FastAGI)")
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="sandbox + service + simulated patient calls, then a summary")
    demo.add_argument("--calls", type=int, default=len(SCENES), help=f"simulated patient calls (default {len(SCENES)})")
    demo.add_argument("--keep-running", action="store_true", help="leave Asterisk and the service running")
    demo.set_defaults(func=_cmd_demo)

    _calls_command(sub)
    _feature_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"medhotline: {exc}", file=sys.stderr)
        return EXIT_USAGE

    configure_logging(config.service.log_level, config.service.log_file)
    func: Callable[[Config, argparse.Namespace], int] = args.func
    try:
        return func(config, args)
    except MedhotlineError as exc:
        print(f"medhotline: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
