"""Fixtures shared by the unit tests of several packages (recordings, scheduler, the quality review): the key
service in process on a real Unix socket (peer uid and token checked as in production), a client of it, and the
database's session factory and audit log. A test directory may override one (``medhotline`` has its own
``short_dir``; ``his`` counts what its ``keys`` are asked)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit import AuditLog, SqlAuditStore
from compliance.keyservice_client import KeyServiceClient
from compliance.keyservice_server import KeyServiceServer
from compliance.keystore import KeyStore
from tests.unit.recordings.helpers import TOKEN


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory: a Unix socket path must stay under ~100 bytes, which tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="mhrec-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keystore(tmp_path: Path) -> KeyStore:
    return KeyStore.create(tmp_path / "keys")


@pytest.fixture
async def keyservice(keystore: KeyStore, short_dir: Path) -> AsyncIterator[Path]:
    """The key service, in process, on a real Unix socket (peer uid and token checked as in production)."""
    socket_path = short_dir / "run" / "ks.sock"
    server = KeyServiceServer(keystore, TOKEN.encode())
    await server.start_unix_server(socket_path)
    try:
        yield socket_path
    finally:
        await server.aclose()


@pytest.fixture
async def keys(keyservice: Path) -> AsyncIterator[KeyServiceClient]:
    async with KeyServiceClient.unix(keyservice, TOKEN) as client:
        yield client


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"
