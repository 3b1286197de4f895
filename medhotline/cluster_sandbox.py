"""``medhotline cluster up``: several sandbox Asterisk nodes on one machine with Kamailio in front.

Each node is a sandbox instance of its own (``<instance>-node<i>``) on free ports, and, with ``services``, a
``medhotline serve`` of its own (its node name, ports and log through ``MEDHOTLINE__`` variables over the same
config file) on the one PostgreSQL of ``[database] url``; the front is the Kamailio that
``medhotline.kamailio_config`` generates for exactly those nodes. This is the one-machine picture of
docs/cluster.md; in production each node is a host and Kamailio runs on its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ground import db
from ground.config import ENV_PREFIX, RTP_PORTS_PER_CALL, Config, FrontConfig, parse_sip_address
from ground.logs import get_logger
from medhotline.free_ports import free_port, free_rtp_range
from medhotline.kamailio_config import write_front
from medhotline.sandbox import Sandbox, SandboxError
from medhotline.sandbox_pki import PkiError, PkiFiles, ensure_test_pki, write_whole
from medhotline.service_process import KeyServiceProcess, ServiceProcess

log = get_logger(__name__)

# A sandbox node is for trying the cluster out: a few calls, so a small RTP range (tests and benchmarks that
# load the nodes ask for more with ``max_calls``).
NODE_MAX_CALLS = 10


def node_config(
    config: Config,
    index: int,
    front_host: str,
    max_calls: int = NODE_MAX_CALLS,
    avoid: Sequence[tuple[int, int]] = (),
) -> Config:
    """Node ``index``'s configuration: its own sandbox instance, node name and free ports (an RTP range for
    ``max_calls`` calls, apart from the ``avoid`` ranges); it takes calls from the front's address (the patients'
    trunk is the proxy now)."""
    ast = config.asterisk
    rtp_ports = RTP_PORTS_PER_CALL * max_calls
    try:
        rtp = free_rtp_range(rtp_ports, ast.host, avoid)
    except OSError as exc:
        raise SandboxError(f"node {index}: {exc}") from None
    asterisk = ast.model_copy(
        update={
            "sip_port": free_port(socket.SOCK_DGRAM, ast.host),
            "ari_port": free_port(socket.SOCK_STREAM, ast.host),
            "ami_port": free_port(socket.SOCK_STREAM, ast.host),
            "rtp_start": rtp,
            "rtp_end": rtp + rtp_ports,
            "max_calls": max_calls,
            "patient_trunk_match": front_host,
            "sandbox": ast.sandbox.model_copy(update={"instance": f"{ast.sandbox.instance[:30]}-node{index}"}),
        }
    )
    log_file = config.service.log_file
    if log_file is not None:
        # One log per node: two processes appending JSON lines to one file would interleave them.
        log_file = log_file.with_name(f"{log_file.stem}-node{index}{log_file.suffix}")
    service = config.service.model_copy(update={"node_name": f"node{index}", "log_file": log_file})
    fastagi = config.fastagi.model_copy(update={"port": free_port(socket.SOCK_STREAM, config.fastagi.host)})
    sip = config.sip
    if sip.tls:
        # Each node its own SIP/TLS listener (the front reaches it there with node_transport = "tls").
        sip = sip.model_copy(update={"tls_port": free_port(socket.SOCK_STREAM, ast.host)})
    # Validated again as a whole, so a derived value that breaks a rule is reported here, not by Asterisk.
    return Config.model_validate(
        {
            **config.model_dump(),
            "asterisk": asterisk.model_dump(),
            "service": service.model_dump(),
            "fastagi": fastagi.model_dump(),
            "sip": sip.model_dump(),
        }
    )


def node_environment(node: Config) -> dict[str, str]:
    """The ``MEDHOTLINE__`` variables that turn the shared config file into ``node``'s (what ``node_config``
    changed): a node's service reads the same file as the others, plus these."""
    ast = node.asterisk
    values: dict[tuple[str, ...], object] = {
        ("service", "node_name"): node.service.node_name,
        ("asterisk", "sip_port"): ast.sip_port,
        ("asterisk", "ari_port"): ast.ari_port,
        ("asterisk", "ami_port"): ast.ami_port,
        ("asterisk", "rtp_start"): ast.rtp_start,
        ("asterisk", "rtp_end"): ast.rtp_end,
        ("asterisk", "max_calls"): ast.max_calls,
        ("asterisk", "patient_trunk_match"): ast.patient_trunk_match,
        ("asterisk", "sandbox", "instance"): ast.sandbox.instance,
        ("fastagi", "port"): node.fastagi.port,
    }
    if node.sip.tls:
        values[("sip", "tls_port")] = node.sip.tls_port
    if node.service.log_file is not None:
        values[("service", "log_file")] = node.service.log_file
    return {ENV_PREFIX + "__".join(part.upper() for part in key): str(value) for key, value in values.items()}


