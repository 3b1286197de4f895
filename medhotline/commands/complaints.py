"""``medhotline complaints open|refer|resolve|answer|list|overdue``: 12320 complaint tasks (docs/complaints.md).

Thin: parse, call one :class:`scheduler.complaints.ComplaintDesk` method (authorised by the access policy, kind
``complaint``, and audited), print. Times are now unless ``--at`` (local ``YYYY-MM-DDTHH:MM``) says when it
happened (a complaint taken on paper during an outage); deadlines count in working days (``[complaints]``).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from compliance.access import AccessError
from compliance.access_records import AccessDenied
from compliance.accounts import ACCOUNT_ID
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.clock import HOSPITAL_TZ
from ground.errors import CommandError
from medhotline.commands.stats import parse_when
from scheduler.complaint_core import CATEGORIES, SURVEY_MAX, SURVEY_MIN, ComplaintError
from scheduler.complaints import ComplaintDesk, ComplaintRules, StoredComplaint

if TYPE_CHECKING:
    from ground.config import Config


def rules_of(config: Config) -> ComplaintRules:
    """The working-day rules from ``[complaints]`` (validated when the configuration was loaded)."""
    return ComplaintRules.of(config.complaints)


def _account(value: str) -> str:
    if not ACCOUNT_ID.match(value):
        raise CommandError("--as must be an account id (2-64 of a-z 0-9 _ . - starting with a letter)")
    return value


def _at(args: argparse.Namespace) -> datetime:
    return parse_when(args.at, "--at")[0] if getattr(args, "at", None) else datetime.now(UTC)


def _local(at: datetime | None) -> str:
    return "-" if at is None else f"{at.astimezone(HOSPITAL_TZ):%Y-%m-%d %H:%M}"


def _run(config: Config, args: argparse.Namespace) -> int:
    actor = _account(args.as_)
    at = _at(args)
    rules = rules_of(config)
    with db.current_engine(config.database_url) as engine:
        desk = ComplaintDesk(engine, AuditLog(SqlAuditStore(engine)), rules)
        try:
            _dispatch(desk, actor, at, args)
        except (AccessDenied, AccessError, ComplaintError) as exc:
            raise CommandError(str(exc)) from None
    return 0


def _print_task(desk: ComplaintDesk, s: StoredComplaint) -> None:
    t = s.task
    due = desk.deadlines(t)
    score = "-" if t.survey_score is None else str(t.survey_score)
    print(f"{t.id}  {t.state:<8} {t.category:<8} {t.department or '-':<14} received {_local(t.received_at)}  "
          f"refer by {_local(due.refer_by)}  resolve by {_local(due.resolve_by)}  answer by {_local(due.answer_by)}"
          f"  score {score}  call {s.call_id}  {s.summary}")  # fmt: skip


def _dispatch(desk: ComplaintDesk, actor: str, at: datetime, args: argparse.Namespace) -> None:
    action = args.complaints_action
    if action == "open":
        stored = desk.open(actor, call_id=args.call, category=args.category, summary=args.summary, received_at=at,
                           patient_id=args.patient)  # fmt: skip
        due = desk.deadlines(stored.task)
        print(f"complaint {stored.task.id} opened: refer by {_local(due.refer_by)}, "
              f"resolve by {_local(due.resolve_by)}")  # fmt: skip
    elif action == "refer":
        task = desk.refer(actor, args.complaint, args.department, at)
        print(f"complaint {task.id} referred to {task.department}")
    elif action == "resolve":
        task, attempt = desk.resolve(actor, args.complaint, at)
        due = desk.deadlines(task)
        survey = f"survey call scheduled ({attempt})" if attempt else "no patient id: call back by hand"
        print(f"complaint {task.id} resolved; answer by {_local(due.answer_by)}; {survey}")
    elif action == "answer":
        task = desk.answer(actor, args.complaint, at, args.score)
        print(f"complaint {task.id} answered; satisfaction {task.survey_score or '-'}")
    elif action == "list":
        found = desk.listing(actor, at, open_only=not args.all, department=args.department)
        print(f"{len(found)} complaint task(s)")
        for stored in found:
            _print_task(desk, stored)
    else:
        overdue = desk.overdue(actor, at, args.department)
        print(f"{len(overdue)} overdue step(s)")
        for o in overdue:
            print(f"{o.complaint_id}  {o.stage:<8} due {_local(o.due)}  {o.category:<8} {o.department or '-'}")


def _score(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not SURVEY_MIN <= value <= SURVEY_MAX:
        raise argparse.ArgumentTypeError(f"{value} is outside {SURVEY_MIN}..{SURVEY_MAX}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline complaints`` to the ``medhotline`` parser."""
    complaints = sub.add_parser("complaints", help="12320 complaint tasks and their deadlines (docs/complaints.md)")
    actions = complaints.add_subparsers(dest="complaints_action", required=True)

    def action(name: str, help_: str, *, at: bool = True) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_)
        parser.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
        if at:
            parser.add_argument("--at", metavar="WHEN", help="when it happened, YYYY-MM-DDTHH:MM local (default now)")
        parser.set_defaults(func=_run)
        return parser

    opened = action("open", "a complaint received: becomes a task with deadlines")
    opened.add_argument("--call", required=True, metavar="CALL_ID", help="the call it came in on")
    opened.add_argument("--category", required=True, choices=CATEGORIES)
    opened.add_argument("--summary", required=True, help="what it is about: no names, no numbers")
    opened.add_argument("--patient", metavar="PATIENT_ID", help="the registry's pseudonymous id, for the callback")
    refer = action("refer", "referred to the department concerned")
    refer.add_argument("complaint", metavar="COMPLAINT_ID")
    refer.add_argument("--department", required=True)
    resolve = action("resolve", "resolved by the department; schedules the survey call")
    resolve.add_argument("complaint", metavar="COMPLAINT_ID")
    answer = action("answer", "the patient called back; record the satisfaction score")
    answer.add_argument("complaint", metavar="COMPLAINT_ID")
    answer.add_argument("--score", type=_score, help=f"satisfaction {SURVEY_MIN}-{SURVEY_MAX} (omit if declined)")
    listing = action("list", "open complaint tasks with their deadlines", at=False)
    listing.add_argument("--all", action="store_true", help="answered ones too")
    listing.add_argument("--department", help="only those referred to this department (clinical staff)")
    overdue = action("overdue", "steps past their working-day deadline, oldest first", at=False)
    overdue.add_argument("--department", help="only those referred to this department")
