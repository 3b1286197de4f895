"""``medhotline keys …``: the key service's status, KEK rotation, rewrapping of data keys, new data keys.

These commands talk to the running key service over its Unix socket (``config.keyservice_socket``), or over
mutual TLS when ``[keyservice] address`` is set, token in ``<state_dir>/keyservice.token``, exactly like the
service does; they never read a key file themselves. Each
key operation is appended to the audit log as ``key_operation``.

A rotation is two steps and needs no downtime:

1. ``medhotline keys rotate``: the key service adds KEK version N+1 and wraps every *new* data key under it;
   versions up to N remain, decrypt-only, so everything keeps reading.
2. ``medhotline keys rewrap``: every wrapped data key in ``data_keys`` is rewrapped under N+1, one row per
   transaction. No column value is re-encrypted (the data keys themselves do not change). Interrupted, it is
   simply run again; run twice, the second run has nothing to do. ``keys status`` then shows 0 data keys under
   the old versions. Only ``data_keys`` is rewrapped here: archive an old KEK file out of the key directory
   only once no other store (recordings, for one) still holds keys wrapped under it.

After upgrading to sealed second factors (migration ``0022_totp_sealed``), ``medhotline keys seal-totp`` seals
every TOTP secret still stored in clear and blanks the clear column. Sign-in refuses a clear secret until then.
Run twice, the second run has nothing to do.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from compliance.audit import AuditLog, SqlAuditStore
from compliance.credentials import CredentialStore
from compliance.data_keys import DataKeyRing, DataKeyStore, check_purpose, key_service_for
from compliance.totp_vault import TotpVault
from ground import db
from ground.operator import actor_id
from recordings.keys import RecordingRewrap, counts_by_kek_version, rewrap_everything

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from compliance.audit import AuditLog
    from compliance.data_keys import DataKeyRing, RewrapReport
    from compliance.keyservice_client import KeyServiceClient
    from compliance.totp_vault import SealReport
    from ground.config import Config

T = TypeVar("T")
EXIT_OK: Final = 0
EXIT_INCOMPLETE: Final = 1
ADMIN_ROLE: Final = "admin"


@dataclass
class KeyedDatabase:
    """What a command that touches keys or patients needs: the key service, the database and the audit log."""

    keys: KeyServiceClient
    engine: Engine
    audit: AuditLog
    ring: DataKeyRing


@asynccontextmanager
async def keyed_database(config: Config) -> AsyncIterator[KeyedDatabase]:
    """Connect to the key service and the (migrated) database of ``config``; closed when the block ends.

    Refuses with a clear error when the schema is not current or the key service is not running.
    """

    await asyncio.to_thread(db.ensure_current, config.database_url)
    keys = key_service_for(config)
    engine = db.make_engine(config.database_url)
    try:
        audit = AuditLog(SqlAuditStore(engine))
        yield KeyedDatabase(keys, engine, audit, DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit))
    finally:
        await keys.close()
        engine.dispose()


def run_keyed(config: Config, work: Callable[[KeyedDatabase], Awaitable[T]]) -> T:
    """Run ``work`` with a :func:`keyed_database` in a fresh event loop (the CLI is synchronous)."""

    async def main() -> T:
        async with keyed_database(config) as keyed:
            return await work(keyed)

    return asyncio.run(main())


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    status = run_keyed(config, lambda k: k.ring.status())
    versions = ", ".join(f"v{v}" for v in status.kek_versions)
    print(f"key-encryption keys: {versions}; current v{status.current} (older versions decrypt-only)")
    if not status.data_keys_per_kek:
        print("data keys: none yet (created on first use)")
    for version in sorted(status.data_keys_per_kek):
        count = status.data_keys_per_kek[version]
        note = "" if version == status.current else "  <- to rewrap"
        print(f"data keys wrapped under KEK v{version}: {count}{note}")
    recordings = run_keyed(config, _recording_counts)
    for version in sorted(recordings):
        note = "" if version == status.current else "  <- to rewrap"
        print(f"recording keys wrapped under KEK v{version}: {recordings[version]}{note}")
    stale = status.to_rewrap + sum(n for v, n in recordings.items() if v != status.current)
    if stale:
        print(f"{stale} data key(s) not under the current KEK: run `medhotline keys rewrap`")
    return EXIT_OK


async def _recording_counts(keyed: KeyedDatabase) -> dict[int, int]:

    return await asyncio.to_thread(counts_by_kek_version, keyed.engine)


def _cmd_rotate(config: Config, args: argparse.Namespace) -> int:
    actor = actor_id(args.as_)
    version = run_keyed(config, lambda k: k.ring.rotate(actor=actor, role=ADMIN_ROLE, reason=args.reason))
    print(f"key-encryption key v{version} is now current; older versions decrypt only")
    print("next: `medhotline keys rewrap` to move every data key to it (no downtime, no data re-encrypted)")
    return EXIT_OK


def _cmd_rewrap(config: Config, args: argparse.Namespace) -> int:

    actor = actor_id(args.as_)

    async def work(keyed: KeyedDatabase) -> tuple[RewrapReport, RecordingRewrap | None]:
        return await rewrap_everything(
            keyed.ring, keyed.engine, keyed.keys, keyed.audit,
            actor=actor, role=ADMIN_ROLE, reason=args.reason, purpose=args.purpose, limit=args.limit,
        )  # fmt: skip

    report, recordings = run_keyed(config, work)
    print(
        f"rewrapped {report.rewrapped} data key(s) to KEK v{report.kek_version}; "
        f"{report.skipped} already done; {report.remaining} remaining"
    )
    failed = bool(report.failed)
    if report.failed:
        ids = ", ".join(str(i) for i in report.failed)
        print(f"data key(s) {ids} could not be unwrapped (altered or moved); they are left as they were")
    if recordings is not None:
        print(f"rewrapped {recordings.rewrapped} recording key(s); {recordings.remaining} remaining")
        if recordings.failed:
            failed = True
            print(f"recording key(s) of {', '.join(recordings.failed)} could not be unwrapped; left as they were")
    if failed:
        return EXIT_INCOMPLETE
    if report.remaining or (recordings is not None and recordings.remaining):
        print("run `medhotline keys rewrap` again to continue")
    return EXIT_OK


def _cmd_new_data_key(config: Config, args: argparse.Namespace) -> int:

    purpose = check_purpose(args.purpose)
    actor = actor_id(args.as_)
    record = run_keyed(config, lambda k: k.ring.new_data_key(purpose, actor=actor, role=ADMIN_ROLE, reason=args.reason))
    print(f"data key {purpose} v{record.version} is now used for new records; older versions keep decrypting")
    return EXIT_OK


def _cmd_seal_totp(config: Config, args: argparse.Namespace) -> int:
    actor = actor_id(args.as_)

    async def work(keyed: KeyedDatabase) -> SealReport:
        vault = TotpVault(CredentialStore.for_engine(keyed.engine), keyed.ring, audit=keyed.audit)
        return await vault.seal_clear(actor=actor, role=ADMIN_ROLE, reason=args.reason)

    report = run_keyed(config, work)
    print(f"sealed {report.sealed} second factor(s) stored in clear; blanked {report.blanked} superseded clear one(s)")
    if report.skipped:
        print(f"{report.skipped} changed while this ran (enrolled again): run `medhotline keys seal-totp` again")
        return EXIT_INCOMPLETE
    if report.changed:
        print("the clear values may linger in the database's free space and in backups: see docs/security.md")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline keys`` to the ``medhotline`` parser."""
    keys = sub.add_parser(
        "keys",
        help="key service status, KEK rotation and rewrap of the data keys",
        description="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = keys.add_subparsers(dest="keys_action", required=True)

    status = actions.add_parser("status", help="KEK versions and how many data keys each wraps")
    status.set_defaults(func=_cmd_status)

    def audited(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--as", dest="as_", metavar="ACCOUNT", help="who does this (default: os:<your user>)")
        parser.add_argument("--reason", default="", help="why, for the audit log (no patient identifiers)")

    rotate = actions.add_parser("rotate", help="make a new KEK version current; older versions decrypt only")
    audited(rotate)
    rotate.set_defaults(func=_cmd_rotate)

    rewrap = actions.add_parser(
        "rewrap", help="rewrap every data key under the current KEK (resumable, no downtime, data untouched)"
    )
    rewrap.add_argument("--limit", type=int, help="stop after this many data keys (rewrap in batches)")
    rewrap.add_argument("--purpose", help="only the data keys of this purpose (e.g. patients)")
    audited(rewrap)
    rewrap.set_defaults(func=_cmd_rewrap)

    new_key = actions.add_parser("new-data-key", help="start a new data key version for new records of a purpose")
    new_key.add_argument("purpose", help="e.g. patients")
    audited(new_key)
    new_key.set_defaults(func=_cmd_new_data_key)

    seal = actions.add_parser(
        "seal-totp", help="seal the TOTP second factors still stored in clear (after upgrading; idempotent)"
    )
    audited(seal)
    seal.set_defaults(func=_cmd_seal_totp)
