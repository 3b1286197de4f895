"""The root of the project's own exceptions, and the exit codes of every ``medhotline`` command.

Library errors (httpx, websockets, SQLAlchemy, OSError from sockets) are mapped to these at the adapter edge,
so callers handle one family and the CLI can tell an operator's mistake from a bug. Messages never carry a
patient identifier.

Exit codes, the same for every command (scripts and monitoring rely on them):

- ``EXIT_OK`` 0: done; or the check found nothing wrong.
- ``EXIT_FAILED`` 1: an expected failure (a refusal, bad input, a MedhotlineError), or a check that found
  problems (``EXIT_PROBLEMS``: tampering in ``audit verify``, a broken record in ``records verify``, credentials
  needing attention); the message says which.
- ``EXIT_USAGE`` 2: the command line or the configuration is wrong; nothing was tried.
- ``EXIT_NOT_RUNNING`` 3: ``asterisk status`` only, like ``systemctl status``: stopped, not failed.
- ``EXIT_UNABLE`` 4: a check or a service could not run at all (database unreachable, schema not migrated,
  key unreadable), so it says nothing about what it would have checked.
- 130: interrupted (Ctrl-C).
"""

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_PROBLEMS: Final = EXIT_FAILED
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3
EXIT_UNABLE: Final = 4
EXIT_INTERRUPTED: Final = 130


class MedhotlineError(Exception):
    """An expected failure with a message fit to show an operator as is."""


class CommandError(MedhotlineError):
    """An expected failure of a command; its message is shown to the operator as is.

    Here at the bottom, with the exit codes, so command modules raise it without importing the CLI that
    registers them."""