def services_problem(config: Config, count: int) -> str | None:
    """Why ``count`` nodes' services cannot share this configuration's database, or None."""
    if count > 1 and not config.database_url.startswith("postgresql"):
        return (
            "[database] url: the nodes' services share one database, and only PostgreSQL serves several "
            'processes (set url = "postgresql+psycopg://..."; scripts/postgres.sh starts a private one)'
        )
    if count > 1 and not config.cluster.enabled:
        return "[cluster] enabled: set it to true, or each node's service routes only its own callers"
    return None


def sip_options(host: str, port: int, timeout: float = 1.0, user: str | None = None) -> int | None:
    """Send one OPTIONS over UDP (to ``user``@, e.g. a node's health user); the status code of the answer, or None
    when nothing answered in time."""
    target = f"sip:{'' if user is None else user + '@'}{host}:{port}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        local = sock.getsockname()[1]
        tag = uuid.uuid4().hex[:12]
        message = (
            f"OPTIONS {target} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local};branch=z9hG4bK{tag};rport\r\n"
            f"From: <sip:probe@{host}:{local}>;tag={tag}\r\n"
            f"To: <{target}>\r\n"
            f"Call-ID: {tag}@{host}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        sock.settimeout(timeout)
        sock.sendto(message.encode(), (host, port))
        try:
            data = sock.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None
    first = data.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else None


@dataclass
class Node:
    config: Config
    sandbox: Sandbox
    service: ServiceProcess | None = None

    @property
    def sip_address(self) -> str:
        return f"{self.config.asterisk.host}:{self.config.asterisk.sip_port}"

    @property
    def tls_address(self) -> str:
        """Where the node's Asterisk takes SIP over TLS ([sip] tls)."""
        return f"{self.config.asterisk.host}:{self.config.sip.tls_port}"


class ClusterSandbox:
    """Start ``count`` sandbox nodes and Kamailio before them; ``down`` stops all of it, whatever started."""

    def __init__(
        self,
        config: Config,
        count: int,
        directory: Path,
        listen: str | None = None,
        *,
        services: bool = False,
        config_path: Path | None = None,
        max_calls: int = NODE_MAX_CALLS,
    ) -> None:
        """``services``: a ``medhotline serve`` per node (and one key service for all), reading ``config_path``
        (None: the file this process read, found the same way) plus its node's ``node_environment``.
        ``max_calls``: the concurrent calls each node is sized for (its RTP range and ARI pool)."""
        if count < 1:
            raise SandboxError(f"--nodes {count}: a cluster needs at least one node")
        problem = services_problem(config, count) if services else None
        if problem is not None:
            raise SandboxError(problem)
        if shutil.which("kamailio") is None:
            raise SandboxError("kamailio is not installed: run `apt-get install kamailio` (scripts/bootstrap does)")
        front = config.cluster.front
        if listen is not None:
            front = FrontConfig.model_validate({**front.model_dump(), "listen": listen})
        self.front_host, self.front_port = parse_sip_address(front.listen)
        self.directory = directory
        self.site_pki: PkiFiles | None = None
        if front.node_transport == "tls":
            front = self._tls_front(front, config)
        self.nodes: list[Node] = []
        for index in range(1, count + 1):
            cfg = node_config(config, index, self.front_host, max_calls, self.rtp_ranges())
            self.nodes.append(Node(cfg, Sandbox(cfg)))
        # Without a service no node has its ARI application registered: a service probe would take them all out.
        probe = front.probe if services else "asterisk"
        tls = front.node_transport == "tls"
        addresses = [n.tls_address if tls else n.sip_address for n in self.nodes]
        self.front = FrontConfig.model_validate({**front.model_dump(), "nodes": addresses, "probe": probe})
        self.log_path = directory / "kamailio.log"
        self._kamailio: subprocess.Popen[bytes] | None = None
        self.config = config
        self.services = services
        self.config_path = config_path
        self._keyservice: KeyServiceProcess | None = None

    def _tls_front(self, front: FrontConfig, config: Config) -> FrontConfig:
        """node_transport = "tls" on one machine: one site CA for the front and every node (as the hospital's PKI
        would be), a free TLS port for the front unless tls_listen names one; certificate paths left empty in the
        config are the site PKI's."""
        if not config.sip.tls:
            raise SandboxError(
                'cluster.front.node_transport = "tls": the nodes\' Asterisks take SIP over TLS only with [sip] '
                "tls = true (which also reaches the agents' phones over TLS only, with SRTP)"
            )
        hosts = list(dict.fromkeys([self.front_host, config.asterisk.host]))
        try:
            self.site_pki = pki = ensure_test_pki(self.directory / "pki", hosts)
        except PkiError as exc:
            raise SandboxError(str(exc)) from None
        tls_listen = front.tls_listen or f"{self.front_host}:{free_port(socket.SOCK_STREAM, self.front_host)}"
        return FrontConfig.model_validate(
            {
                **front.model_dump(),
                "tls_listen": tls_listen,
                "tls_cert_file": front.tls_cert_file or pki.server_cert,
                "tls_key_file": front.tls_key_file or pki.server_key,
                "node_ca_file": front.node_ca_file or pki.ca_cert,
            }
        )

    def _give_site_pki(self, node: Node) -> None:
        """The node's Asterisk presents a certificate of the site CA: its instance's PKI directory gets the site's
        files before the sandbox would make a CA of its own there (it keeps a complete set)."""
        pki = self.site_pki
        if pki is None:
            return
        target = PkiFiles.in_directory(node.sandbox.tls_dir)
        target.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("ca_key", "server_key", "client_key", "ca_cert", "server_cert", "client_cert"):
            source: Path = getattr(pki, name)
            write_whole(getattr(target, name), source.read_bytes(), 0o600 if name.endswith("key") else 0o644)

    def rtp_ranges(self) -> list[tuple[int, int]]:
        """Every node's RTP range: a caller's or phone's media ports must stay out of them, or a node that
        restarts can find one of its ports taken."""
        return [(n.config.asterisk.rtp_start, n.config.asterisk.rtp_end) for n in self.nodes]

    @property
    def front_address(self) -> str:
        return self.front.listen

    def up(self, timeout: float = 15.0, service_timeout: float = 60.0) -> None:
        try:
            for node in self.nodes:
                node.sandbox.ensure_rootfs()  # a first build replaces the root: the files below go in after it
                self._give_site_pki(node)
                node.sandbox.up()
            if self.services:
                self.start_services(service_timeout)
            self.start_front(timeout)
        except BaseException:
            self.down()
            raise

    def start_services(self, timeout: float = 60.0) -> None:
        """Migrate the shared database once, start the key service, then every node's service side by side."""
        db.upgrade(self.config.database_url)
        state = self.config.service.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)  # the key service refuses a state_dir others can read
        # One key service for the machine: every node's service reaches it through the shared state_dir.
        self._keyservice = KeyServiceProcess(self.config, self.config_path, state / "keyservice.stdout")
        self._keyservice.start()
        for node in self.nodes:
            log_path = state / f"service-{node.config.service.node_name}.stdout"
            node.service = ServiceProcess(node.config, self.config_path, log_path, node_environment(node.config))
            node.service.launch()
        for node in self.nodes:
            if node.service is not None:
                node.service.wait_ready(timeout)
        log.info("cluster.services_up", nodes=[n.config.service.node_name for n in self.nodes])

    def start_service(self, node: Node, timeout: float = 60.0) -> None:
        """(Re)start the node's service, e.g. after ``kill_service``; it takes its node name over (docs/cluster.md)."""
        log_path = self.config.service.state_dir / f"service-{node.config.service.node_name}.stdout"
        node.service = ServiceProcess(node.config, self.config_path, log_path, node_environment(node.config))
        node.service.start(timeout)

    def kill_service(self, node: Node) -> None:
        """SIGKILL the node's service only: its Asterisk stays up and goes on answering SIP."""
        if node.service is not None:
            node.service.kill()

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's service and its Asterisk, as a power cut would. ``down`` still cleans up."""
        if node.service is not None:
            node.service.kill()
        pid = node.sandbox.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start_front(self, timeout: float = 15.0) -> None:
        cfg = write_front(self.front, self.directory)
        check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise SandboxError(f"kamailio -c -f {cfg} refused the generated config:\n{check.stderr[-2000:]}")
        run_dir = self.directory / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # -DD: stay in the foreground (this process owns it and stops it); -E: log to the file above.
            self._kamailio = subprocess.Popen(
                ["kamailio", "-f", str(cfg), "-DD", "-E", "-Y", str(run_dir), "-P", str(run_dir / "kamailio.pid")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while sip_options(self.front_host, self.front_port, 0.5) != 200:
            if self._kamailio.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop_front()
                raise SandboxError(f"Kamailio did not answer on {self.front.listen}; its log:\n{tail}")
        log.info("cluster.front_up", listen=self.front.listen, nodes=list(self.front.nodes))

    def stop_front(self) -> None:
        proc, self._kamailio = self._kamailio, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def down(self) -> dict[str, int]:
        """Stop all of it; the exit code of every node's service that was running (0: a clean stop)."""
        self.stop_front()
        codes: dict[str, int] = {}
        for node in self.nodes:
            service, node.service = node.service, None
            if service is not None and service.proc is not None:
                codes[node.config.service.node_name] = service.stop()
        keyservice, self._keyservice = self._keyservice, None
        if keyservice is not None:
            keyservice.stop()
        for node in self.nodes:
            with contextlib.suppress(SandboxError):
                node.sandbox.down()
        return codes
