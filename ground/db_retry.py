"""Retrying a database write while no writable PostgreSQL primary answers (a failover in progress).

One policy for every writer that must not give up during a promotion (call records, audit entries, the routing
engine's reservations and rings, recordings' rows): a :class:`~ground.db.DatabaseUnavailable` is retried with a
growing pause for a bounded time. The pool has dropped the dead connection, so each attempt connects afresh
through the URL's host list to whichever server is the primary now. Any other error (a refusal) is not retried.
Only writes that are idempotent under a repeat may use it: a COMMIT cut off by the failover may have been stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, TypeVar

from ground.db import DatabaseUnavailable

_T = TypeVar("_T")

RETRY_SECONDS: Final = 60.0
FIRST_PAUSE: Final = 0.2
LONGEST_PAUSE: Final = 2.0


async def while_unavailable(
    func: Callable[..., _T],
    *args: object,
    retry_for: float = RETRY_SECONDS,
    on_retry: Callable[[DatabaseUnavailable, float], None] | None = None,
    first_pause: float = FIRST_PAUSE,
    longest_pause: float = LONGEST_PAUSE,
) -> _T:
    """``func(*args)`` in a thread, retried on DatabaseUnavailable for up to ``retry_for`` seconds.

    ``on_retry(error, pause)`` is told before each pause (for a warning in the caller's own words). Once the next
    pause would pass the deadline, the last DatabaseUnavailable is raised; other errors propagate at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    pause = first_pause
    while True:
        try:
            return await asyncio.to_thread(func, *args)
        except DatabaseUnavailable as exc:
            if loop.time() + pause > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest_pause)
