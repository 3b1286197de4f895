"""Structured, redacted JSON-lines logging for the service and the libraries it uses.

Every line is one JSON object (``timestamp`` ISO UTC, ``level``, ``event``, ``logger`` and whatever context is
bound, notably ``call_id``), written to standard error and optionally appended to a file. The stdlib
``logging`` records of the libraries (panoramisk, httpx, alembic, websockets) go through the same processor
chain, so they are JSON and redacted too.

Redaction is the last step before rendering, after exception formatting, so nothing reaches a log line without
passing through it: values of identifying keys are replaced wholesale, and phone-number-like digit runs are
masked in every string, including the message and the rendered traceback. A hotline log is read by operators
and shipped to log collectors; patients' numbers and names must never be in it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path
from typing import Any, Final, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from ground.clock import utc_text

REDACTED: Final = "[redacted]"
PHONE: Final = "[phone]"

# Keys whose value identifies a patient, compared after lower-casing and turning "-" into "_". AMI and AGI use
# several spellings for the caller id, hence the list.
IDENTIFYING_KEYS: Final[frozenset[str]] = frozenset(
    {
        "caller",
        "callerid",
        "caller_id",
        "caller_number",
        "calleridnum",
        "calleridname",
        "connectedlinenum",
        "connectedlinename",
        "phone",
        "phone_number",
        "name",
        "patient_name",
        "patient",
        "mrn",
        "record_number",
        "id_number",
        "national_id",
        "birth_date",
        "agi_callerid",
        "agi_calleridname",
        "agi_rdnis",
        "agi_dnid",
        "rdnis",
        "dnid",
    }
)
# Keys ending in "_name" or "_phone" are identifying unless they name a thing of ours rather than a person.
NON_IDENTIFYING_KEYS: Final[frozenset[str]] = frozenset(
    {
        "logger",
        "logger_name",
        "event",
        "flow",
        "flow_name",
        "node_name",
        "channel_name",
        "step_name",
        "app_name",
        "queue_name",
        "skill_name",
        "prompt_name",
        "host_name",
        "file_name",
        "table_name",
        "column_name",
        "timestamp",
        "level",
    }
)

# Tokens that look like long digit runs but are not phone numbers, found first and left alone: UUIDs (the
# last group has 12 digits), also with a prefix such as "agent-" or "hold-" (the queue's legs and bridges) or a
# suffix such as "-conversation-1" (recording names),
# Asterisk unique ids / channel ids ("1732623456.12", epoch seconds dot sequence), channel sequence suffixes
# with a hex letter ("Local/x@ctx-0000002a;1"), and ISO dates and timestamps ("2024-11-26" would otherwise
# read as an 8-digit hyphenated number).
_KEEP_RE: Final = re.compile(
    r"""
      (?<![0-9A-Fa-f]) [0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12} (?![0-9A-Fa-f]|-\d)
    | (?<![\d.+]) 1\d{9}\.\d{1,9} (?![\d.])
    | (?<=-) (?=\d*[a-fA-F]) [0-9a-fA-F]{8} (?![0-9A-Za-z])
    | (?<![\d+]) \d{4}-\d{2}-\d{2}
      (?:[T\ ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)? (?!\d)
    """,
    re.VERBOSE,
)
# A phone number: 7 or more digits, optionally a leading "+", optionally single spaces or hyphens between
# digit groups ("13800138000", "+86 138-0013-8000", "010-12345678"). ``\d`` is deliberately Unicode-aware so
# full-width digits are caught too. Other long digit runs are masked as well; that is the safe side.
_PHONE_RE: Final = re.compile(r"(?<!\d)\+?\d(?:[ -]?\d){6,}(?!\d)")
# Asterisk channel names end in an 8-hex-digit sequence number ("PJSIP/agent-00000001"), often all digits.
# That suffix is kept when it follows a channel technology and a non-digit; the resource before it is still
# scanned.
_CHANNEL_PREFIX_RE: Final = re.compile(r"(?:PJSIP|SIP|IAX2|Local|DAHDI|Message)/\S*[^\d\s]-\Z")
_CHANNEL_SEQUENCE_DIGITS: Final = 8
# Integers of 7 digits or more might be a phone number passed as a number.
_MIN_PHONE_INT: Final = 1_000_000
_MAX_DEPTH: Final = 16

# Library loggers that log caller data or every frame at DEBUG: never below these levels, whatever the
# configured level. panoramisk logs the AGI headers (with the caller id) at DEBUG; websockets logs ARI event
# frames; httpx logs every ARI request URL at INFO; alembic announces each of its plugins at INFO.
_LIBRARY_FLOORS: Final[Mapping[str, int]] = {
    "alembic": logging.WARNING,
    "panoramisk": logging.INFO,
    "websockets": logging.INFO,
    "httpcore": logging.INFO,
    "httpx": logging.WARNING,
    "asyncio": logging.INFO,
}
_HANDLER_PREFIX: Final = "medhotline."


def _is_identifying(key: str) -> bool:
    normal = key.lower().replace("-", "_")
    if normal in NON_IDENTIFYING_KEYS:
        return False
    return (
        normal in IDENTIFYING_KEYS
        or normal.endswith(("_phone", "_name"))
        or "callerid" in normal
        or "caller_id" in normal
    )


def _phone_or_channel_sequence(match: re.Match[str]) -> str:
    digits = match.group()
    if (
        len(digits) == _CHANNEL_SEQUENCE_DIGITS
        and digits.isascii()
        and digits.isdigit()
        and _CHANNEL_PREFIX_RE.search(match.string, 0, match.start())
    ):
        return digits
    return PHONE


def _mask_phones(text: str) -> str:
    """Mask phone-like runs in ``text`` outside the protected tokens (UUIDs, unique ids, timestamps)."""
    # Most values (event names, levels, agent ids) hold no run of seven digits at all. A run found in a piece
    # between protected tokens is part of a maximal run in the whole text, which matches too: so no match in the
    # whole text means nothing to mask.
    if _PHONE_RE.search(text) is None:
        return text
    return _mask_between_kept(text)


def _mask_between_kept(text: str) -> str:
    out: list[str] = []
    pos = 0
    for keep in _KEEP_RE.finditer(text):
        out.append(_PHONE_RE.sub(_phone_or_channel_sequence, text[pos : keep.start()]))
        out.append(keep.group())
        pos = keep.end()
    out.append(_PHONE_RE.sub(_phone_or_channel_sequence, text[pos:]))
    return "".join(out)


def _redact_value(value: Any, depth: int) -> Any:
    result: Any
    if depth > _MAX_DEPTH:
        result = "[too deep]"
    elif isinstance(value, str):
        result = _mask_phones(value)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MIN_PHONE_INT:
        result = PHONE
    elif value is None or isinstance(value, bool | int | float):
        result = value
    elif isinstance(value, Mapping):
        result = {
            str(k): (REDACTED if v is not None and _is_identifying(str(k)) else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    elif isinstance(value, list | tuple | set | frozenset):
        items = [_redact_value(v, depth + 1) for v in value]
        result = tuple(items) if isinstance(value, tuple) else items
    else:
        # Anything else would be rendered with repr() or str() by the JSON renderer, out of our sight: render
        # it here so the result is scanned too (a dataclass holding a phone number must not slip through).
        result = _mask_phones(str(value))
    return result


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Structlog processor: mask identifying keys and phone-like digit runs everywhere in the event.

    Must run last before the renderer (after ``format_exc_info``), so that the message, every bound value and
    the rendered traceback are covered.
    """
    result: EventDict = {}
    for key, value in event_dict.items():
        if key.startswith("_"):
            # ProcessorFormatter bookkeeping (_record, _from_structlog): never rendered.
            result[key] = value
        elif value is not None and _is_identifying(key):
            result[key] = REDACTED
        else:
            result[key] = _redact_value(value, 0)
    return result


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """Append-only log file created with mode 0600, also when reopened after logrotate moved it away."""

    def _open(self) -> TextIOWrapper:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.baseFilename, flags, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _add_timestamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """ISO 8601 UTC timestamp; for stdlib records the record's own creation time.

    Foreign records go through the pre-chain once per handler: taking the record's time makes the file and the
    stream carry the same timestamp for the same line.
    """
    created = event_dict.pop(_LOGGED_AT, None)  # a line held before structlog saw it (_Deferred)
    if not isinstance(created, float):
        record = event_dict.get("_record")
        created = record.created if isinstance(record, logging.LogRecord) else time.time()
    moment = datetime.fromtimestamp(created, UTC)
    event_dict["timestamp"] = utc_text(moment)
    return event_dict


def _shared_processors() -> list[Processor]:
    """Processors that both structlog calls and foreign stdlib records go through before formatting."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_timestamp,
    ]


class _RenderOnce(structlog.stdlib.ProcessorFormatter):
    """The processor chain (redaction, JSON) runs once per record, not once per handler: the stream and the file
    get the same text, and a log line on a call's way to the agent's phone costs half as much."""

    _ATTRIBUTE: Final = "_medhotline_line"

    def format(self, record: logging.LogRecord) -> str:
        rendered = record.__dict__.get(self._ATTRIBUTE)
        if isinstance(rendered, str):
            return rendered
        rendered = super().format(record)
        setattr(record, self._ATTRIBUTE, rendered)
        return rendered


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(level: str = "info", log_file: Path | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger to write redacted JSON lines.

    Idempotent: the handlers installed by a previous call are removed (and closed) first, so reconfiguring
    (tests, reload) never duplicates lines.
    """
    root_level = _level_number(level)
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: module-level loggers must follow a later reconfiguration.
        cache_logger_on_first_use=False,
    )
    formatter = _RenderOnce(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # A plain-text traceback (no local variables: those would carry call data past redaction).
            structlog.processors.format_exc_info,
            redact,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
    )

    handlers: list[logging.Handler] = [_Held(logging.StreamHandler(stream if stream is not None else sys.stderr))]
    handlers[0].set_name(_HANDLER_PREFIX + "stream")
    if log_file is not None:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        file_handler = _Held(_PrivateFileHandler(log_file, encoding="utf-8"))
        file_handler.set_name(_HANDLER_PREFIX + "file")
        handlers.append(file_handler)

    root = logging.getLogger()
    for old in list(root.handlers):
        if (old.get_name() or "").startswith(_HANDLER_PREFIX):
            root.removeHandler(old)
            old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(root_level)
    for name, floor in _LIBRARY_FLOORS.items():
        logging.getLogger(name).setLevel(max(root_level, floor))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A typed structlog logger named like a stdlib logger (``medhotline.ivr``...).

    Its info lines logged while a hold is taken (hold_lines) are kept before structlog even sees them."""
    return cast(structlog.stdlib.BoundLogger, _HoldingLogger(structlog.stdlib.get_logger(name)))


class _HoldingLogger:
    """A structlog logger whose ``info`` lines are kept as they are called while a hold is taken: the cheapest
    point to keep them (structlog would build a logger, run its processors and make a stdlib record first, about
    0.15 ms on a call's way to the phone). Everything else is the structlog logger's own."""

    def __init__(self, inner: structlog.stdlib.BoundLogger) -> None:
        self._inner = inner

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _GATE.defer(self._inner, event, args, kw):
            return None
        return self._inner.info(event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# -- holding lines back on a call's way to the agent's phone ------------------------------------------------------
# Writing a line (redaction, JSON, two writes) costs the event loop 0.1-0.4 ms, and three lines lie between a
# caller's arrival and the agent's phone ringing. While a hold is taken (hold_lines), the service's own info lines
# are kept, in order, and written when the last hold is released, or at the latest HOLD_SECONDS after the first
# line was kept (under load, when holds overlap all the time). Each line's timestamp and bound context are taken
# when it is logged, so a held line reads exactly as it would have. Warnings and errors, and lines of other
# libraries (whose context is bound only when they are written), are never held: they write the held lines first.
HOLD_SECONDS: Final = 0.05
_HOLD_MAX_LINES: Final = 2000
# The moment a line kept before structlog saw it was logged (_add_timestamp takes it instead of "now").
_LOGGED_AT: Final = "_medhotline_logged_at"


@dataclass(frozen=True, slots=True)
class _Deferred:
    """An info line of ours kept as it was called (``_HoldingLogger``): written later with the context and the time
    of that call. Its arguments are kept as they are, not copied: lines on the hold's path log plain values."""

    logger: structlog.stdlib.BoundLogger
    event: str | None
    args: tuple[Any, ...]
    kw: dict[str, Any]
    at: float
    context: contextvars.Context

    def write(self) -> None:
        self.context.run(self.logger.info, self.event, *self.args, **self.kw, **{_LOGGED_AT: self.at})


class _Gate:
    """The held lines of every handler, in order, and how many holds are taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds = 0
        self._since: float | None = None
        self._lines: list[tuple[logging.Handler, logging.LogRecord] | _Deferred] = []
        self._writing = False  # held lines are being written: none of them is kept again

    def take(self) -> None:
        with self._lock:
            self._holds += 1
        _flush_later()

    def give_back(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)
            due = self._holds == 0
        if due:
            self.flush()

    def keep(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        """Keep ``record`` for ``handler`` if a hold is taken and its time is not up; False: write it now."""
        if record.levelno >= logging.WARNING or not _from_structlog(record):
            return False
        return self._kept((handler, record))

    def defer(
        self, logger: structlog.stdlib.BoundLogger, event: str | None, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> bool:
        """Keep an info line as it is called (``_HoldingLogger``) if a hold is taken and its time is not up."""
        if not self._holds or "exc_info" in kw or "stack_info" in kw:  # a traceback is taken when it is written
            return False
        return self._kept(_Deferred(logger, event, args, kw, time.time(), contextvars.copy_context()))

    def _kept(self, line: tuple[logging.Handler, logging.LogRecord] | _Deferred) -> bool:
        with self._lock:
            if not self._holds or self._writing:
                return False
            now = time.monotonic()
            if self._since is None:
                self._since = now
            elif now - self._since >= HOLD_SECONDS or len(self._lines) >= _HOLD_MAX_LINES:
                return False
            self._lines.append(line)
            return True

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._since = self._lines, [], None
            if not lines:
                return
            writing, self._writing = self._writing, True
        try:
            for line in lines:
                if isinstance(line, _Deferred):
                    line.write()
                elif isinstance(line[0], _Held):
                    line[0].inner.handle(line[1])
        finally:
            with self._lock:
                self._writing = writing

    def flush_if_due(self) -> None:
        with self._lock:
            due = self._since is not None and (not self._holds or time.monotonic() - self._since >= HOLD_SECONDS)
        if due:
            self.flush()


_GATE: Final = _Gate()


def _from_structlog(record: logging.LogRecord) -> bool:
    """A line of ours: structlog's wrap_for_formatter attached ``_logger`` and ``_name`` (its context is bound)."""
    return hasattr(record, "_logger") and hasattr(record, "_name")


def _flush_later() -> None:
    """Make sure held lines go out within HOLD_SECONDS even if nothing else is logged or released."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_later(HOLD_SECONDS, _GATE.flush_if_due)


class _Held(logging.Handler):
    """A handler whose lines wait while a hold is taken (see hold_lines); everything else is ``inner``'s."""

    def __init__(self, inner: logging.Handler) -> None:
        super().__init__()
        self.inner = inner

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self.inner.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        if _GATE.keep(self, record):
            return
        _GATE.flush()  # what was held comes first
        self.inner.handle(record)

    def flush(self) -> None:
        _GATE.flush()
        self.inner.flush()

    def close(self) -> None:
        _GATE.flush()
        self.inner.close()
        super().close()


class LineHold:
    """A hold on the service's info lines (hold_lines); ``release`` may be called any number of times."""

    def __init__(self) -> None:
        self._held = True
        _GATE.take()

    def release(self) -> None:
        if self._held:
            self._held = False
            _GATE.give_back()


def hold_lines() -> LineHold:
    """Hold info lines back until the returned hold is released (or HOLD_SECONDS pass): for the moments on a
    caller's way to an agent's phone, where writing them would delay the ring."""
    return LineHold()


@contextmanager
def bind_call(call_id: str) -> Iterator[None]:
    """Bind ``call_id`` into every log line emitted in this context (this task and the tasks it starts)."""
    with structlog.contextvars.bound_contextvars(call_id=call_id):
        yield
