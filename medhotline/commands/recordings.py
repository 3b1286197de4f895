"""``medhotline recordings …`` and ``medhotline records …``: recordings and signed call records from the CLI.

Recordings: ``list`` and ``show`` print metadata only (ids, states, digests, retention; no patient data).
``play`` and ``export`` decrypt, and only through the access policy: the account given with ``--as`` must be
allowed to read (play) or export the recording, with a reason, and every attempt, allowed or refused, lands in
the audit trail. An export is either re-encrypted to the requester's X25519 public key (``--recipient``;
``recordings decrypt-export`` opens it with the matching private key) or written as a WAV watermarked with
who exported it and when (``--watermark``). ``hold`` and ``release`` place and lift a legal hold; ``delete``
removes one recording's audio once its retention has passed (refused and audited before); ``purge --expired``
does so for every expired recording not on hold; ``ingest --pending`` finishes interrupted ingests.

Records: ``note`` adds the agent's call note (kept for the summary's seal during the wrap-up, a signed amendment
after it); ``show`` decrypts a call's records through the access policy; ``verify`` checks signatures,
timestamps, body digests, recording hashes and links, and names every failure (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy.orm import sessionmaker

from compliance.access_store import AccessControl
from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.errors import CommandError
from ground.operator import actor_id
from his.tables import PatientStore
from medhotline.commands.keys import run_keyed
from medhotline.service import recording_spool
from recordings.disclosure import Disclosure, Exported, ShownRecord, check_new_output
from recordings.envelope import generate_identity, load_identity, load_recipient_public_key, open_for_recipient
from recordings.ingest import Ingestor
from recordings.records import configured_tsa_certificates, open_sealer, verify_records
from recordings.removal import RecordingRemoval
from recordings.retention import RetentionPolicy
from recordings.signed import RecordCheck
from recordings.store import RecordingStore

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ground.config import Config
    from medhotline.commands.keys import KeyedDatabase
    from recordings.records import RecordSealer
    from recordings.store import RecordingRow, RecordingStore

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1


def _now() -> datetime:
    return datetime.now(UTC)


def _engine(config: Config) -> AbstractContextManager[Engine]:

    return db.current_engine(config.database_url)


def _store(keyed: KeyedDatabase) -> RecordingStore:

    return RecordingStore.for_engine(keyed.engine)


def _sealer(config: Config, keyed: KeyedDatabase) -> RecordSealer:

    return open_sealer(config, sessionmaker(keyed.engine, expire_on_commit=False), keyed.keys, keyed.audit)


def _describe(row: RecordingRow) -> list[str]:
    return [
        f"recording:      {row.id}",
        f"call:           {row.call_id}",
        f"kind:           {row.kind}",
        f"state:          {row.state}",
        f"started:        {row.started_at:%Y-%m-%d %H:%M:%S} UTC",
        f"duration:       {row.duration_seconds if row.duration_seconds is not None else '-'} s",
        f"plain sha256:   {row.plain_sha256 or '-'}",
        f"cipher sha256:  {row.cipher_sha256 or '-'}",
        f"key:            KEK v{row.kek_version}" if row.kek_version else "key:            -",
        f"retention:      {row.retention_class or '-'} until "
        + (f"{row.retain_until:%Y-%m-%d}" if row.retain_until else "-"),
        f"legal hold:     {'yes (' + (row.hold_reason or '') + ')' if row.legal_hold else 'no'}",
        *([f"purged:         {row.purged_at:%Y-%m-%d} by {row.purged_by}"] if row.purged_at else []),
        *([f"error:          {row.error}"] if row.error else []),
    ]


# --- recordings ------------------------------------------------------------------------------------------------


def _cmd_list(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        rows = RecordingStore.for_engine(engine).recent(call_id=args.call, state=args.state, limit=args.limit)
    for row in rows:
        until = f"{row.retain_until:%Y-%m-%d}" if row.retain_until else "-"
        hold = " HOLD" if row.legal_hold else ""
        when = f"{row.started_at:%Y-%m-%d %H:%M}"
        print(f"{row.id}  {when}  {row.kind:<12} {row.state:<9} {until}{hold}  call {row.call_id}")
    if not rows:
        print("no recordings", file=sys.stderr)
    return EXIT_OK


def _cmd_show(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        row = RecordingStore.for_engine(engine).get(args.recording)
    for line in _describe(row):
        print(line)
    return EXIT_OK


def _disclosure(config: Config, keyed: KeyedDatabase) -> Disclosure:
    """Play, export and show behind the access policy (the patient registry tells it whose record it is)."""

    access = AccessControl.for_engine(keyed.engine, keyed.audit, patients=PatientStore.for_engine(keyed.engine))
    return Disclosure(_store(keyed), keyed.keys, config.recordings_store, access, keyed.audit)


def _cmd_export(config: Config, args: argparse.Namespace) -> int:

    if (args.recipient is None) == (not args.watermark):
        raise CommandError("export needs exactly one of --recipient PUBLIC.pem (re-encrypted) or --watermark")
    check_new_output(args.out)
    recipient = load_recipient_public_key(args.recipient) if args.recipient is not None else None

    async def work(keyed: KeyedDatabase) -> Exported:
        return await _disclosure(config, keyed).export(
            args.recording, account=args.as_, role=args.role, reason=args.reason, out=args.out, recipient=recipient
        )

    done = run_keyed(config, work)
    print(f"exported recording {done.recording_id} to {done.out} ({done.form}); sha256 {done.sha256}")
    return EXIT_OK


def _cmd_play(config: Config, args: argparse.Namespace) -> int:

    if sys.stdout.isatty():
        raise CommandError("play writes the WAV to standard output: pipe it into a player (e.g. `| aplay`)")

    async def work(keyed: KeyedDatabase) -> None:
        await _disclosure(config, keyed).play(
            args.recording, account=args.as_, reason=args.reason, sink=sys.stdout.buffer.write
        )

    run_keyed(config, work)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _cmd_decrypt_export(config: Config, args: argparse.Namespace) -> int:

    if args.out.exists():
        raise CommandError(f"{args.out} exists: refusing to overwrite it")
    identity = load_identity(args.identity)
    temp = args.out.with_name(f".{args.out.name}.part-{os.getpid()}")
    try:
        with temp.open("xb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            for chunk in open_for_recipient(args.export, identity):
                handle.write(chunk)
        os.replace(temp, args.out)
    finally:
        temp.unlink(missing_ok=True)
    print(f"decrypted {args.export} to {args.out}")
    return EXIT_OK


def _cmd_keygen(config: Config, args: argparse.Namespace) -> int:

    generate_identity(args.private, args.public)
    print(f"private key {args.private} (keep it), public key {args.public} (give it to whoever exports for you)")
    return EXIT_OK


def _removal(engine: Engine, config: Config, as_: str | None) -> RecordingRemoval:

    return RecordingRemoval(
        RecordingStore.for_engine(engine),
        AuditLog(SqlAuditStore(engine)),
        config.recordings_store,
        actor=actor_id(as_),
    )


def _cmd_hold(config: Config, args: argparse.Namespace) -> int:

    on = args.recordings_action == "hold"
    with _engine(config) as engine:
        changed = _removal(engine, config, args.as_).set_hold(args.recording, on=on, reason=args.reason, at=_now())
    if changed == 0:
        raise CommandError(f"no recording changed: {'already held' if on else 'not held'}, or no such id")
    print(f"legal hold {'placed on' if on else 'lifted from'} {changed} recording(s)")
    return EXIT_OK


def _cmd_delete(config: Config, args: argparse.Namespace) -> int:

    with _engine(config) as engine:
        row, refusal = _removal(engine, config, args.as_).remove(args.recording, reason=args.reason, at=_now())
    if refusal is not None:
        raise CommandError(f"delete of recording {row.id} refused: {refusal} (the refusal is audited)")
    print(f"recording {row.id} purged; its metadata and digests remain")
    return EXIT_OK


def _cmd_purge(config: Config, args: argparse.Namespace) -> int:

    if not args.expired:
        raise CommandError("purge removes only what retention allows: say so with --expired")
    with _engine(config) as engine:
        result = _removal(engine, config, args.as_).purge_expired(reason=args.reason, at=_now(), dry_run=args.dry_run)
    if args.dry_run:
        for row in result.expired:
            print(f"would purge {row.id} (kept until {row.retain_until:%Y-%m-%d})")
    else:
        print(f"purged {result.purged} expired recording(s); {result.skipped} skipped")
    return EXIT_OK


def _cmd_ingest(config: Config, args: argparse.Namespace) -> int:

    async def work(keyed: KeyedDatabase) -> int:
        ingestor = Ingestor(
            _store(keyed),
            keyed.keys,
            spool_dir=recording_spool(config),
            store_dir=config.recordings_store,
            policy=RetentionPolicy.from_config(config.recordings.retention_years),
            calls=db.CallRepository.for_engine(keyed.engine),
            audit=keyed.audit,
        )
        return await ingestor.resume()

    print(f"completed {run_keyed(config, work)} interrupted ingest(s)")
    return EXIT_OK


# --- records ---------------------------------------------------------------------------------------------------


def _cmd_note(config: Config, args: argparse.Namespace) -> int:

    text = (
        sys.stdin.read()
        if args.file == "-"
        else Path(args.file).read_text(encoding="utf-8")
        if args.file
        else args.text
    )
    if text is None:
        raise CommandError("records note needs --text or --file (use --file - for standard input)")

    async def work(keyed: KeyedDatabase) -> tuple[str, str]:
        return await _sealer(config, keyed).add_note(args.call, args.as_, text)

    how, ident = run_keyed(config, work)
    if how == "staged":
        print(f"note kept for call {ident}: it is sealed with the call's summary at the end of the wrap-up")
    else:
        print(f"the summary was already sealed: the note is signed amendment {ident}")
    return EXIT_OK


def _cmd_records_show(config: Config, args: argparse.Namespace) -> int:

    async def work(keyed: KeyedDatabase) -> list[ShownRecord]:
        return await _disclosure(config, keyed).call_records(
            _sealer(config, keyed), args.call, account=args.as_, reason=args.reason,
            department=config.recordings.department,
        )  # fmt: skip

    shown = run_keyed(config, work)
    for record in shown:
        print(f"# {record.kind} {record.id} signed {record.created_at:%Y-%m-%d %H:%M:%S} UTC")
        print(record.text)
    if not shown:
        print(f"call {args.call} has no signed records")
    return EXIT_OK


def _cmd_verify(config: Config, args: argparse.Namespace) -> int:

    if (args.call is None) == (not args.all):
        raise CommandError("records verify needs a CALL_ID or --all")
    extra = configured_tsa_certificates(config)

    async def work(keyed: KeyedDatabase) -> list[RecordCheck]:
        return await verify_records(
            _sealer(config, keyed),
            keyed.keys,
            config.recordings_store,
            call_id=args.call,
            extra_tsa_certificates=extra,
        )

    checks = run_keyed(config, work)
    failed = [c for c in checks if not c.ok]
    for check in checks:
        status = "ok" if check.ok else "FAILED"
        when = f" timestamped {check.timestamped_at:%Y-%m-%d %H:%M:%S} UTC" if check.timestamped_at else ""
        print(f"{status:<6} {check.kind:<12} {check.record_id} call {check.call_id}{when}")
        for problem in check.problems:
            print(f"         - {problem}")
        for note in check.notes:
            print(f"         note: {note}")
    print(f"{len(checks)} record(s) checked, {len(failed)} failed")
    return EXIT_PROBLEMS if failed or (not checks and args.call) else EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline recordings`` and ``medhotline records``."""
    _register_recordings(sub)
    _register_records(sub)


