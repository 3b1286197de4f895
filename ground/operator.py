"""Who runs a command at the host's shell: the one audit identity every command gives the operator.

Whoever runs the CLI has database access anyway; the audit trail still says who it was. Every command that
acts without ``--by``/``--as`` (an account, checked against the database) records the operator as
``os:<login>`` with the role ``operator``, so one person shows up as one identity whatever the command.
"""

from __future__ import annotations

import getpass
import re
from typing import Final

from ground.errors import CommandError

OPERATOR_ROLE: Final = "operator"
UNKNOWN_OPERATOR: Final = "os:unknown"
# A login name fit for the audit log's actor field (see compliance.audit); anything else is not repeated.
_LOGIN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,100}")
# What the audit log accepts as an actor (compliance.audit checks the same when it appends).
_ACTOR: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}")


def operator_id(login: str | None = None) -> str:
    """``os:<login>`` of the user running this process (or of ``login``); ``os:unknown`` when the login name
    cannot be had (no passwd entry, e.g. in a container) or does not fit the audit log's actor field."""
    if login is None:
        try:
            login = getpass.getuser()
        except (OSError, KeyError):
            return UNKNOWN_OPERATOR
    return f"os:{login}" if _LOGIN.fullmatch(login) else UNKNOWN_OPERATOR


def actor_id(given: str | None, option: str = "--as") -> str:
    """The audit actor of a command: the account given with ``option`` when there is one, else the operator at
    the shell (:func:`operator_id`). An empty or malformed value is refused naming the option, never taken for
    the operator: a script's unset variable must not make the operator's identity depend on the command."""
    if given is None:
        return operator_id()
    if not _ACTOR.fullmatch(given):
        raise CommandError(f"{option} must be an account id (letters, digits and _ . : @ / -, up to 128)")
    return given
