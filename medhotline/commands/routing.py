"""``medhotline agents …`` and ``medhotline credentials …``: manage who may take which calls.

Every command checks the schema first (``medhotline db upgrade`` migrates; these commands never do) and validates
its arguments before writing anything. Freezing and unfreezing are the same operation as ``accounts freeze`` /
``accounts unfreeze`` (:class:`compliance.access_store.AccessControl`: role check, grants, sessions and call
assignments closed, every step audited). Creating an account with roles, and verifying or revoking a credential
change who may do what, so each appends an entry to the audit trail: the actor is the OS user running the
command, or the verifier (``--by``). The entry is validated before the change is made, so an entry the audit log
would refuse stops the command with nothing changed.

Dates on the command line are calendar dates in the hospital's zone (``ground.clock.HOSPITAL_TZ``, the one the
scheduler uses): a credential "valid from D1
until D2" is valid from 00:00 on D1 until 00:00 on D2, i.e. no longer on D2 itself.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from compliance.access_store import AccessControl, cli_actor, freeze_account
from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.clock import HOSPITAL_TZ, HOSPITAL_TZ_NAME
from ground.errors import CommandError
from ground.operator import OPERATOR_ROLE, operator_id
from medhotline.commands.access import freeze_summary
from routing.admin import AgentAdministration, NewAgent
from routing.store import AgentStore
from routing.validity import credential_state, validity_report

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.accounts import AccountStore
    from compliance.audit import AuditLog
    from ground.config import Config
    from routing.store import AgentStore, AgentView, CredentialRecord

# The scheduler's zone, not a fixed +08:00: a date typed here is the same day the scheduler and the other
# commands mean by it.
LOCAL_TZ: Final = HOSPITAL_TZ
DATES_NOTE: Final = (
    f"Dates are YYYY-MM-DD in local time ({HOSPITAL_TZ_NAME}): valid from 00:00 on --valid-from until 00:00 on "
    "--valid-until (no longer valid on that day). Dates are printed the same way."
)
_SKILL_ARG: Final = re.compile(r"^\s*([^=\s]+)\s*=\s*([0-9]+)\s*$")
_DATE_ARG: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CHUNK: Final = 1 << 20


# --- small parsers (errors are CommandError: one clear line, exit code 1) ---------------------------------------


def _error(message: str) -> Exception:

    return CommandError(message)


def parse_date(text: str, option: str) -> datetime:
    """``YYYY-MM-DD`` → 00:00 of that day in the hospital's local time."""
    if not _DATE_ARG.match(text):
        raise _error(f"{option} {text!r}: expected a date YYYY-MM-DD (local time, {HOSPITAL_TZ_NAME})")
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise _error(f"{option} {text!r}: {exc}") from None
    return datetime(day.year, day.month, day.day, tzinfo=LOCAL_TZ)


def format_day(at: datetime) -> str:
    return at.astimezone(LOCAL_TZ).strftime("%Y-%m-%d")


