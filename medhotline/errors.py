"""The root of the project's own exceptions.

Library errors (httpx, websockets, SQLAlchemy, OSError from sockets) are mapped to these at the adapter edge,
so callers handle one family and the CLI can tell an operator's mistake from a bug. Messages never carry a
patient identifier.
"""


class MedhotlineError(Exception):
    """An expected failure with a message fit to show an operator as is."""
