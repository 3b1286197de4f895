"""``medhotline patients add | find | show``: the registry from the command line, through the key service.

Identifying values given as arguments are visible to every user of the host in ``ps`` and may land in the shell's
history. Each command therefore also reads them from standard input (or a file) as one JSON object:
``--from-json -``. Output: ``add`` prints the patient id, ``find`` prints patient ids only (one per line), ``show``
prints the decrypted record, and is audited as a read by the account given with ``--as``.

``show`` goes through the access policy (``compliance.access``): role, scope (department, assigned patients, the
patient of the current call, break-glass) and frozen state are read at the moment of access; a refusal is audited.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from compliance.accounts import ACCOUNT_ID
from ground.errors import CommandError
from ground.operator import actor_id
from his.reading import read_patient
from his.registry import PatientInput, PatientInputError, PatientRegistry, check_patient_id
from his.tables import PatientStore
from medhotline.commands.keys import ADMIN_ROLE, run_keyed

if TYPE_CHECKING:
    from ground.config import Config
    from his.registry import PatientInput, PatientRegistry
    from medhotline.commands.keys import KeyedDatabase

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
_INPUT_FIELDS: Final = ("name", "phone", "national_id", "record_number", "birth_year", "department")
_STDIN_HELP: Final = (
    "read the identifying values from this JSON file, or '-' for standard input, instead of arguments "
    "(arguments are visible to other users in `ps` and land in shell history)"
)


def _read_json(source: str, allowed: tuple[str, ...]) -> dict[str, Any]:

    where = "standard input" if source == "-" else source
    try:
        raw = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        data = json.loads(raw)
    except OSError as exc:
        raise CommandError(f"--from-json: cannot read {where}: {exc.strerror or type(exc).__name__}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        # The position only: the text itself may be a patient's data.
        position = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise CommandError(f"--from-json: {where} is not JSON{position}") from None
    if not isinstance(data, dict):
        raise CommandError(f"--from-json: {where} must hold one JSON object")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise CommandError(f"--from-json: unknown field(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    return data


def _patient_input(args: argparse.Namespace) -> PatientInput:

    given = {name: getattr(args, name) for name in _INPUT_FIELDS}
    if args.from_json is not None:
        if any(value is not None for value in given.values()):
            raise CommandError("give the patient either with --from-json or with options, not both")
        given = {name: None for name in _INPUT_FIELDS} | _read_json(args.from_json, _INPUT_FIELDS)
    if given["name"] is None or given["phone"] is None:
        raise CommandError("a patient needs --name and --phone (or both in --from-json)")
    birth_year = given["birth_year"]
    if isinstance(birth_year, str):
        birth_year = int(birth_year) if birth_year.strip().isdigit() else -1
    for name in ("name", "phone", "national_id", "record_number", "department"):
        if given[name] is not None and not isinstance(given[name], str):
            raise PatientInputError(f"patient {name.replace('_', ' ')} must be text")
    return PatientInput(
        name=given["name"],
        phone=given["phone"],
        national_id=given["national_id"],
        record_number=given["record_number"],
        birth_year=birth_year,
        department=given["department"],
    )


def _registry(keyed: KeyedDatabase) -> PatientRegistry:

    return PatientRegistry(PatientStore.for_engine(keyed.engine), keyed.ring, keyed.keys, audit=keyed.audit)


def _cmd_add(config: Config, args: argparse.Namespace) -> int:

    # Checked before connecting anywhere: a typo is reported without touching the key service or the database.
    patient = _patient_input(args).checked(datetime.now(UTC))
    actor = actor_id(args.as_)

    async def work(keyed: KeyedDatabase) -> str:
        return await _registry(keyed).upsert(patient, accessor=actor, role=ADMIN_ROLE, reason=args.reason)

    print(run_keyed(config, work))
    return EXIT_OK


def _cmd_find(config: Config, args: argparse.Namespace) -> int:

    if args.from_json is not None:
        if args.phone is not None:
            raise CommandError("give the phone number either with --from-json or with --phone, not both")
        phone = _read_json(args.from_json, ("phone",)).get("phone")
    else:
        phone = args.phone
    if not isinstance(phone, str):
        raise CommandError('patients find needs --phone (or {"phone": ...} in --from-json)')
    actor = actor_id(args.as_)

    async def work(keyed: KeyedDatabase) -> list[str]:
        return await _registry(keyed).lookup_by_phone(phone, accessor=actor, role=ADMIN_ROLE, reason=args.reason)

    ids = run_keyed(config, work)
    for patient_id in ids:
        print(patient_id)
    if not ids:
        print("no patient registered with that phone number", file=sys.stderr)
        return EXIT_NOT_FOUND
    return EXIT_OK


def _cmd_show(config: Config, args: argparse.Namespace) -> int:

    patient_id = check_patient_id(args.patient_id)
    if not ACCOUNT_ID.match(args.as_):
        raise CommandError("--as must be an account id (2-64 of a-z 0-9 _ . - starting with a letter)")

    async def work(keyed: KeyedDatabase) -> list[str]:
        record = await read_patient(keyed.engine, keyed.ring, keyed.keys, keyed.audit, patient_id, account=args.as_,
                                    role=args.role, reason=args.reason)  # fmt: skip
        return [
            f"id:             {record.id}",
            f"name:           {record.name}",
            f"phone:          {record.phone}",
            f"national id:    {record.national_id or '-'}",
            f"record number:  {record.record_number or '-'}",
            f"birth year:     {record.birth_year or '-'}",
            f"department:     {record.department or '-'}",
            f"registered:     {record.created_at:%Y-%m-%d %H:%M:%S} UTC",
            f"updated:        {record.updated_at:%Y-%m-%d %H:%M:%S} UTC",
        ]

    for line in run_keyed(config, work):
        print(line)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline patients`` to the ``medhotline`` parser."""
    patients = sub.add_parser(
        "patients",
        help="register, find and read patients (encrypted registry; needs the key service)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = patients.add_subparsers(dest="patients_action", required=True)

    add = actions.add_parser(
        "add",
        help="register a patient, or update the one with the same record number; prints the patient id",
        description="Identifying values as options are visible in `ps`: prefer --from-json - and standard input, "
        'e.g. echo \'{"name": "…", "phone": "…"}\' | medhotline patients add --from-json -',
    )
    add.add_argument("--name")
    add.add_argument("--phone")
    add.add_argument("--national-id", dest="national_id")
    add.add_argument(
        "--record-number", dest="record_number", help="the HIS record number (matches an existing patient)"
    )
    add.add_argument("--birth-year", dest="birth_year", type=int)
    add.add_argument("--department", help="operational, stored in clear (e.g. cardiology)")
    add.add_argument("--from-json", dest="from_json", metavar="FILE|-", help=_STDIN_HELP)
    add.add_argument("--as", dest="as_", metavar="ACCOUNT", help="who registers (default: os:<your user>)")
    add.add_argument("--reason", default="registration", help="why, for the audit log (default: registration)")
    add.set_defaults(func=_cmd_add)

    find = actions.add_parser(
        "find",
        help="patient ids registered with a phone number (any spelling)",
        description="The phone number as an option is visible in `ps`: prefer --from-json - with "
        '{"phone": "…"} on standard input.',
    )
    find.add_argument("--phone")
    find.add_argument("--from-json", dest="from_json", metavar="FILE|-", help=_STDIN_HELP)
    find.add_argument("--as", dest="as_", metavar="ACCOUNT", help="who looks up (default: os:<your user>)")
    find.add_argument("--reason", default="lookup by phone", help="why, for the audit log")
    find.set_defaults(func=_cmd_find)

    show = actions.add_parser("show", help="decrypt and print one patient's record (audited)")
    show.add_argument("patient_id", metavar="ID", help="the patient id (from add or find)")
    show.add_argument("--reason", required=True, help="why you read this record (audited; no identifiers)")
    show.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
    show.add_argument("--role", help="the role you act in, if your account has several")
    show.set_defaults(func=_cmd_show)
