"""``medhotline quality check|queue|review``: quality control of finished calls (docs/quality.md).

``check`` checks every finished call not yet checked against the rules (idempotent: each call once); ``queue``
lists the calls waiting for review (call ids, categories, flags: never a caller); ``review`` scores a call with the
form, through the access policy, sealed as a signed amendment of the call record.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import sessionmaker

from compliance.access import AccessError, Resource
from compliance.access_records import AccessDenied
from compliance.access_store import AccessControl
from compliance.accounts import ACCOUNT_ID
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.clock import HOSPITAL_TZ
from ground.errors import CommandError
from medhotline.commands.keys import run_keyed
from medhotline.commands.stats import parse_when
from medhotline.quality.rules import QualityRules, QualityRulesError, load_rules
from medhotline.quality.service import QualityError, check_calls, parse_scores, review_call, sample_key
from medhotline.quality.store import QualityStore
from recordings.records import open_sealer
from routing.statistics import StatsSettings

if TYPE_CHECKING:
    from ground.config import Config
    from medhotline.commands.keys import KeyedDatabase


def rules_path(config: Config) -> Path:
    return config.quality.rules_file or config.hotline.flows_dir / "quality" / "rules.yaml"


def _rules(config: Config) -> QualityRules:
    try:
        return load_rules(rules_path(config))
    except QualityRulesError as exc:
        raise CommandError(f"quality rules refused:\n{exc}") from None


def _settings(config: Config) -> StatsSettings:
    s = config.statistics
    return StatsSettings(s.service_level_seconds, s.emergency_target_seconds, s.short_abandon_seconds,
                         s.wrap_up_max_seconds)  # fmt: skip


def _cmd_check(config: Config, args: argparse.Namespace) -> int:
    rules = _rules(config)
    since = parse_when(args.since, "--since")[0] if args.since else None
    try:
        key = sample_key(config.quality.sample_key_file or config.service.state_dir / "quality" / "sample.key")
    except QualityError as exc:
        raise CommandError(str(exc)) from None
    with db.current_engine(config.database_url) as engine:
        run = check_calls(engine, rules, _settings(config), key, datetime.now(UTC), since=since)
    print(f"checked {run.checked} call(s): {run.flagged} flagged, {run.queued} for review")
    return 0


def _account(value: str) -> str:
    if not ACCOUNT_ID.match(value):
        raise CommandError("--as must be an account id (2-64 of a-z 0-9 _ . - starting with a letter)")
    return value


def _cmd_queue(config: Config, args: argparse.Namespace) -> int:
    reader = _account(args.as_)
    with db.current_engine(config.database_url) as engine:
        access = AccessControl.for_engine(engine, AuditLog(SqlAuditStore(engine)))
        try:
            access.authorize(reader, "read", Resource("quality_review"), datetime.now(UTC))
        except AccessDenied as exc:
            raise CommandError(str(exc)) from None
        entries = QualityStore.for_engine(engine).queue()
    print(f"{len(entries)} call(s) for review")
    for e in entries:
        flags = ", ".join(f"{f.rule}({f.severity})" for f in e.flags) or "-"
        ended = e.ended_at.astimezone(HOSPITAL_TZ)
        print(f"{e.call_id}  {ended:%Y-%m-%d %H:%M}  {e.category or '-':<12} {'sample' if e.sampled else '':<6} "
              f"{flags}")  # fmt: skip
    return 0


def _cmd_review(config: Config, args: argparse.Namespace) -> int:
    rules = _rules(config)
    reviewer = _account(args.as_)
    try:
        scores = parse_scores(args.scores, rules.form)
    except QualityError as exc:
        raise CommandError(str(exc)) from None

    async def work(keyed: KeyedDatabase) -> str:
        sealer = open_sealer(config, sessionmaker(keyed.engine, expire_on_commit=False), keyed.keys, keyed.audit)
        sealed = await review_call(keyed.engine, sealer, keyed.audit, rules, call_id=args.call, scores=scores,
                                   reviewer=reviewer, reason=args.reason or "", now=datetime.now(UTC))  # fmt: skip
        return sealed.id

    try:
        record_id = run_keyed(config, work)
    except (AccessDenied, AccessError, QualityError) as exc:
        raise CommandError(str(exc)) from None
    print(f"review of call {args.call} sealed as signed amendment {record_id}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline quality`` to the ``medhotline`` parser."""
    quality = sub.add_parser("quality", help="quality control of finished calls (docs/quality.md)")
    actions = quality.add_subparsers(dest="quality_action", required=True)
    check = actions.add_parser("check", help="check every finished call not yet checked (each once)")
    check.add_argument("--since", metavar="WHEN", help="only calls ended from YYYY-MM-DD[THH:MM] (local time)")
    check.set_defaults(func=_cmd_check)
    queue = actions.add_parser("queue", help="the calls waiting for review (no patient identifiers)")
    queue.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
    queue.set_defaults(func=_cmd_queue)
    review = actions.add_parser("review", help="score a call with the form; sealed as a signed amendment")
    review.add_argument("call", metavar="CALL_ID")
    review.add_argument("--scores", required=True, help="criterion=score,… (every criterion of the form)")
    review.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
    review.add_argument("--reason", required=True, help="why (audited, sealed with the score)")
    review.set_defaults(func=_cmd_review)
