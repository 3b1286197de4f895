"""``medhotline accounts …``, ``medhotline breakglass …`` and ``medhotline access …``: staff accounts, break-glass
grants and access questions, from the shell.

Every change goes through :class:`compliance.access_store.AccessControl`, so it is checked and audited exactly as
the service would: the actor is ``--by ACCOUNT`` when given (that account must hold the role the change needs and
is checked against the database), else the OS user at the shell (``os:<user>``, role ``operator``: whoever runs
this has database access anyway, and the audit trail says who it was). Listings never print a patient id; a
grant for one patient shows as "one patient".
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from compliance.access import ACTIONS, BLIND_ID, MAX_BREAK_GLASS_MINUTES, RECORD_KINDS, VERDICTS, Resource
from compliance.access_store import AccessControl, cli_actor
from ground import db
from ground.errors import CommandError
from his import PatientStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.access_store import AccessControl, BreakGlassGrant, FreezeResult, PatientRef
    from ground.config import Config

EXIT_OK = 0
EXIT_DENIED = 1
ROLE_NAMES = "agent, nurse, pharmacist, physician, supervisor, admin, auditor"


def _now() -> datetime:
    return datetime.now(UTC)


class _OwnRef:
    """A hex patient id (not a registry UUID) is its own audit reference; its department is not known."""

    def __init__(self, patient_id: str) -> None:
        self.blind_id = patient_id
        self.department: str | None = None


class _RegistryRefs:
    """Patients' blind ids and departments from the registry (``his.PatientStore``) for registry ids (UUIDs)."""

    def __init__(self, engine: Engine) -> None:

        self._store = PatientStore.for_engine(engine)

    def ref(self, patient_id: str) -> PatientRef:

        if BLIND_ID.fullmatch(patient_id):
            return _OwnRef(patient_id)
        return self._store.ref(patient_id)


@contextmanager
def _service(config: Config) -> Iterator[AccessControl]:
    """The access service over the configured database (schema checked first); the engine is disposed after."""

    with db.current_engine(config.database_url) as engine:
        yield AccessControl.for_engine(engine, patients=_RegistryRefs(engine))


def _when(at: datetime | None) -> str:
    return "-" if at is None else f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


# --- accounts --------------------------------------------------------------------------------------------------


def _cmd_accounts_add(config: Config, args: argparse.Namespace) -> int:

    with _service(config) as service:
        record = service.add_account(
            args.id, args.name, args.role, _now(), actor=cli_actor(args.by), departments=args.department or ()
        )
    print(f"account {record.id} added: roles {', '.join(sorted(record.roles))}; "
          f"departments {', '.join(sorted(record.departments)) or '-'}")  # fmt: skip
    return EXIT_OK


def _cmd_accounts_list(config: Config, args: argparse.Namespace) -> int:
    with _service(config) as service:
        records = service.accounts.list()
    if not records:
        print("(no accounts)")
    for record in records:
        state = "FROZEN" if record.frozen else "active"
        print(f"{record.id:<24} {state:<7} {','.join(sorted(record.roles)):<28} "
              f"{','.join(sorted(record.departments)) or '-'}")  # fmt: skip
    return EXIT_OK


def _cmd_accounts_show(config: Config, args: argparse.Namespace) -> int:
    now = _now()
    with _service(config) as service:
        record = service.accounts.get(args.id)
        active = service.assignments(record.id, now)
        grants = service.list_break_glass(open_at=now, account_id=record.id)
    print(f"account      {record.id}")
    print(f"name         {record.display_name}")
    print(f"roles        {', '.join(sorted(record.roles))}")
    print(f"departments  {', '.join(sorted(record.departments)) or '-'}")
    if record.frozen:
        print(f"state        FROZEN since {_when(record.frozen_at)}: {record.frozen_reason}")
    else:
        print("state        active")
    print(f"epoch        {record.session_epoch}")
    responsible = sum(1 for a in active if a.kind == "responsible")
    print(f"assignments  {responsible} responsible, {len(active) - responsible} current call")
    print(f"break-glass  {len(grants)} open" + "".join(f"\n  {_grant_line(g, now)}" for g in grants))
    return EXIT_OK


