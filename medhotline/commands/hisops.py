"""``medhotline his status | outbox | retry | replay-outbox | check | send-test | simulate``: the HIS link.

``status`` says whether the HIS answers a connection (``[his] host``/``port``, TLS as configured), how many
messages wait in the outbox, since when the oldest has waited, and the HIS's last answer. ``outbox`` lists the
pending and failed messages by control id and type (never a body: bodies stay encrypted, and no identifier is
printed). ``retry CONTROL_ID`` puts a failed message back in the queue; the service's sender sends it next.
``replay-outbox`` queues again every failed message (or those of ``--type``/``--since``), same bytes and control
ids; acknowledged ones are left alone. ``check FILE…`` judges HL7 files as the hotline's receivers would
(``his.check``): exit 0 when every message can be accepted, 1 when one must be refused, 4 when a file can't be read;
it prints segment-field and reason, never a value. ``send-test`` sends the HIS one PDQ query for a test number
(``his.send_test``) and prints the answer code and round-trip time.
``simulate`` runs the simulated HIS (``his.simulator``) until interrupted: the demo's and the tests' HIS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from compliance.audit import AuditLog, SqlAuditStore
from ground import db
from ground.errors import EXIT_FAILED, EXIT_UNABLE, CommandError
from his.audit import Hl7Audit
from his.check import check_bytes
from his.hl7 import Party
from his.link import his_client, probe_his
from his.outbox_store import OutboxEntry, OutboxStore
from his.send_test import TEST_PHONE, send_test
from his.simulator import SYNTHETIC_PATIENTS, SimulatedHis

if TYPE_CHECKING:
    from ground.config import Config

EXIT_OK: Final = 0
EXIT_DOWN: Final = 1
# The phone an A08 from `his simulate --send-a08` moves the first synthetic patient to (synthetic as well).
SIMULATED_NEW_PHONE: Final = "13800138199"


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    his = config.his
    link = asyncio.run(probe_his(his)) if his.enabled else "disabled ([his] enabled = false)"
    now = datetime.now(UTC)
    with db.current_engine(config.database_url) as engine:
        store = OutboxStore.for_engine(engine)
        counts = store.counts()
        head = store.head()
        last = store.last_answered()
    print(f"link: {link}")
    print(f"outbox: {counts.get('pending', 0)} pending, {counts.get('failed', 0)} failed, {counts.get('sent', 0)} sent")
    if head is not None:
        print(f"oldest pending: {head.control_id} {head.message_type} waiting {_age(head.created_at, now)}"
              f" (attempts {head.attempts})")  # fmt: skip
    else:
        print("oldest pending: none")
    if last is not None:
        at = last.sent_at or last.next_attempt_at
        print(f"last ACK: {last.ack_code} to {last.control_id} {last.message_type}, {_age(at, now)} ago")
    else:
        print("last ACK: none yet")
    return EXIT_OK if not his.enabled or link == "up" else EXIT_DOWN


def _line(entry: OutboxEntry) -> str:
    # last_error holds the ACK code with segment-field and table 0357 code, or a transport error; never a value.
    created = entry.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"{entry.control_id}  {entry.message_type:<8} {entry.status:<7} attempts={entry.attempts} "
        f"ack={entry.ack_code or '-'} created={created} {entry.last_error or ''}"
    ).rstrip()


def _cmd_outbox(config: Config, args: argparse.Namespace) -> int:
    with db.current_engine(config.database_url) as engine:
        store = OutboxStore.for_engine(engine)
        statuses = ("pending", "failed") if args.status == "open" else (args.status,)
        entries = [e for status in statuses for e in store.list(status, limit=args.limit)]  # type: ignore[arg-type]
    for entry in sorted(entries, key=lambda e: e.id):
        print(_line(entry))
    if not entries:
        print("(no messages)", file=sys.stderr)
    return EXIT_OK


def _cmd_retry(config: Config, args: argparse.Namespace) -> int:
    with db.current_engine(config.database_url) as engine:
        was = OutboxStore.for_engine(engine).retry(args.control_id, datetime.now(UTC))
    if was is None:
        raise CommandError(f"his retry: no outbox message with control id {args.control_id}")
    if was == "sent":
        raise CommandError(f"his retry: {args.control_id} was acknowledged (AA); sending it again would duplicate it")
    print(f"{args.control_id}: {'queued again' if was == 'failed' else 'pending, due now'}")
    return EXIT_OK


def _cmd_replay(config: Config, args: argparse.Namespace) -> int:
    with db.current_engine(config.database_url) as engine:
        queued, acknowledged = OutboxStore.for_engine(engine).replay(
            datetime.now(UTC), message_type=args.type, since=_since(args.since) if args.since else None
        )
    for control_id in queued:
        print(f"{control_id}: queued again")
    if acknowledged:
        print(f"{len(acknowledged)} acknowledged (AA) left alone: sending them again would duplicate them")
    print(f"{len(queued)} failed message(s) queued again", file=sys.stderr)
    return EXIT_OK


def _since(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(
            f"his replay-outbox --since {text!r}: expected an ISO date or date-time, e.g. 2026-12-01"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _cmd_check(config: Config, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    refused = unreadable = accepted = 0
    for name in args.files:
        try:
            with open(name, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror or type(exc).__name__}", file=sys.stderr)
            unreadable += 1
            continue
        verdicts = check_bytes(data, now)
        for verdict in verdicts:
            where = f" (message {verdict.number})" if len(verdicts) > 1 else ""
            for p in verdict.problems:
                kind = "warning: " if p.severity == "warning" else ""
                print(f"{name}: {p.location}: {kind}{p.reason}{where}")
            accepted += verdict.accepted
            refused += not verdict.accepted
    print(f"{accepted} accepted, {refused} refused, {unreadable} unreadable file(s)", file=sys.stderr)
    return EXIT_UNABLE if unreadable else EXIT_FAILED if refused else EXIT_OK


async def _send_test(config: Config, args: argparse.Namespace) -> int:
    his = config.his
    client = his_client(his)
    try:
        with db.current_engine(config.database_url) as engine:
            result = await send_test(
                client,
                sender=Party(his.sending_application, his.sending_facility),
                receiver=Party(his.receiving_application, his.receiving_facility),
                phone=args.phone,
                audit=Hl7Audit(AuditLog(SqlAuditStore(engine))),
            )
    finally:
        await client.aclose()
    ms = result.seconds * 1000
    if not result.ok:
        detail = result.error or f"{result.code} to {result.control_id}"
        print(f"HIS: no acceptance ({detail}) after {ms:.1f} ms")
        return EXIT_FAILED
    found = f", {result.candidates} candidate(s) for the test number" if result.candidates else ""
    print(f"HIS: {result.code} {result.status} to {result.control_id} in {ms:.1f} ms{found}")
    return EXIT_OK


def _cmd_send_test(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_send_test(config, args))


async def _simulate(args: argparse.Namespace) -> int:
    sim = SimulatedHis()
    port = await sim.start(args.host, args.port)
    print(f"simulated HIS listening on {args.host}:{port} ({len(sim.patients)} synthetic patients)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if args.send_a08 is not None:
            host, _, text = args.send_a08.rpartition(":")
            if not text.isdigit() or not host:
                raise CommandError(f"--send-a08 {args.send_a08!r}: expected HOST:PORT of the hotline's listener")
            moved = replace(SYNTHETIC_PATIENTS[0], phone=SIMULATED_NEW_PHONE)
            ack = await sim.send_adt(host, int(text), moved)
            print(f"ADT^A08 of {moved.record_number}: {ack.code} {ack.location}".rstrip(), flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration):
                await stop.wait()
    finally:
        await sim.aclose()
    print(f"stopped: {sim.pdq_queries} PDQ queries, {len(sim.received)} messages, {len(sim.appointments)} appointments")
    return EXIT_OK


def _cmd_simulate(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_simulate(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline his`` to the ``medhotline`` parser."""
    his = sub.add_parser("his", help="the HIS link: status, outbox, retry, simulated HIS",
                         description=__doc__.split("\n\n")[1] if __doc__ else None)  # fmt: skip
    actions = his.add_subparsers(dest="his_action", required=True)
    status = actions.add_parser("status", help="link, outbox depth, oldest pending, last ACK")
    status.set_defaults(func=_cmd_status)
    outbox = actions.add_parser("outbox", help="outbox messages by control id and type (no content)")
    outbox.add_argument("--status", choices=["open", "pending", "failed", "sent"], default="open",
                        help="open (default): pending and failed")  # fmt: skip
    outbox.add_argument("--limit", type=int, default=100)
    outbox.set_defaults(func=_cmd_outbox)
    retry = actions.add_parser("retry", help="queue a failed message again (same bytes, same control id)")
    retry.add_argument("control_id", metavar="CONTROL_ID")
    retry.set_defaults(func=_cmd_retry)
    replay = actions.add_parser("replay-outbox", help="queue every failed message again (same bytes, control ids)")
    replay.add_argument("--type", help="only this message type, e.g. SIU^S12")
    replay.add_argument("--since", help="only messages queued at or after this ISO date/time (UTC)")
    replay.set_defaults(func=_cmd_replay)
    check = actions.add_parser("check", help="judge HL7 message files as the receiver would (no value printed)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=_cmd_check)
    test = actions.add_parser("send-test", help="a PDQ query for a test number; answer code and round trip")
    test.add_argument("--phone", default=TEST_PHONE, help="synthetic number that matches no patient")
    test.set_defaults(func=_cmd_send_test)
    simulate = actions.add_parser("simulate", help="run a simulated HIS (MLLP) until interrupted")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=0, help="0 (default): a free port, printed")
    simulate.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    simulate.add_argument(
        "--send-a08",
        metavar="HOST:PORT",
        help="send the hotline's listener an ADT^A08 (a synthetic patient's new phone)",
    )
    simulate.set_defaults(func=_cmd_simulate)
