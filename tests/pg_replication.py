"""A throw-away PostgreSQL primary with a synchronous streaming replica, for failover tests.

PostgreSQL's own replication only: ``pg_basebackup -R`` clones the primary into a standby that streams its WAL,
``synchronous_standby_names`` on the primary makes a COMMIT return only once the standby has flushed it, and
``pg_ctl promote`` turns the standby into the new primary. Both servers listen on free loopback ports in a
temporary directory (mode 0700, owned by the ``postgres`` user when the tests run as root, like
scripts/postgres.sh), and everything is stopped and removed at the end. With ``tls=True`` both take TCP over TLS
only (``tests.pg_tls``: a private CA, ``hostssl`` lines), the standby streams from the primary over TLS, and every
client, the helper's own included, connects with ``sslmode=verify-full``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from medhotline.sandbox_pki import PkiFiles
from tests.pg_tls import make_tls_only, verify_full

STANDBY_NAME = "medhotline_standby"


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    data: Path
    port: int


class ReplicatedPostgres:
    """A primary and one synchronous standby; ``url`` names both (libpq multi-host, read-write target)."""

    def __init__(self, base: Path, binaries: Path, *, tls: bool = False) -> None:
        self._base = base
        self._bin = binaries
        self._tls = tls
        self.pki: PkiFiles | None = None  # with tls, once started
        self.primary = Server("primary", base / "primary", _free_port())
        self.standby = Server("standby", base / "standby", _free_port())
        self.database = "medhotline"

    @property
    def url(self) -> str:
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        query = urlencode({"target_session_attrs": "read-write", **self._libpq()})
        return f"postgresql+psycopg://postgres@{hosts}/{self.database}?{query}"

    def url_of(self, server: Server) -> str:
        """One server's URL (no failover), verified like ``url`` when TLS is on."""
        query = urlencode(self._libpq())
        return f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/{self.database}{'?' + query if query else ''}"

    def _libpq(self) -> dict[str, str]:
        return verify_full(self.pki) if self.pki is not None else {}

    def _conninfo(self, server: Server, database: str) -> str:
        params = {"host": "127.0.0.1", "port": str(server.port), "user": "postgres", "dbname": database}
        return " ".join(f"{key}={value}" for key, value in {**params, **self._libpq()}.items())

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}")

    def _start(self, server: Server, *settings: str) -> None:
        options = f"-p {server.port} -k {self._base} -c listen_addresses=127.0.0.1 -c fsync=off " + " ".join(settings)
        log = self._base / f"{server.name}.log"
        self._run("pg_ctl", "-D", str(server.data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.primary.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale")
        if self._tls:
            # Before the first start, in the primary's data directory: the standby's clone inherits it all.
            self.pki = make_tls_only(self._base, self.primary.data)
        # A COMMIT waits until the standby has flushed it (synchronous_commit = on, the default): an acknowledged
        # write is on both servers. Set on the primary's command line only, so the standby does not inherit it:
        # once promoted, with no standby of its own, it must not wait for one.
        self._start(self.primary, f"-c synchronous_standby_names={STANDBY_NAME}")
        self._run(
            "pg_basebackup",
            # -R writes this conninfo (with sslmode and sslrootcert) as the standby's primary_conninfo.
            *("-d", self._conninfo(self.primary, "replication")),
            *("-D", str(self.standby.data), "-R", "-X", "stream", "-c", "fast"),
        )
        # cluster_name is the standby's application_name on the primary when primary_conninfo names none.
        self._start(self.standby, f"-c cluster_name={STANDBY_NAME}")
        self.sql(self.primary, f"CREATE DATABASE {self.database}")
        self._wait_sync()

    def sql(self, server: Server, statement: str) -> str:
        command = [str(self._bin / "psql"), "-d", self._conninfo(server, "postgres"), "-XAtqc", statement]
        if not (self._bin / "psql").exists():
            command[0] = "psql"
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql on the {server.name} failed: {done.stderr.strip()[-400:]}")
        return done.stdout.strip()

    def _wait_sync(self) -> None:
        query = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"
        deadline = time.monotonic() + 30
        while self.sql(self.primary, query) != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not become a synchronous standby within 30 s")
            time.sleep(0.1)

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every process it started, as a machine losing power would."""
        pid = int((self.primary.data / "postmaster.pid").read_text().splitlines()[0])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for victim in (pid, *map(int, children)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def promote_standby(self) -> None:
        """``pg_ctl promote``: the standby ends recovery and takes writes (waits until it does)."""
        self._run("pg_ctl", "-D", str(self.standby.data), "-w", "-t", "60", "promote")

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            if (server.data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self._run("pg_ctl", "-D", str(server.data), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def replicated_postgres(*, tls: bool = False) -> Iterator[ReplicatedPostgres]:
    """A started primary + synchronous standby, stopped and removed afterwards (RuntimeError if none installed).

    ``tls``: both TLS-only, replication included, with a private CA (``cluster.pki``); ``url`` verifies it."""
    binaries = pg_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="medhotline-pgrepl."))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    cluster = ReplicatedPostgres(base, binaries, tls=tls)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    """``python -m tests.pg_replication [--tls]``: a sandbox primary + synchronous standby for trying a failover by
    hand (``--tls``: TLS only, the URL with ``sslmode=verify-full``).

    Prints the multi-host URL for ``[database] url`` (or ``MEDHOTLINE__DATABASE__URL``) and the commands that kill
    the primary and promote the standby, then waits; Ctrl-C or SIGTERM stops both servers and removes them.
    """
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with replicated_postgres(tls="--tls" in sys.argv[1:]) as pg:
        binaries = pg_bin()
        as_postgres = "runuser -u postgres -- " if os.geteuid() == 0 else ""
        print(f"url = {pg.url!r}")
        print(f"primary: port {pg.primary.port}, data {pg.primary.data} (synchronous standby: {STANDBY_NAME})")
        print(f"standby: port {pg.standby.port}, data {pg.standby.data}")
        print(f"kill the primary:  kill -9 $(head -1 {pg.primary.data / 'postmaster.pid'})")
        print(f"promote:           {as_postgres}{binaries}/pg_ctl -D {pg.standby.data} -w promote")
        print("Ctrl-C stops both and removes them.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