def _cmd_accounts_roles(config: Config, args: argparse.Namespace) -> int:

    with _service(config) as service:
        record = service.set_roles(args.id, args.role, _now(), actor=cli_actor(args.by))
    print(f"account {record.id}: roles now {', '.join(sorted(record.roles))} (effective on the next request)")
    return EXIT_OK


def _cmd_accounts_departments(config: Config, args: argparse.Namespace) -> int:

    if bool(args.department) == args.none:
        raise CommandError("accounts departments: give --department D (repeatable) or --none to remove them all")
    with _service(config) as service:
        record = service.set_departments(args.id, args.department or (), _now(), actor=cli_actor(args.by))
    print(f"account {record.id}: departments now {', '.join(sorted(record.departments)) or '-'} "
          "(effective on the next request)")  # fmt: skip
    return EXIT_OK


def _cmd_accounts_freeze(config: Config, args: argparse.Namespace) -> int:

    # The same path as freeze_account(), which `agents freeze` calls.
    with _service(config) as service:
        result = service.freeze(args.id, args.reason, _now(), actor=cli_actor(args.by))
    print(freeze_summary(result))
    return EXIT_OK


def freeze_summary(result: FreezeResult) -> str:
    """What a freeze did, as both `accounts freeze` and `agents freeze` print it."""
    return (
        f"account {result.account.id} FROZEN: no routing, no data access, sessions before epoch "
        f"{result.account.session_epoch} invalid; {len(result.grants_closed)} break-glass grant(s) closed, "
        f"{result.sessions_closed} session(s) closed, {result.calls_ended} call assignment(s) ended"
    )


def _cmd_accounts_unfreeze(config: Config, args: argparse.Namespace) -> int:

    with _service(config) as service:
        record = service.unfreeze(args.id, args.reason or "unfrozen, no reason given", _now(), actor=cli_actor(args.by))
    print(f"account {record.id} unfrozen (earlier sessions and grants stay invalid)")
    return EXIT_OK


# --- break-glass -----------------------------------------------------------------------------------------------


def _grant_line(grant: BreakGlassGrant, now: datetime) -> str:
    if grant.closed_at is not None:
        state = f"closed {_when(grant.closed_at)} ({grant.close_reason})"
    elif grant.expires_at <= now:
        state = "expired (not yet swept)"
    else:
        state = f"OPEN until {_when(grant.expires_at)}"
    review = (
        "review pending"
        if grant.reviewed_at is None
        else f"reviewed {grant.review_verdict} by {grant.reviewed_by} {_when(grant.reviewed_at)}"
    )
    return (
        f"{grant.id}  {grant.account_id:<20} {grant.scope_text():<24} opened {_when(grant.opened_at)}  {state}; "
        f"{review}; reason: {grant.reason}"
    )


def _cmd_breakglass_open(config: Config, args: argparse.Namespace) -> int:

    if (args.patient is None) == (args.department is None):
        raise CommandError("breakglass open: give exactly one of --patient ID or --department D")
    with _service(config) as service:
        grant = service.open_break_glass(
            args.account, args.reason, _now(), patient_id=args.patient, department=args.department,
            minutes=args.minutes,
        )  # fmt: skip
    print(f"break-glass {grant.id} OPEN for {grant.account_id} ({grant.scope_text()}) until "
          f"{_when(grant.expires_at)}; audited, and listed for supervisor review")  # fmt: skip
    return EXIT_OK


def _cmd_breakglass_close(config: Config, args: argparse.Namespace) -> int:

    with _service(config) as service:
        grant = service.close_break_glass(args.id, _now(), args.reason, actor=cli_actor(args.by))
    print(f"break-glass {grant.id} closed ({grant.close_reason})")
    return EXIT_OK


def _cmd_breakglass_list(config: Config, args: argparse.Namespace) -> int:
    now = _now()
    with _service(config) as service:
        grants = service.list_break_glass(pending_review=args.pending_review, open_at=now if args.open else None)
    if not grants:
        print("(nothing pending review)" if args.pending_review else "(no break-glass grants)")
    for grant in grants:
        print(_grant_line(grant, now))
    return EXIT_OK