def _register_recordings(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rec = sub.add_parser("recordings", help="encrypted call recordings: list, play, export, hold, purge")
    actions = rec.add_subparsers(dest="recordings_action", required=True)

    lst = actions.add_parser("list", help="recent recordings (metadata only)")
    lst.add_argument("--call", help="only this call's")
    lst.add_argument("--state", choices=("capturing", "finished", "stored", "purged", "missing"))
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=_cmd_list)

    show = actions.add_parser("show", help="one recording's metadata, digests and retention")
    show.add_argument("recording")
    show.set_defaults(func=_cmd_show)

    def accessed(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("recording")
        parser.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
        parser.add_argument("--role", help="which of your roles (when you hold several)")
        parser.add_argument("--reason", required=True, help="why (audited; no patient identifiers)")

    export = actions.add_parser("export", help="export through the access policy (re-encrypted or watermarked)")
    accessed(export)
    export.add_argument("--out", type=Path, required=True, help="the file to write (never overwritten)")
    export.add_argument("--recipient", type=Path, help="the requester's X25519 public key (PEM): re-encrypt to it")
    export.add_argument("--watermark", action="store_true", help="a WAV marked with who exported it and when")
    export.set_defaults(func=_cmd_export)

    play = actions.add_parser("play", help="decrypt to standard output for a player, through the access policy")
    accessed(play)
    play.set_defaults(func=_cmd_play)

    decrypt = actions.add_parser("decrypt-export", help="open an export made for you with your private key")
    decrypt.add_argument("export", type=Path)
    decrypt.add_argument("--identity", type=Path, required=True, help="your X25519 private key (PEM)")
    decrypt.add_argument("--out", type=Path, required=True)
    decrypt.set_defaults(func=_cmd_decrypt_export)

    keygen = actions.add_parser("keygen", help="make an X25519 key pair to receive exports")
    keygen.add_argument("--private", type=Path, required=True)
    keygen.add_argument("--public", type=Path, required=True)
    keygen.set_defaults(func=_cmd_keygen)

    _register_retention(actions)

    purge = actions.add_parser("purge", help="remove every recording past retention and not on hold (audited)")
    purge.add_argument("--expired", action="store_true", help="required: only what retention allows")
    purge.add_argument("--dry-run", action="store_true")
    purge.add_argument("--reason", default="retention period ended")
    purge.add_argument("--as", dest="as_", metavar="ACCOUNT")
    purge.set_defaults(func=_cmd_purge)

    ingest = actions.add_parser("ingest", help="finish interrupted ingests (the service does so at start too)")
    ingest.add_argument("--pending", action="store_true", required=True)
    ingest.set_defaults(func=_cmd_ingest)


def _register_retention(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text in (("hold", "place a legal hold"), ("release", "lift a legal hold")):
        hold = actions.add_parser(name, help=f"{text} (audited)")
        hold.add_argument("recording", nargs="+")
        hold.add_argument("--reason", required=True)
        hold.add_argument("--as", dest="as_", metavar="ACCOUNT")
        hold.set_defaults(func=_cmd_hold)

    delete = actions.add_parser("delete", help="remove one recording's audio once retention allows (audited)")
    delete.add_argument("recording")
    delete.add_argument("--reason", required=True)
    delete.add_argument("--as", dest="as_", metavar="ACCOUNT")
    delete.set_defaults(func=_cmd_delete)


def _register_records(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    records = sub.add_parser("records", help="signed call records: note, show, verify")
    ractions = records.add_subparsers(dest="records_action", required=True)
    note = ractions.add_parser("note", help="the agent's call note (sealed with the summary, or an amendment)")
    note.add_argument("call")
    note.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True)
    note.add_argument("--text")
    note.add_argument("--file", help="read the note from this file ('-': standard input)")
    note.set_defaults(func=_cmd_note)

    rshow = ractions.add_parser("show", help="decrypt a call's records through the access policy")
    rshow.add_argument("call")
    rshow.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True)
    rshow.add_argument("--reason", required=True)
    rshow.set_defaults(func=_cmd_records_show)

    verify = ractions.add_parser("verify", help="check signatures, timestamps, hashes and links; name failures")
    verify.add_argument("call", nargs="?")
    verify.add_argument("--all", action="store_true")
    verify.set_defaults(func=_cmd_verify)
