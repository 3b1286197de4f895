"""Recordings' own data keys under KEK rotation: counted per KEK version, and rewrapped by ``keys rewrap``.

:func:`rewrap_everything` is the whole of ``keys rewrap``: the data keys through the key ring, then the
recordings' keys, and the audit entry of the recordings' rewrap; the command only parses, calls it and prints.

Each recording has a data key of its own, wrapped by the key service for ``recording:<id>`` and kept on its
row. Recordings are kept 15 to 30 years, far longer than any key-encryption key should live, so a rotation must
reach them too: a rewrap asks the key service to unwrap under the old KEK and wrap under the current one, and
swaps the row's wrapped key with a conditional UPDATE (a concurrent run can't lose a rewrap). The data key
itself, hence the encrypted file, is unchanged; nothing is re-encrypted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.keyservice_protocol import KeyServiceRefused
from compliance.keystore import UnwrapError, wrapped_version
from ground.db import rowcount
from ground.logs import get_logger
from recordings.tables import Recording

if TYPE_CHECKING:
    from compliance.audit import AuditLog
    from compliance.data_keys import DataKeyRing, RewrapReport

log = get_logger(__name__)


class Rewrapper(Protocol):
    async def rewrap(self, wrapped: bytes, purpose: str) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RecordingRewrap:
    kek_version: int
    rewrapped: int
    failed: tuple[str, ...]
    remaining: int


def counts_by_kek_version(engine: Engine) -> dict[int, int]:
    """How many recordings' data keys each KEK version wraps."""
    with Session(engine) as session:
        rows = session.execute(
            select(Recording.kek_version, func.count())
            .where(Recording.wrapped_key.is_not(None))
            .group_by(Recording.kek_version)
        ).all()
        return {int(version): int(count) for version, count in rows if version is not None}


async def rewrap_recordings(
    engine: Engine, keys: Rewrapper, current: int, *, limit: int | None = None
) -> RecordingRewrap:
    """Rewrap every recording key not under KEK ``current`` (resumable: rows done are skipped)."""
    sessions = sessionmaker(engine, expire_on_commit=False)

    def pending() -> list[tuple[str, bytes]]:
        with sessions() as session:
            rows = session.execute(
                select(Recording.id, Recording.wrapped_key)
                .where(Recording.wrapped_key.is_not(None), Recording.kek_version != current)
                .order_by(Recording.started_at)
            ).all()
            return [(str(i), bytes(w)) for i, w in rows if w is not None]

    def swap(recording_id: str, old: bytes, new: bytes, version: int) -> bool:
        with sessions.begin() as session:
            result = session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.wrapped_key == old)
                .values(wrapped_key=new, kek_version=version)
            )
            return bool(rowcount(result))

    todo = await asyncio.to_thread(pending)
    rewrapped = 0
    failed: list[str] = []
    for recording_id, wrapped in todo if limit is None else todo[:limit]:
        try:
            new = await keys.rewrap(wrapped, f"recording:{recording_id}")
            version = wrapped_version(new)
        except (KeyServiceRefused, UnwrapError) as exc:
            if isinstance(exc, KeyServiceRefused) and exc.code != "unwrap_failed":
                raise
            log.error("recording.rewrap_failed", recording_id=recording_id)
            failed.append(recording_id)
            continue
        if await asyncio.to_thread(swap, recording_id, wrapped, new, version):
            rewrapped += 1
    remaining = len(await asyncio.to_thread(pending))
    if failed:
        log.error("recording.rewrap_incomplete", failed=len(failed))
    return RecordingRewrap(current, rewrapped, tuple(failed), remaining)


async def rewrap_everything(
    ring: DataKeyRing,
    engine: Engine,
    keys: Rewrapper,
    audit: AuditLog,
    *,
    actor: str,
    role: str,
    reason: str,
    purpose: str | None = None,
    limit: int | None = None,
) -> tuple[RewrapReport, RecordingRewrap | None]:
    """``keys rewrap``: the data keys (audited by the ring), then, unless ``purpose`` names another store, each
    recording's own key, with one ``key_operation`` entry when anything changed or failed. ``None`` for the
    recordings when they were not asked for."""
    report = await ring.rewrap_all(actor=actor, role=role, reason=reason, purpose=purpose, limit=limit)
    if purpose not in (None, "recordings"):
        return report, None
    # Each recording's own key, kept on its row (recordings are kept 15-30 years: rotation must reach them).
    recordings = await rewrap_recordings(engine, keys, report.kek_version, limit=limit)
    if not (recordings.rewrapped or recordings.failed):
        return report, recordings  # nothing changed: nothing to audit
    await asyncio.to_thread(
        audit.append,
        actor=actor,
        role=role,
        action="key_operation",
        outcome="success" if not recordings.failed else "error",
        reason=reason,
        details={
            "operation": "rewrap_recordings",
            "kek_version": recordings.kek_version,
            "rewrapped": recordings.rewrapped,
            "failed": list(recordings.failed),
            "remaining": recordings.remaining,
        },
    )
    return report, recordings