def _cmd_breakglass_review(config: Config, args: argparse.Namespace) -> int:
    with _service(config) as service:
        grant = service.review_break_glass(args.id, args.supervisor, _now(), args.verdict)
    print(f"break-glass {grant.id} reviewed by {grant.reviewed_by}: {grant.review_verdict}")
    return EXIT_OK


def _cmd_breakglass_sweep(config: Config, args: argparse.Namespace) -> int:
    with _service(config) as service:
        swept = service.sweep_break_glass(_now())
    print(f"{len(swept)} expired break-glass grant(s) closed and audited")
    return EXIT_OK


# --- access ------------------------------------------------------------------------------------------------------


def _cmd_access_check(config: Config, args: argparse.Namespace) -> int:

    resource = Resource(args.kind, args.patient, args.department, args.call)
    with _service(config) as service:
        decision = service.evaluate(args.account, args.action_name, resource, _now(), reason=args.reason)
    print(f"{'ALLOWED' if decision.allowed else 'DENIED'}: {decision.explanation}")
    print(f"basis: {decision.basis or '-'}; reason required: {'yes' if decision.reason_required else 'no'}; "
          f"scopes held: {', '.join(decision.scopes_held) or '-'}")  # fmt: skip
    print("(a what-if from the database as it is now: not audited, no data was accessed)")
    return EXIT_OK if decision.allowed else EXIT_DENIED


def _cmd_access_assign(config: Config, args: argparse.Namespace) -> int:

    until = None
    if args.until is not None:
        try:
            until = datetime.fromisoformat(args.until)
        except ValueError:
            raise CommandError(
                f"--until {args.until!r}: use ISO 8601 with a UTC offset, e.g. 2026-12-31T18:00+08:00"
            ) from None
        if until.tzinfo is None:
            raise CommandError(f"--until {args.until!r}: give the UTC offset, e.g. +08:00")
    with _service(config) as service:
        service.assign_patient(args.account, args.patient, _now(), actor=cli_actor(args.by), until=until)
    print(f"account {args.account} is now responsible for the patient "
          f"({'until ' + _when(until) if until else 'open-ended'})")  # fmt: skip
    return EXIT_OK


def _cmd_access_unassign(config: Config, args: argparse.Namespace) -> int:

    with _service(config) as service:
        ended = service.unassign_patient(args.account, args.patient, _now(), actor=cli_actor(args.by))
    print(f"account {args.account}: {ended} responsible assignment(s) to the patient ended")
    return EXIT_OK


# --- wiring ------------------------------------------------------------------------------------------------------


