"""Fixtures of the recordings tests: the recording store and the spool Asterisk records into (the key service,
sessions, audit log and store directory come from ``tests/unit/conftest.py``; data helpers from ``helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from recordings.store import RecordingStore


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> RecordingStore:
    return RecordingStore(sessions)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path
