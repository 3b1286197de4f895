"""``medhotline followups …``, ``tasks …``, ``dnc …`` and ``reminders …``: outreach from the command line.

``followups add`` creates a plan (the running leader turns it into a persisted job within seconds); ``run-now``
makes a plan due at once; ``list`` shows plans with their next due time and last attempts. ``tasks`` lists and
closes the work outreach created for people (recalls, unreachable patients, unconfirmed medication). ``dnc``
keeps the do-not-call list (numbers are read from standard input and stored as a keyed blind index only).
``reminders add`` creates a medication reminder (by call, needing the patient's double confirmation, or SMS).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from sqlalchemy.orm import sessionmaker

from ground import db
from ground.errors import CommandError
from ground.operator import actor_id
from his.registry import PatientRegistry, check_patient_id
from his.tables import PatientStore
from ivr.flow_loader import load_flows
from medhotline.commands.keys import run_keyed
from scheduler.do_not_call import DoNotCallList
from scheduler.medication import MedicationStore
from scheduler.policy import PolicyError, Window, parse_hhmm
from scheduler.store import AttemptStore, PlanStore, Threshold
from scheduler.tasks import TaskStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ground.config import Config
    from medhotline.commands.keys import KeyedDatabase
    from scheduler.store import Threshold

EXIT_OK: Final = 0
_THRESHOLD: Final = re.compile(r"^([a-z][a-z0-9_]{0,31})=(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)$")
CONDITIONS: Final = ("hypertension", "diabetes", "heart_failure", "copd", "other")
# Plausible defaults per condition, overridable with --threshold: outside [low, high] is abnormal.
DEFAULT_THRESHOLDS: Final[dict[str, dict[str, tuple[float, float]]]] = {
    "hypertension": {"systolic": (90, 139), "diastolic": (60, 89)},
    "diabetes": {"glucose": (3.9, 10.0)},  # mmol/L, as the diabetes flow collects it ("7*2#" is 7.2)
}


def _now() -> datetime:
    return datetime.now(UTC)


def _engine(config: Config) -> AbstractContextManager[Engine]:

    return db.current_engine(config.database_url)


def _thresholds(condition: str, given: list[str]) -> dict[str, Threshold]:

    result = {k: Threshold(lo, hi) for k, (lo, hi) in DEFAULT_THRESHOLDS.get(condition, {}).items()}
    for text in given:
        match = _THRESHOLD.match(text)
        if match is None:
            raise CommandError(f"--threshold {text!r}: write NAME=LOW-HIGH, e.g. systolic=90-139")
        low, high = float(match.group(2)), float(match.group(3))
        if low >= high:
            raise CommandError(f"--threshold {text!r}: LOW must be below HIGH")
        result[match.group(1)] = Threshold(low, high)
    return result


def _cmd_add(config: Config, args: argparse.Namespace) -> int:

    patient = check_patient_id(args.patient)
    try:
        window = Window.parse(args.window, "--window")
    except PolicyError as exc:
        raise CommandError(str(exc)) from None
    if args.flow not in _flows(config):
        raise CommandError(f"--flow {args.flow!r}: no such flow in {config.hotline.flows_dir}")
    thresholds = _thresholds(args.condition, args.threshold)
    now = _now()
    first = now + timedelta(days=args.first_in_days, minutes=args.first_in_minutes)
    with _engine(config) as engine:
        plan = PlanStore.for_engine(engine).add(
            patient_id=patient,
            condition=args.condition,
            interval_days=args.every,
            window=(f"{window.start:%H:%M}", f"{window.end:%H:%M}"),
            flow=args.flow,
            thresholds=thresholds,
            responsible=args.responsible,
            first_due=first,
            at=now,
            by=actor_id(args.as_),
        )
    print(plan.id)
    return EXIT_OK


def _flows(config: Config) -> set[str]:

    return set(load_flows(config.hotline.flows_dir))


def _cmd_list(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        plans = PlanStore.for_engine(engine).all()
        attempts = AttemptStore.for_engine(engine)
        for plan in plans:
            limits = ", ".join(f"{k} {t.low:g}-{t.high:g}" for k, t in sorted(plan.thresholds.items()))
            state = "active" if plan.active else "ended"
            print(
                f"{plan.id}  {plan.condition:<13} every {plan.interval_days}d {plan.window}  flow {plan.flow}  "
                f"next {plan.next_due_at:%Y-%m-%d %H:%M} UTC  {state}  [{limits}]"
            )
            for attempt in attempts.for_subject(plan.id)[-args.attempts :] if args.attempts else []:
                when = f"{attempt.not_before:%Y-%m-%d %H:%M}"
                print(f"    attempt {attempt.attempt} {attempt.state:<9} {attempt.outcome or '':<16} {when}")
    if not plans:
        print("no follow-up plans", file=sys.stderr)
    return EXIT_OK


def _cmd_run_now(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        store = PlanStore.for_engine(engine)
        store.get(args.plan)
        store.set_due(args.plan, _now())
    print(f"plan {args.plan} is due now: the scheduler's leader calls within seconds (calling hours permitting)")
    return EXIT_OK


def _cmd_end(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        if not PlanStore.for_engine(engine).deactivate(args.plan):
            raise CommandError(f"plan {args.plan} is not active")
    print(f"plan {args.plan} ended")
    return EXIT_OK


def _cmd_tasks(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        store = TaskStore.for_engine(engine)
        if args.close:
            if args.as_ is None:
                raise CommandError("tasks --close needs --as ACCOUNT")
            if not store.close(args.close, args.as_, _now()):
                raise CommandError(f"task {args.close} is not open")
            print(f"task {args.close} closed")
            return EXIT_OK
        for task in store.open_tasks(kind=args.kind):
            who = task.assignee or f"any {task.role}"
            print(
                f"{task.id}  {task.created_at:%Y-%m-%d %H:%M}  {task.kind:<24} for {who:<20} patient {task.patient_id}"
            )
    return EXIT_OK


def _read_phone() -> str:

    text = sys.stdin.read().strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise CommandError('dnc reads {"phone": "..."} as JSON on standard input (never an argument)') from None
    phone = data.get("phone") if isinstance(data, dict) else None
    if not isinstance(phone, str) or not phone.strip():
        raise CommandError('dnc needs {"phone": "..."} on standard input')
    return phone


_DNC_SAID: Final = {
    ("add", True): "on the do-not-call list: no outreach call will be placed to it",
    ("add", False): "on the do-not-call list: no outreach call will be placed to it",
    ("remove", True): "removed from the do-not-call list",
    ("remove", False): "was not on the do-not-call list",
}


def _cmd_dnc(config: Config, args: argparse.Namespace) -> int:

    actor = actor_id(args.as_)
    phone = _read_phone() if args.dnc_action in ("add", "remove") else ""

    async def work(keyed: KeyedDatabase) -> str:
        registry = PatientRegistry(PatientStore.for_engine(keyed.engine), keyed.ring, keyed.keys, audit=keyed.audit)
        numbers = DoNotCallList.for_engine(keyed.engine, registry, keyed.audit)
        if args.dnc_action == "list":
            return f"{await numbers.count()} number(s) on the do-not-call list"
        change = numbers.add if args.dnc_action == "add" else numbers.remove
        return _DNC_SAID[args.dnc_action, await change(phone, actor=actor, reason=args.reason)]

    print(run_keyed(config, work))
    return EXIT_OK


def _cmd_reminder_add(config: Config, args: argparse.Namespace) -> int:

    patient = check_patient_id(args.patient)
    parse_hhmm(args.at, "--at")
    data = json.loads(sys.stdin.read()) if args.from_json else {"medication": args.medication, "dose": args.dose}

    async def work(keyed: KeyedDatabase) -> str:

        store = MedicationStore(sessionmaker(keyed.engine, expire_on_commit=False))
        return await store.add(
            keyed.ring,
            patient_id=patient,
            medication=str(data["medication"]),
            dose=str(data["dose"]),
            at_time=args.at,
            channel=args.channel,
            responsible=args.responsible,
            now=_now(),
        )

    print(run_keyed(config, work))
    return EXIT_OK


def _cmd_reminder_run_now(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        MedicationStore.for_engine(engine).advance(args.reminder, _now())  # names an unknown reminder
    print(f"reminder {args.reminder} is due now")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    followups = sub.add_parser("followups", help="chronic-disease follow-up plans: add, list, run-now, end")
    actions = followups.add_subparsers(dest="followups_action", required=True)
    add = actions.add_parser("add", help="a follow-up plan for a patient (prints the plan id)")
    add.add_argument("--patient", required=True, help="the registry's patient id")
    add.add_argument("--condition", required=True, choices=CONDITIONS)
    add.add_argument("--every", type=int, required=True, metavar="DAYS", help="days between calls")
    add.add_argument("--window", default="09:00-18:00", help="local hours the patient may be called (HH:MM-HH:MM)")
    add.add_argument("--flow", default="followup", help="the flow the call runs (default: followup)")
    add.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NAME=LOW-HIGH",
        help="normal range of a reading; outside it the responsible physician gets a recall task",
    )
    add.add_argument("--responsible", metavar="ACCOUNT", help="the physician who gets recall tasks")
    add.add_argument("--first-in-days", type=int, default=0, help="first call after this many days (default: now)")
    add.add_argument("--first-in-minutes", type=int, default=0, help="… and minutes")
    add.add_argument("--as", dest="as_", metavar="ACCOUNT")
    add.set_defaults(func=_cmd_add)
    lst = actions.add_parser("list", help="plans, next due time and recent attempts")
    lst.add_argument("--attempts", type=int, default=3, help="how many recent attempts per plan to show")
    lst.set_defaults(func=_cmd_list)
    run_now = actions.add_parser("run-now", help="make a plan due now")
    run_now.add_argument("plan")
    run_now.set_defaults(func=_cmd_run_now)
    end = actions.add_parser("end", help="end a plan (its history stays)")
    end.add_argument("plan")
    end.set_defaults(func=_cmd_end)

    tasks = sub.add_parser("tasks", help="open clinical tasks from outreach (recalls, unreachable, unconfirmed)")
    tasks.add_argument("--kind", choices=("recall", "unreachable", "medication_not_confirmed", "adverse_reaction"))
    tasks.add_argument("--close", metavar="TASK_ID")
    tasks.add_argument("--as", dest="as_", metavar="ACCOUNT")
    tasks.set_defaults(func=_cmd_tasks)

    dnc = sub.add_parser("dnc", help='the do-not-call list (the number as {"phone": ...} on standard input)')
    dnc.add_argument("dnc_action", choices=("add", "remove", "list"))
    dnc.add_argument("--reason", default="patient request")
    dnc.add_argument("--as", dest="as_", metavar="ACCOUNT")
    dnc.set_defaults(func=_cmd_dnc)

    reminders = sub.add_parser("reminders", help="medication reminders (call with double confirmation, or SMS)")
    ractions = reminders.add_subparsers(dest="reminders_action", required=True)
    radd = ractions.add_parser("add", help="a daily medication reminder (prints its id)")
    radd.add_argument("--patient", required=True)
    radd.add_argument("--at", required=True, metavar="HH:MM", help="local time of the reminder")
    radd.add_argument("--channel", choices=("call", "sms"), default="call")
    radd.add_argument("--medication")
    radd.add_argument("--dose")
    radd.add_argument("--from-json", action="store_true", help='read {"medication": ..., "dose": ...} from stdin')
    radd.add_argument("--responsible", metavar="ACCOUNT", help="who is told when the patient does not confirm")
    radd.set_defaults(func=_cmd_reminder_add)
    rnow = ractions.add_parser("run-now", help="make a reminder due now")
    rnow.add_argument("reminder")
    rnow.set_defaults(func=_cmd_reminder_run_now)