def _by(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--by", metavar="ACCOUNT", help="the staff account making the change (default: the OS user)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``accounts``, ``breakglass`` and ``access`` to the ``medhotline`` parser."""
    _register_accounts(sub)
    _register_breakglass(sub)
    _register_access(sub)


def _register_accounts(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Roles are validated (with the list of valid ones in the error) by the account store; not importing it here
    # keeps `medhotline --help` free of the database code.
    accounts = sub.add_parser("accounts", help="staff accounts: one per person, roles, departments, freeze")
    acts = accounts.add_subparsers(dest="action", required=True)
    add = acts.add_parser("add", help="add an account (ids are never reused)")
    add.add_argument("id")
    add.add_argument("--name", required=True, help="the person's display name")
    add.add_argument("--role", action="append", required=True, help=f"repeatable: {ROLE_NAMES}")
    add.add_argument("--department", action="append", help="repeatable")
    _by(add)
    add.set_defaults(func=_cmd_accounts_add)
    lst = acts.add_parser("list", help="every account")
    lst.set_defaults(func=_cmd_accounts_list)
    show = acts.add_parser("show", help="one account, its scopes and open break-glass grants")
    show.add_argument("id")
    show.set_defaults(func=_cmd_accounts_show)
    roles = acts.add_parser("roles", help="replace an account's roles (audited, effective at once)")
    roles.add_argument("id")
    roles.add_argument("--role", action="append", required=True, help=f"repeatable: {ROLE_NAMES}")
    _by(roles)
    roles.set_defaults(func=_cmd_accounts_roles)
    depts = acts.add_parser("departments", help="replace an account's departments (audited, effective at once)")
    depts.add_argument("id")
    depts.add_argument("--department", action="append", help="repeatable")
    depts.add_argument("--none", action="store_true", help="remove every department")
    _by(depts)
    depts.set_defaults(func=_cmd_accounts_departments)
    freeze = acts.add_parser("freeze", help="freeze at once: no routing, no data access, grants and sessions closed")
    freeze.add_argument("id")
    freeze.add_argument("--reason", required=True)
    _by(freeze)
    freeze.set_defaults(func=_cmd_accounts_freeze)
    unfreeze = acts.add_parser("unfreeze", help="unfreeze (earlier sessions and grants stay invalid)")
    unfreeze.add_argument("id")
    unfreeze.add_argument("--reason")
    _by(unfreeze)
    unfreeze.set_defaults(func=_cmd_accounts_unfreeze)


def _register_breakglass(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    glass = sub.add_parser("breakglass", help="break-glass grants: open, close, list, supervisor review")
    gacts = glass.add_subparsers(dest="action", required=True)
    gopen = gacts.add_parser("open", help="open a grant for one patient or one department (audited)")
    gopen.add_argument("--as", dest="account", required=True, metavar="ACCOUNT")
    gopen.add_argument("--reason", required=True, help="why, in at least 10 characters, without patient identifiers")
    gopen.add_argument("--patient", metavar="ID", help="the patient's opaque registry id")
    gopen.add_argument("--department")
    gopen.add_argument("--minutes", type=int, default=60, help=f"1..{MAX_BREAK_GLASS_MINUTES} (default 60)")
    gopen.set_defaults(func=_cmd_breakglass_open)
    gclose = gacts.add_parser("close", help="close a grant (audited)")
    gclose.add_argument("id")
    gclose.add_argument("--reason", required=True)
    _by(gclose)
    gclose.set_defaults(func=_cmd_breakglass_close)
    glist = gacts.add_parser("list", help="grants, oldest first")
    glist.add_argument("--pending-review", action="store_true", help="only those no supervisor has reviewed")
    glist.add_argument("--open", action="store_true", help="only those open now")
    glist.set_defaults(func=_cmd_breakglass_list)
    greview = gacts.add_parser("review", help="a supervisor's verdict on a grant (audited)")
    greview.add_argument("id")
    greview.add_argument("--as", dest="supervisor", required=True, metavar="SUPERVISOR")
    greview.add_argument("--verdict", required=True, choices=VERDICTS)
    greview.set_defaults(func=_cmd_breakglass_review)
    gsweep = gacts.add_parser("sweep", help="close and audit expired grants (the service also does it)")
    gsweep.set_defaults(func=_cmd_breakglass_sweep)


def _register_access(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:

    access = sub.add_parser("access", help="access questions and responsible-patient assignments")
    aacts = access.add_subparsers(dest="action", required=True)
    check = aacts.add_parser("check", help="what-if: would ACCOUNT be allowed? (exit 0 allowed, 1 denied)")
    check.add_argument("--as", dest="account", required=True, metavar="ACCOUNT")
    check.add_argument("--action", dest="action_name", required=True, choices=ACTIONS)
    check.add_argument("--kind", required=True, choices=RECORD_KINDS)
    check.add_argument("--patient", metavar="ID", help="the patient's opaque registry id (patient data kinds)")
    check.add_argument("--department", help="the record's department")
    check.add_argument("--call", metavar="CALL_ID", help="the call the record belongs to")
    check.add_argument("--reason")
    check.set_defaults(func=_cmd_access_check)
    assign = aacts.add_parser("assign", help="make ACCOUNT responsible for a patient (audited)")
    assign.add_argument("--account", required=True)
    assign.add_argument("--patient", required=True, metavar="ID")
    assign.add_argument("--until", help="ISO 8601 time with UTC offset (default: until unassigned)")
    _by(assign)
    assign.set_defaults(func=_cmd_access_assign)
    unassign = aacts.add_parser("unassign", help="end ACCOUNT's responsibility for a patient (audited)")
    unassign.add_argument("--account", required=True)
    unassign.add_argument("--patient", required=True, metavar="ID")
    _by(unassign)
    unassign.set_defaults(func=_cmd_access_unassign)
