"""A recording's end is recorded through a database failover: ``finish`` is retried while no primary answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from structlog.testing import capture_logs

from ground.db import DatabaseUnavailable
from recordings.capture import CallRecordings
from recordings.ingest import Ingestor
from recordings.store import RecordingRow, RecordingStore

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


class Store:
    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.finished: list[str] = []
        self.attempts = 0

    def finish(self, recording_id: str, ended_at: datetime) -> bool:
        self.attempts += 1
        if self.outages > 0:
            self.outages -= 1
            raise DatabaseUnavailable("database at postgresql+psycopg://…: the primary is gone")
        self.finished.append(recording_id)
        return True


class Ingest:
    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.ingested: list[str] = []

    def spool_file(self, row: RecordingRow) -> Path:
        return self.spool / f"{row.name}.wav"

    async def ingest(self, recording_id: str) -> None:
        self.ingested.append(recording_id)


def row() -> RecordingRow:
    return cast(RecordingRow, type("Row", (), {"id": "r1", "call_id": "c1", "name": "conversation-c1-1"})())


async def test_the_finish_of_a_recording_is_retried_and_then_ingested(tmp_path: Path) -> None:
    store, ingest = Store(outages=2), Ingest(tmp_path)
    recordings = CallRecordings(
        cast(RecordingStore, store), cast(Ingestor, ingest), None, department="hotline", clock=lambda: T0
    )
    with capture_logs() as logs:
        await recordings._finished(row(), started=False)
        await recordings.drain(5)
    assert store.finished == ["r1"]
    assert store.attempts == 3
    assert ingest.ingested == ["r1"]
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == ["recording.database_retry"] * 2
