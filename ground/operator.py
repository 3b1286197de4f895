"""Who runs a command at the host's shell: the one audit identity every command gives the operator.

Whoever runs the CLI has database access anyway; the audit trail still says who it was. Every command that
acts without ``--by``/``--as`` (an account, checked against the database) records the operator as
``os:<login>`` with the role ``operator``, so one person shows up as one identity whatever the command.
"""

from __future__ import annotations

import getpass
import re
from typing import Final

OPERATOR_ROLE: Final = "operator"
UNKNOWN_OPERATOR: Final = "os:unknown"
# A login name fit for the audit log's actor field (see compliance.audit); anything else is not repeated.
_LOGIN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,100}")


def operator_id(login: str | None = None) -> str:
    """``os:<login>`` of the user running this process (or of ``login``); ``os:unknown`` when the login name
    cannot be had (no passwd entry, e.g. in a container) or does not fit the audit log's actor field."""
    if login is None:
        try:
            login = getpass.getuser()
        except (OSError, KeyError):
            return UNKNOWN_OPERATOR
    return f"os:{login}" if _LOGIN.fullmatch(login) else UNKNOWN_OPERATOR
