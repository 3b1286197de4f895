"""``medhotline stats``: queue and agent statistics from the stored records, as a table, JSON or CSV, and a chart.

The figures are computed each time from ``calls``, the queue's steps, ``agent_rings`` and the call notes' times
(``routing.statistics``; every figure is defined in docs/statistics.md), so they survive restarts and are the same
on every node. Only categories, waits, agent ids and counts are shown: never a caller.

Access goes through the one policy (``compliance.access``, record kind ``statistics``): the account given with
``--as`` must be allowed to read them (supervisor, admin, auditor); a CSV or an output file (``--format csv``,
``--out``, ``--chart``) is an export and needs ``--reason``. Each read is audited with the window and the grouping
before anything is shown; a refusal is audited too.

The window is in the hospital's local time (``ground.clock.HOSPITAL_TZ``): ``--from`` and ``--to`` take
``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM``. A date alone in ``--to`` includes that whole day; a time is the exclusive
end. Defaults: today, from 00:00 to 24:00.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from dataclasses import asdict
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from compliance.access import AccessError, check_reason
from compliance.accounts import ACCOUNT_ID
from ground import db
from ground.clock import HOSPITAL_TZ, HOSPITAL_TZ_NAME
from ground.errors import CommandError
from recordings.records import CallRecordStore
from routing.statistics import GROUPINGS, NoteFacts, StatsError, StatsReport, StatsSettings, compute
from routing.statistics_access import StatisticsDesk, StatsRequest
from routing.statistics_chart import waits_svg

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ground.config import Config
    from routing.statistics import Grouping

FORMATS: Final = ("table", "json", "csv")
_WHEN_FORMATS: Final = ("%Y-%m-%d", "%Y-%m-%dT%H:%M")


def parse_when(text: str, option: str) -> tuple[datetime, bool]:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM`` in local time → (the instant, whether only a date was given)."""
    for pattern in _WHEN_FORMATS:
        try:
            parsed = datetime.strptime(text, pattern)
        except ValueError:
            continue
        return parsed.replace(tzinfo=HOSPITAL_TZ), pattern == "%Y-%m-%d"
    raise CommandError(f"{option} {text!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM (local time, {HOSPITAL_TZ_NAME})")


def window(given_from: str | None, given_to: str | None, today: date) -> tuple[datetime, datetime]:
    """[start, end) of the statistics; see the module's docstring for the rules."""
    if given_from is None:
        start = datetime(today.year, today.month, today.day, tzinfo=HOSPITAL_TZ)
    else:
        start = parse_when(given_from, "--from")[0]
    if given_to is None:
        local = start.astimezone(HOSPITAL_TZ)
        end = datetime(local.year, local.month, local.day, tzinfo=HOSPITAL_TZ) + timedelta(days=1)
    else:
        end, whole_day = parse_when(given_to, "--to")
        if whole_day:
            end += timedelta(days=1)
    if end <= start:
        raise CommandError(f"--to must be after --from: the window {start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} "
                           "is empty")  # fmt: skip
    return start, end


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


_QUEUE_COLUMNS: Final = ("received", "answered", "within", "SL", "abandoned", "aband>N", "ASA s", "AHT s",
                         "longest s", "emerg", "emerg ok", "waiting")  # fmt: skip
_AGENT_COLUMNS: Final = ("rings", "handled", "missed", "unreach", "talk s", "wrap-up s", "AHT s")


def _table(report: StatsReport) -> str:
    s = report.settings
    lines = [
        f"statistics {report.start.astimezone(HOSPITAL_TZ):%Y-%m-%d %H:%M} – "
        f"{report.end.astimezone(HOSPITAL_TZ):%Y-%m-%d %H:%M} ({HOSPITAL_TZ_NAME}), by {report.by}; "
        f"service level {s.service_level_seconds:g} s, emergency target {s.emergency_target_seconds:g} s, "
        f"short abandon < {s.short_abandon_seconds:g} s",
        f"{report.by if report.by != 'agent' else 'category':<18}" + "".join(f"{c:>10}" for c in _QUEUE_COLUMNS),
    ]
    for g in (*report.groups, report.total):
        cells = (g.received, g.answered, g.answered_within_target, _percent(g.service_level), g.abandoned,
                 g.abandoned_after_short, _seconds(g.asa_seconds), _seconds(g.aht_seconds),
                 _seconds(g.longest_wait_seconds), g.emergencies, g.emergencies_within_target, g.waiting)  # fmt: skip
        lines.append(f"{g.group:<18}" + "".join(f"{c!s:>10}" for c in cells))
    if report.by == "agent":
        lines.append("")
        lines.append(f"{'agent':<18}" + "".join(f"{c:>10}" for c in _AGENT_COLUMNS))
        for a in report.agents:
            cells_a = (a.rings, a.handled, a.missed, a.unreachable, _seconds(a.talk_seconds),
                       _seconds(a.wrap_up_seconds), _seconds(a.aht_seconds))  # fmt: skip
            lines.append(f"{a.agent_id:<18}" + "".join(f"{c!s:>10}" for c in cells_a))
    return "\n".join(lines) + "\n"


