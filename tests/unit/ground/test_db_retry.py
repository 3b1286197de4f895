"""``ground.db_retry.while_unavailable``: a write retried while no writable primary answers, nothing else."""

from __future__ import annotations

import pytest

from ground.db import DatabaseError, DatabaseUnavailable
from ground.db_retry import while_unavailable


class Flaky:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls: list[tuple[object, ...]] = []

    def __call__(self, *args: object) -> str:
        self.calls.append(args)
        if len(self.calls) <= self.failures:
            raise self.error
        return "stored"


async def test_retried_with_growing_pauses_until_it_is_stored() -> None:
    write = Flaky(3, DatabaseUnavailable("primary gone"))
    pauses: list[float] = []
    result = await while_unavailable(
        write, "a", 1, on_retry=lambda exc, pause: pauses.append(pause), first_pause=0.01, longest_pause=0.03
    )
    assert result == "stored"
    assert write.calls == [("a", 1)] * 4
    assert pauses == [0.01, 0.02, 0.03]


async def test_given_up_after_retry_for_with_the_last_error() -> None:
    write = Flaky(1000, DatabaseUnavailable("primary gone"))
    with pytest.raises(DatabaseUnavailable, match="primary gone"):
        await while_unavailable(write, retry_for=0.1, first_pause=0.01, longest_pause=0.02)
    assert 2 <= len(write.calls) < 1000


async def test_a_refusal_is_raised_at_once() -> None:
    write = Flaky(1, DatabaseError("refused: duplicate key"))
    with pytest.raises(DatabaseError, match="refused"):
        await while_unavailable(write, first_pause=0.01)
    assert len(write.calls) == 1