def parse_skills(items: list[str] | None) -> dict[str, int]:
    """``["cardiology=4", …]`` → ``{"cardiology": 4}``; levels are checked (1..5) by the store."""
    skills: dict[str, int] = {}
    for item in items or []:
        match = _SKILL_ARG.match(item)
        if match is None:
            raise _error(f"--skill {item!r}: expected NAME=LEVEL with LEVEL 1 to 5, e.g. cardiology=4")
        name, level = match.group(1), int(match.group(2))
        if name in skills:
            raise _error(f"--skill {name} is given twice")
        skills[name] = level
    return skills


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_id(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _error(f"{what} {text!r}: expected a positive number (see `medhotline credentials list`)")
    return int(text)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _error(f"--certificate {path}: cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


# --- the opened database ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Db:
    engine: Engine
    agents: AgentStore
    accounts: AccountStore
    audit: AuditLog

    @property
    def admin(self) -> AgentAdministration:
        return AgentAdministration(self.agents, self.accounts, self.audit)


@contextmanager
def _open(config: Config) -> Iterator[_Db]:

    with db.current_engine(config.database_url) as engine:
        yield _Db(
            engine, AgentStore.for_engine(engine), AccountStore.for_engine(engine), AuditLog(SqlAuditStore(engine))
        )


# --- agents -----------------------------------------------------------------------------------------------------


def _agents_add(config: Config, args: argparse.Namespace) -> int:
    new = NewAgent(
        args.id,
        args.endpoint,
        name=args.name,
        roles=args.role or (),
        departments=args.department or (),
        contact=args.contact,
        languages=args.language or ["zh"],
        skills=parse_skills(args.skill),
    )
    with _open(config) as db:
        view, created = db.admin.add_agent(new, operator=operator_id(), operator_role=OPERATOR_ROLE, at=_now())
    if created:
        print(f"account {args.id} created with role(s) {', '.join(sorted(view.agent.roles))}")
    print(f"agent {view.id} added: endpoint {view.agent.endpoint}, state {view.state}")
    return 0


def _state_text(view: AgentView) -> str:
    if view.state == "paused":
        return f"paused ({view.paused_reason})"
    if view.state == "reserved":
        return f"reserved for call {view.reserved_call_id} by {view.reserved_by}"
    return view.state


def _agents_list(config: Config, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with _open(config) as db:
        views = db.agents.routing_snapshot()
    if not views:
        print("no agents (add one with `medhotline agents add`)")
    for view in views:
        kinds = ",".join(sorted(view.agent.valid_credential_kinds(now))) or "-"
        roles = ",".join(sorted(view.agent.roles))
        print(f"{view.id:<20} {view.agent.endpoint:<20} {roles:<24} {view.state:<9} {kinds}")
    return 0


def _credential_line(record: CredentialRecord, now: datetime, within_days: int = 30) -> str:

    state = credential_state(record.credential, now, within_days)
    if record.status == "revoked" and record.revoked_at is not None:
        state = f"revoked {format_day(record.revoked_at)} ({record.revoked_reason})"
    elif record.verified_at is not None:
        state = f"{state}; verified {format_day(record.verified_at)} by {record.verified_by}"
    elif state != "unverified":
        state = f"{state}; unverified"
    certificate = f", certificate sha256 {record.certificate_sha256[:16]}…" if record.certificate_sha256 else ""
    return (
        f"#{record.id} {record.kind} {record.number} ({record.issuer}), {format_day(record.valid_from)} to "
        f"{format_day(record.valid_until)}{certificate}: {state}"
    )


def _agents_show(config: Config, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with _open(config) as db:
        details = db.admin.details(args.id)
    view, account, credentials, rings = details.view, details.account, details.credentials, details.rings
    state = _state_text(view)
    if account.frozen:
        since = f" since {format_day(account.frozen_at)}" if account.frozen_at else ""
        state = f"frozen{since}: {account.frozen_reason}"
    skills = ", ".join(f"{name}={level}" for name, level in sorted(view.agent.skills.items())) or "-"
    print(f"agent        {view.id} ({view.display_name})")
    print(f"endpoint     {view.agent.endpoint}" + (f"  contact {view.contact}" if view.contact else ""))
    print(f"roles        {', '.join(sorted(view.agent.roles))}")
    print(f"departments  {', '.join(sorted(view.departments)) or '-'}")
    print(f"languages    {', '.join(view.languages)}")
    print(f"state        {state}")
    print(f"skills       {skills}")
    kinds = ", ".join(sorted(view.agent.valid_credential_kinds(now))) or "none"
    print(f"credentials  valid today: {kinds}")
    for record in credentials:
        print(f"  {_credential_line(record, now)}")
    ring_text = ", ".join(f"{outcome} {count}" for outcome, count in sorted(rings.items())) or "none"
    print(f"rings        {sum(rings.values())} ({ring_text})")
    return 0


def _agents_freeze(config: Config, args: argparse.Namespace) -> int:

    # One operation whichever command freezes a person: `accounts freeze` calls the same function, which checks
    # the actor's role, closes grants, sessions and call assignments, and audits each of them.
    with _open(config) as db:
        result = freeze_account(db.engine, args.id, args.reason, cli_actor(args.by), datetime.now(UTC), audit=db.audit)
        view = db.admin.find_view(args.id)
    print(freeze_summary(result))
    if view is not None and view.reserved_call_id is not None:
        print(f"  it is reserved for call {view.reserved_call_id} by node {view.reserved_by}, which moves that call on")
    return 0


def _agents_unfreeze(config: Config, args: argparse.Namespace) -> int:

    with _open(config) as db:
        AccessControl.for_engine(db.engine, db.audit).unfreeze(
            args.id, args.reason or "unfrozen, no reason given", datetime.now(UTC), actor=cli_actor(args.by)
        )
    print(f"account {args.id} unfrozen: routed again if its credentials are valid")
    return 0


def _agents_pause(config: Config, args: argparse.Namespace) -> int:
    with _open(config) as db:
        db.agents.pause(args.id, args.reason, datetime.now(UTC))
    print(f"agent {args.id} paused: {args.reason.strip()}")
    return 0


def _agents_unpause(config: Config, args: argparse.Namespace) -> int:
    with _open(config) as db:
        db.agents.unpause(args.id, datetime.now(UTC))
    print(f"agent {args.id} unpaused")
    return 0


def _agents_skills(config: Config, args: argparse.Namespace) -> int:
    skills = parse_skills(args.skill)
    if not skills and not args.clear:
        raise _error("give the new skills (--skill NAME=LEVEL …), or --clear to remove them all")
    if skills and args.clear:
        raise _error("--clear and --skill contradict each other")
    with _open(config) as db:
        view = db.agents.set_skills(args.id, skills, datetime.now(UTC))
    text = ", ".join(f"{name}={level}" for name, level in sorted(view.agent.skills.items())) or "none"
    print(f"agent {view.id} skills: {text}")
    return 0


# --- credentials ------------------------------------------------------------------------------------------------


def _credentials_add(config: Config, args: argparse.Namespace) -> int:
    valid_from = parse_date(args.valid_from, "--valid-from")
    valid_until = parse_date(args.valid_until, "--valid-until")
    if valid_until <= valid_from:
        raise _error(f"--valid-until {args.valid_until} must be after --valid-from {args.valid_from}")
    digest = _sha256_of(args.certificate) if args.certificate is not None else None
    with _open(config) as db:
        credential_id = db.agents.add_credential(
            args.agent,
            args.kind,
            args.number,
            args.issuer,
            valid_from,
            valid_until,
            datetime.now(UTC),
            certificate_sha256=digest,
        )
    print(
        f"credential #{credential_id} ({args.kind}) added to {args.agent}, not verified yet: it counts for routing "
        f"once someone else runs `medhotline credentials verify {credential_id} --by ACCOUNT`"
    )
    return 0


def _credentials_verify(config: Config, args: argparse.Namespace) -> int:
    credential_id = _parse_id(args.credential_id, "credential")
    with _open(config) as db:
        record = db.admin.verify_credential(credential_id, by=args.by, at=_now())
    print(f"credential #{credential_id} ({record.kind} of {record.account_id}) verified by {args.by}")
    return 0


def _credentials_revoke(config: Config, args: argparse.Namespace) -> int:
    credential_id = _parse_id(args.credential_id, "credential")
    with _open(config) as db:
        record = db.admin.revoke_credential(
            credential_id, args.reason, operator=operator_id(), operator_role=OPERATOR_ROLE, at=_now()
        )
    print(f"credential #{credential_id} ({record.kind} of {record.account_id}) revoked: no longer counts for routing")
    return 0


def _credentials_list(config: Config, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with _open(config) as db:
        records = db.agents.credentials(args.agent)
    if not records:
        print("no credentials")
    for record in records:
        print(f"{record.account_id:<20} {_credential_line(record, now)}")
    return 0


def _credentials_check(config: Config, args: argparse.Namespace) -> int:

    if not args.within_days.isdigit() or int(args.within_days) > 3650:
        raise _error(f"--within-days {args.within_days!r}: expected a number of days from 0 to 3650")
    within = int(args.within_days)
    with _open(config) as db:
        report = validity_report(db.agents, datetime.now(UTC), within)
    for line in report.lines(LOCAL_TZ):
        print(line)
    print(report.summary(LOCAL_TZ))
    return 1 if report.needs_attention else 0


# --- registration -----------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``agents`` and ``credentials`` command groups to the ``medhotline`` parser."""
    _register_agents(sub)
    _register_credentials(sub)


def _register_agents(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agents = sub.add_parser("agents", help="routing agents: add, list, show, freeze, pause, skills")
    actions = agents.add_subparsers(dest="agents_action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="make an account an agent (creating the account if needed)",
        description="Create the account (if it does not exist; default role `agent`) and make it an agent.",
    )
    add.add_argument("id", help="account id (a-z 0-9 _ . -, starting with a letter)")
    add.add_argument("--name", help="display name (needed when the account is created)")
    add.add_argument("--endpoint", required=True, help="PJSIP endpoint name of the agent's phone")
    add.add_argument("--role", action="append", help="role of a new account (repeat; default: agent)")
    add.add_argument("--department", action="append", help="department scope of a new account (repeat)")
    add.add_argument("--language", action="append", help="language the agent speaks (repeat; default: zh)")
    add.add_argument("--skill", action="append", metavar="NAME=LEVEL", help="skill with proficiency 1-5 (repeat)")
    add.add_argument("--contact", help="static SIP URI for a phone that does not register, e.g. sip:a@10.0.0.5:5060")
    add.set_defaults(func=_agents_add)

    listing = actions.add_parser("list", help="one line per agent: id, endpoint, roles, state, valid credentials")
    listing.set_defaults(func=_agents_list)

    show = actions.add_parser("show", help="everything about one agent, with credentials and ring counts")
    show.add_argument("id")
    show.set_defaults(func=_agents_show)

    freeze = actions.add_parser("freeze", help="freeze the account: no calls, no data access, at once (audited)")
    freeze.add_argument("id")
    freeze.add_argument("--reason", required=True)
    freeze.add_argument("--by", metavar="ACCOUNT", help="who freezes (admin or supervisor; default: the OS user)")
    freeze.set_defaults(func=_agents_freeze)

    unfreeze = actions.add_parser("unfreeze", help="unfreeze the account (audited)")
    unfreeze.add_argument("id")
    unfreeze.add_argument("--reason", help="why (recorded in the audit trail)")
    unfreeze.add_argument("--by", metavar="ACCOUNT", help="who unfreezes (admin; default: the OS user)")
    unfreeze.set_defaults(func=_agents_unfreeze)

    pause = actions.add_parser("pause", help="no new calls for this agent until unpaused")
    pause.add_argument("id")
    pause.add_argument("--reason", required=True)
    pause.set_defaults(func=_agents_pause)

    unpause = actions.add_parser("unpause", help="take calls again")
    unpause.add_argument("id")
    unpause.set_defaults(func=_agents_unpause)

    skills = actions.add_parser("skills", help="replace the agent's skills")
    skills.add_argument("id")
    skills.add_argument("--skill", action="append", metavar="NAME=LEVEL", help="skill with proficiency 1-5 (repeat)")
    skills.add_argument("--clear", action="store_true", help="remove every skill")
    skills.set_defaults(func=_agents_skills)


def _register_credentials(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    credentials = sub.add_parser(
        "credentials", help="agents' credentials (licences): add, verify, revoke, list, check", epilog=DATES_NOTE
    )
    cred_actions = credentials.add_subparsers(dest="credentials_action", required=True, metavar="ACTION")

    cadd = cred_actions.add_parser("add", help="record a credential (unverified until verified)", epilog=DATES_NOTE)
    cadd.add_argument("agent", help="account id of the holder")
    cadd.add_argument("--kind", required=True, help="e.g. physician_license, nurse_license, pharmacist_license")
    cadd.add_argument("--number", required=True, help="the licence number")
    cadd.add_argument("--issuer", required=True, help="the issuing authority")
    cadd.add_argument("--valid-from", required=True, metavar="YYYY-MM-DD", help="first day of validity (CST)")
    cadd.add_argument(
        "--valid-until", required=True, metavar="YYYY-MM-DD", help="first day it is no longer valid (CST)"
    )
    cadd.add_argument(
        "--certificate", type=Path, help="the certificate copy: its SHA-256 is stored, the file itself is not"
    )
    cadd.set_defaults(func=_credentials_add)

    verify = cred_actions.add_parser("verify", help="mark checked against the certificate (audited)")
    verify.add_argument("credential_id", metavar="CRED_ID")
    verify.add_argument("--by", required=True, metavar="ACCOUNT", help="the verifying account (not the holder)")
    verify.set_defaults(func=_credentials_verify)

    revoke = cred_actions.add_parser("revoke", help="revoke at once (audited)")
    revoke.add_argument("credential_id", metavar="CRED_ID")
    revoke.add_argument("--reason", required=True)
    revoke.set_defaults(func=_credentials_revoke)

    clist = cred_actions.add_parser("list", help="every credential with its validity today", epilog=DATES_NOTE)
    clist.add_argument("--agent", help="only this account's credentials")
    clist.set_defaults(func=_credentials_list)

    check = cred_actions.add_parser(
        "check",
        help="validity report; exit 1 if anything is expired, expiring or unverified (for cron)",
        epilog=DATES_NOTE,
    )
    check.add_argument("--within-days", default="30", metavar="N", help="report credentials expiring within N days")
    check.set_defaults(func=_credentials_check)