def _csv(report: StatsReport) -> str:
    """One row per group and one for all queues (``--by agent``: one per agent); every figure as a column."""
    out = io.StringIO()
    if report.by == "agent":
        rows = [asdict(a) for a in report.agents]
    else:
        rows = [{"by": report.by, **asdict(g)} for g in (*report.groups, report.total)]
    names = list(rows[0]) if rows else ["by", "group"]
    writer = csv.DictWriter(out, fieldnames=["from", "to", *names], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"from": report.start.isoformat(), "to": report.end.isoformat(),
                         **{k: ("" if v is None else v) for k, v in row.items()}})  # fmt: skip
    return out.getvalue()


def _write(path: Path, text: str) -> None:
    """Write-then-rename: a reader never sees half a file, and a failure leaves any earlier file as it was."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise CommandError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Arguments that can be judged without the database: refused before anything is read or audited."""
    if args.chart is not None and args.chart.suffix.lower() != ".svg":
        raise CommandError(f"--chart {args.chart}: the chart is written as SVG; name the file *.svg")
    exporting = args.format == "csv" or args.out is not None or args.chart is not None
    if exporting:
        try:
            check_reason(args.reason, "--reason (a CSV or a file is an export)")
        except AccessError as exc:
            raise CommandError(str(exc)) from None
    if not ACCOUNT_ID.match(args.as_):
        raise CommandError("--as must be an account id (2-64 of a-z 0-9 _ . - starting with a letter)")


def _cmd_stats(config: Config, args: argparse.Namespace) -> int:

    _check_outputs(args)
    start, end = window(args.from_, args.to, datetime.now(HOSPITAL_TZ).date())
    exporting = args.format == "csv" or args.out is not None or args.chart is not None
    s = config.statistics
    settings = StatsSettings(s.service_level_seconds, s.emergency_target_seconds, s.short_abandon_seconds,
                             s.wrap_up_max_seconds)  # fmt: skip
    request = StatsRequest(args.as_, start, end, by=args.by, format=args.format, chart=args.chart is not None,
                           export=exporting, reason=args.reason)  # fmt: skip
    with db.current_engine(config.database_url) as engine:
        notes = CallRecordStore.for_engine(engine)

        def note_times(ids: Sequence[str]) -> list[NoteFacts]:
            return [NoteFacts(*row) for row in notes.note_times(ids)]

        records = StatisticsDesk.for_engine(engine).read(request, note_times)
    try:
        by: Grouping = args.by
        report = compute(records, start, end, by=by, settings=settings, zone=HOSPITAL_TZ)
    except StatsError as exc:
        raise CommandError(str(exc)) from None
    if args.format == "json":
        text = json.dumps(report.as_json(), ensure_ascii=False, indent=2) + "\n"
    elif args.format == "csv":
        text = _csv(report)
    else:
        text = _table(report)
    if args.out is not None:
        _write(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.chart is not None:
        _write(args.chart, waits_svg(report, HOSPITAL_TZ))
        print(f"wrote {args.chart}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``medhotline stats`` to the ``medhotline`` parser."""
    stats = sub.add_parser(
        "stats",
        help="queue and agent statistics from the stored records (audited; docs/statistics.md)",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    stats.add_argument("--as", dest="as_", metavar="ACCOUNT", required=True, help="your own account id")
    stats.add_argument("--from", dest="from_", metavar="WHEN", help="YYYY-MM-DD[THH:MM], local (default: today)")
    stats.add_argument("--to", metavar="WHEN", help="YYYY-MM-DD (whole day) or YYYY-MM-DDTHH:MM (exclusive)")
    stats.add_argument("--by", choices=GROUPINGS, default="queue", help="rows per queue (default), category, "
                       "agent or hour")  # fmt: skip
    stats.add_argument("--format", choices=FORMATS, default="table")
    stats.add_argument("--out", type=Path, metavar="FILE", help="write the figures to FILE instead of stdout")
    stats.add_argument("--chart", type=Path, metavar="FILE.svg", help="also write the chart of waits (SVG)")
    stats.add_argument("--reason", help="why (audited; required for CSV and files, which are exports)")
    stats.set_defaults(func=_cmd_stats)
