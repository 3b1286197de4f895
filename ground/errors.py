"""The root of the project's own exceptions.

Library errors (httpx, websockets, SQLAlchemy, OSError from sockets) are mapped to these at the adapter edge,
so callers handle one family and the CLI can tell an operator's mistake from a bug. Messages never carry a
patient identifier.
"""


class MedhotlineError(Exception):
    """An expected failure with a message fit to show an operator as is."""


# Process exit codes of every `medhotline` command, here at the bottom so command modules in any package can
# return them without importing the CLI that registers them.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(MedhotlineError):
    """An expected failure of a command; its message is shown to the operator as is."""
