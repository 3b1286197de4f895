"""The real thing: the Asterisk 22 sandbox on free ports, ``medhotline serve`` as a child process, SIPp phones.

Started once per test session. In CI (``CI`` set) a missing prerequisite fails the run with the reason; it is
never skipped, because a skipped integration test is a missing test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import time
import wave
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ground import db
from ground.config import Config, load_config
from ivr.flow_loader import load_flows
from ivr.prompts import Voice, sound_name
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones import Action, PhoneCall, place_call
from medhotline.prompts import build_prompts
from medhotline.sandbox import Sandbox, SandboxError
from medhotline.service_process import KeyServiceProcess, ServiceProcess

IN_CI = bool(os.environ.get("CI"))
# A made-up caller number; the privacy tests look for it everywhere the service writes.
CALLER = "13912345678"
DIALPLANS = Path(__file__).resolve().parents[2] / "dialplans"


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"integration prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Hotline:
    config: Config
    config_path: Path
    sandbox: Sandbox
    service: ServiceProcess
    log_path: Path

    @functools.cached_property
    def _sessions(self) -> sessionmaker[Session]:
        # One engine for the test's reads, disposed by close(): an engine per read left pooled connections for
        # the garbage collector, which psycopg reports as unclosed (an error under pytest's warning filter).
        return db.make_sessionmaker(self.config.database_url)

    @property
    def repo(self) -> db.CallRepository:
        return db.CallRepository(self._sessions)

    def close(self) -> None:
        """Close the test's own database connections."""
        if "_sessions" in self.__dict__:
            bind = self._sessions.kw["bind"]
            bind.dispose()

    def call(
        self,
        number: str,
        presses: Sequence[Action] | None = None,
        hang_up_after_ms: int | None = None,
        *,
        media_port: int | None = None,
        timeout: float = 150.0,
    ) -> PhoneCall:
        """One SIPp patient (``CALLER``) calls ``number`` on the sandbox's SIP port (``place_call``). ``media_port``:
        where the phone receives RTP, for a test that captures what the patient hears (default: a free range)."""
        return place_call(
            target_host="127.0.0.1",
            target_port=self.config.asterisk.sip_port,
            service=number,
            local_port=free_port(socket.SOCK_DGRAM),
            media_port=free_rtp_range(4) if media_port is None else media_port,
            caller=CALLER,
            presses=presses or [],
            hang_up_after_ms=hang_up_after_ms,
            timeout=timeout,
        )

    def path(self, record: db.CallRecord) -> list[tuple[str, str | None, str | None]]:
        """(node, edge, input) of every step the call took."""
        return [(step.node, step.edge, step.input) for step in self.repo.steps(record.id)]

    def call_ids(self) -> set[str]:
        return {record.id for record in self.repo.list_recent(1000)}

    def finished_record(self, before: set[str], timeout: float = 15.0) -> db.CallRecord:
        """The one call that appeared since ``before``, once the service has finished recording it."""
        deadline = time.monotonic() + timeout
        while True:
            new = [r for r in self.repo.list_recent(1000) if r.id not in before]
            if len(new) == 1 and new[0].outcome != "in_progress":
                return new[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected one finished new call record, found {new}")
            time.sleep(0.2)

    def prompt_seconds(self, texts: list[str]) -> float:
        voice = Voice(self.config.prompts.voice, self.config.prompts.speed)
        total = 0.0
        for text in texts:
            path = self.sandbox.sounds_dir / f"{sound_name(text, voice)}.wav"
            with wave.open(str(path)) as wav:
                total += wav.getnframes() / wav.getframerate()
        return total

    def flow_texts(self, flow: str, nodes: list[str]) -> list[str]:
        loaded = load_flows(self.config.hotline.flows_dir)[flow]
        return [text for node in nodes if (text := loaded.flow.nodes[node].say)]

    def sound_of(self, flow: str, node: str) -> str:
        """The Asterisk sound name of a node's prompt (``medhotline/<digest>``)."""
        voice = Voice(self.config.prompts.voice, self.config.prompts.speed)
        return sound_name(self.flow_texts(flow, [node])[0], voice)

    def ms_of(self, flow: str, nodes: list[str]) -> int:
        return int(1000 * self.prompt_seconds(self.flow_texts(flow, nodes)))


def write_config(
    state: Path,
    instance: str,
    extra: str = "",
    *,
    flow: str = "hotline",
    extra_flows: tuple[Path, ...] = (),
    asterisk_extra: str = "",
) -> Path:
    rtp = free_rtp_range(60)
    # A copy of the shipped flows, so that tests can edit them while the service runs (hot reload).
    flows_dir = state / "dialplans"
    shutil.copytree(DIALPLANS, flows_dir)
    for extra_flow in extra_flows:
        shutil.copy(extra_flow, flows_dir / extra_flow.name)
    path = state / "medhotline.toml"
    path.write_text(
        f"""
[service]
state_dir = "{state}"
log_file = "{state / "service.jsonl"}"
log_level = "debug"

[asterisk]
sip_port = {free_port(socket.SOCK_DGRAM)}
rtp_start = {rtp}
rtp_end = {rtp + 60}
max_calls = 10
ari_port = {free_port(socket.SOCK_STREAM)}
{asterisk_extra}
ami_port = {free_port(socket.SOCK_STREAM)}

[asterisk.sandbox]
instance = "{instance}"

[fastagi]
port = {free_port(socket.SOCK_STREAM)}

[keyservice]
directory = "{state / "keys"}"

[hotline]
flows_dir = "{flows_dir}"
flow = "{flow}"
reload_interval = 0.3

[prompts]
# Faster speech keeps the suite short; the prompts are the shipped ones.
speed = 240
{extra}
""",
        encoding="utf-8",
    )
    return path


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        unavailable("the Asterisk sandbox needs root")
    for tool in ("debootstrap", "sipp", "espeak-ng", "sox", "unshare"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (scripts/bootstrap installs it)")


@contextlib.contextmanager
def running_hotline(
    state: Path,
    name: str,
    extra_config: str = "",
    *,
    flow: str = "hotline",
    extra_flows: tuple[Path, ...] = (),
    before_start: Callable[[Config], None] | None = None,
    asterisk_extra: str = "",
) -> Iterator[Hotline]:
    """A sandbox instance of its own and a service on it: Asterisk, database, prompts, `medhotline serve`.

    ``before_start`` runs once the database is migrated and before the service starts (e.g. to add agents).
    """
    check_prerequisites()
    path = write_config(
        state, f"{name}{os.getpid()}", extra_config, flow=flow, extra_flows=extra_flows, asterisk_extra=asterisk_extra
    )
    config = load_config(path, environ={})
    sandbox = Sandbox(config)
    try:
        sandbox.up()
    except SandboxError as exc:
        pytest.fail(f"the Asterisk sandbox could not start: {exc}", pytrace=False)
    try:
        db.upgrade(config.database_url)
        build_prompts(config)
        if before_start is not None:
            before_start(config)
        log_path = config.service.state_dir / "service.stdout"
        keyservice = KeyServiceProcess(config, path, config.service.state_dir / "keyservice.stdout")
        keyservice.start()
        try:
            service = ServiceProcess(config, path, log_path)
            service.start(timeout=60)
            hotline = Hotline(config, path, sandbox, service, log_path)
            try:
                yield hotline
            finally:
                hotline.close()
                returncode = hotline.service.stop()  # a test may have replaced it (killed, restarted)
            assert returncode == 0, f"medhotline serve exited with {returncode}; see {log_path}"
        finally:
            keyservice.stop()
    finally:
        sandbox.down()
        # Asterisk's own log goes with the instance; keep a copy for the session's scan for patient identifiers.
        asterisk_log = sandbox.instance_dir / "log" / "messages.log"
        if asterisk_log.exists():
            shutil.copy(asterisk_log, state / "asterisk-messages.log")
        shutil.rmtree(sandbox.instance_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def hotline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hotline]:
    """The shipped configuration: no speech engine, so `listen` nodes fall back to the key menu."""
    with running_hotline(tmp_path_factory.mktemp("hotline"), "test") as running:
        yield running


def finished_records(hotline: Hotline, before: set[str], count: int, timeout: float = 90.0) -> list[db.CallRecord]:
    """The ``count`` call records not in ``before``, once every one of them has ended (or AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        new = [r for r in hotline.repo.list_recent(1000) if r.id not in before]
        if len(new) == count and all(r.outcome != "in_progress" for r in new):
            return new
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} finished new call records, found {new}")
        time.sleep(0.2)
