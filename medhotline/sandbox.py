"""The embedded Asterisk 22: Debian's ``asterisk`` package from ``sid`` in a chroot the project manages.

Layout: one root file system (``asterisk.sandbox.root``, built once with debootstrap, ~500 MB) shared by any
number of instances; each instance keeps its configuration, run, spool, log and database directories under
``/srv/medhotline/<instance>`` inside the chroot, so a demo, a test session and a second node never collide.

Asterisk runs inside a private mount namespace (``unshare --mount``): ``/dev`` and ``/proc`` are mounted into
the chroot only inside that namespace, so the kernel removes the mounts when Asterisk exits, crashed or not.
``down`` therefore never has mounts to chase, and a crash can't leave one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ground.config import Config
from ground.errors import MedhotlineError
from ground.logs import get_logger
from medhotline.apt_sources import MirrorNotFound, find_debian_mirror
from medhotline.asterisk_config import (
    TLS_FILE,
    AsteriskCredentials,
    TlsPaths,
    render_all,
    render_pjsip_tls,
    template_values,
)
from medhotline.sandbox_pki import PkiFiles, ensure_test_pki, write_whole

log = get_logger(__name__)

PACKAGES = ("asterisk", "asterisk-moh-opsound-gsm", "ca-certificates")
READY_MARKER = ".medhotline-rootfs-ready"
SOUNDS_DIR_IN_CHROOT = Path("/usr/share/asterisk/sounds")


class SandboxError(MedhotlineError):
    """The sandbox can't do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class SandboxStatus:
    running: bool
    pid: int | None
    version: str | None
    instance: str
    root: Path


def _in_chroot(path: Path) -> str:
    return "/" + str(path).lstrip("/")


class Sandbox:
    """Provision, start, stop and query one sandbox instance."""

    def __init__(self, config: Config) -> None:
        if config.asterisk.mode != "sandbox":
            raise SandboxError("asterisk.mode is 'external': the sandbox is not used, manage that Asterisk itself")
        self.config = config
        self.root = config.asterisk.sandbox.root
        self.instance = config.asterisk.sandbox.instance
        self.instance_in_chroot = Path("/srv/medhotline") / self.instance
        self.instance_dir = self.root / self.instance_in_chroot.relative_to("/")
        self.conf_in_chroot = self.instance_in_chroot / "etc" / "asterisk.conf"
        self.output_log = self.instance_dir / "asterisk.out"
        self.pid_file = self.instance_dir / "asterisk.pid"
        self.secrets_file = self.instance_dir / "secrets.json"
        # The instance's private CA and certificates ([sip] tls): inside the chroot, so Asterisk reads them there.
        self.tls_dir = self.instance_dir / "tls"
        self.trunk_secret_file = self.tls_dir / "trunk.secret"

    # -- provisioning -------------------------------------------------------------------------------

    @property
    def sounds_dir(self) -> Path:
        return self.root / _in_chroot(SOUNDS_DIR_IN_CHROOT).lstrip("/")

    def rootfs_ready(self) -> bool:
        return (self.root / READY_MARKER).exists()

    def ensure_rootfs(self) -> None:
        """Build the chroot once; a half-built one (interrupted debootstrap) is discarded, never used."""
        if self.rootfs_ready():
            return
        _require_root()
        if shutil.which("debootstrap") is None:
            raise SandboxError("debootstrap is not installed: run `apt-get install debootstrap` (as root)")
        mirror = self.config.asterisk.sandbox.mirror
        if not mirror:
            try:
                mirror = find_debian_mirror()
            except MirrorNotFound as exc:
                raise SandboxError(str(exc)) from None
        partial = self.root.with_name(self.root.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        suite = self.config.asterisk.sandbox.suite
        log.info("sandbox.debootstrap", suite=suite, target=str(self.root))
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            suite,
            str(partial),
            mirror,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise SandboxError(f"debootstrap of Debian {suite} failed (exit {result.returncode}):\n{tail}")
        (partial / READY_MARKER).write_text(f"{suite}\n", encoding="utf-8")
        if self.root.exists():
            shutil.rmtree(self.root)
        partial.rename(self.root)

    def module_dir_in_chroot(self) -> str:
        found = sorted(self.root.glob("usr/lib/*/asterisk/modules"))
        if not found:
            raise SandboxError(f"{self.root}: no Asterisk modules directory; remove it and run `up` again")
        return _in_chroot(found[0].relative_to(self.root))

    def credentials(self) -> AsteriskCredentials:
        """The instance's ARI/AMI secrets, generated on first use and kept 0600 beside its configuration."""
        if self.secrets_file.exists():
            data = json.loads(self.secrets_file.read_text(encoding="utf-8"))
            return AsteriskCredentials(**data)
        ast = self.config.asterisk
        generated = AsteriskCredentials.generate(self.config)
        creds = AsteriskCredentials(
            ari_username=generated.ari_username,
            ari_password=ast.ari_password.get_secret_value() if ast.ari_password else generated.ari_password,
            ami_username=generated.ami_username,
            ami_secret=ast.ami_secret.get_secret_value() if ast.ami_secret else generated.ami_secret,
        )
        self.instance_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(self.secrets_file, json.dumps(creds.__dict__))
        return creds

    def render(self) -> None:
        """Write the instance's Asterisk configuration (each file written whole, then renamed)."""
        values = template_values(
            self.config,
            self.credentials(),
            instance_dir=str(self.instance_in_chroot),
            module_dir=self.module_dir_in_chroot(),
            tls=self.tls_paths() if self.config.asterisk.tls else None,
        )
        etc = self.instance_dir / "etc"
        # Asterisk creates files, not its spool's base directories: without spool/recording every ARI recording
        # fails (HTTP 500), without spool/monitor MixMonitor's relative paths do.
        for sub in ("etc", "lib", "spool", "spool/recording", "spool/monitor", "run", "log", "cache"):
            (self.instance_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, text in render_all(values).items():
            _write_private(etc / name, text)
        tls = self.tls_paths() if self.config.sip.tls else None
        password = self.tls_trunk_password() if tls is not None else ""
        _write_private(etc / TLS_FILE, render_pjsip_tls(self.config, tls, password))

    def pki(self) -> PkiFiles:
        """The instance's private CA, server and client certificates (made on first use, keys 0600)."""
        self.instance_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return ensure_test_pki(self.tls_dir, [self.config.asterisk.host])

    def tls_paths(self) -> TlsPaths:
        """The server certificate, key and CA as Asterisk sees them, inside the chroot."""
        files = self.pki()
        return TlsPaths(
            cert_file=_in_chroot(files.server_cert.relative_to(self.root)),
            key_file=_in_chroot(files.server_key.relative_to(self.root)),
            ca_file=_in_chroot(files.ca_cert.relative_to(self.root)),
        )

    def tls_trunk_password(self) -> str:
        """The digest password of the patients' trunk over TLS, generated once per instance and kept 0600."""
        if self.trunk_secret_file.exists():
            return self.trunk_secret_file.read_text(encoding="utf-8").strip()
        self.pki()
        password = secrets.token_urlsafe(24)
        _write_private(self.trunk_secret_file, password)
        return password

    def write_etc_file(self, name: str, text: str) -> bool:
        """Write one generated configuration file (e.g. the agents' endpoints); False when it is unchanged."""
        path = self.instance_dir / "etc" / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, text)
        return True

    # -- lifecycle ---------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this instance's Asterisk, found from /proc, not only from the pid file."""
        conf = str(self.conf_in_chroot)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                # The daemon runs with -f; remote consoles (-r/-rx) share its -C but are not it.
                if not cmdline[0].endswith(b"asterisk") or b"-f" not in cmdline or conf.encode() not in cmdline:
                    continue
                if os.readlink(entry / "root") == str(self.root):
                    return int(entry.name)
            except (OSError, IndexError):
                continue
        return None

    def up(self) -> SandboxStatus:
        """Start the instance and wait until Asterisk is fully booted. Running already is not an error."""
        _require_root()
        if self.pid() is not None:
            return self.status()
        self.ensure_rootfs()
        self._check_ports_free_soon()
        self.render()
        for stale in (self.instance_dir / "run").glob("*"):
            stale.unlink(missing_ok=True)
        root = str(self.root)
        script = (
            'set -e; mount --rbind /dev "$1/dev"; mount -t proc proc "$1/proc"; '
            'exec chroot "$1" /usr/sbin/asterisk -f -n -C "$2"'
        )
        # `setsid -f` detaches Asterisk from this process (and its session) at once: it outlives the CLI that
        # started it, and no Popen object is left to warn or to reap it. Its pid is found from /proc.
        with self.output_log.open("ab") as out:
            launcher = subprocess.run(
                [
                    "setsid",
                    "-f",
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    root,
                    str(self.conf_in_chroot),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if launcher.returncode != 0:
            raise SandboxError(f"could not launch Asterisk (exit {launcher.returncode}):\n{self._output_tail()}")
        try:
            pid = self._wait_fully_booted()
        except SandboxError:
            self.down()
            raise
        self.pid_file.write_text(f"{pid}\n", encoding="utf-8")
        log.info("sandbox.up", instance=self.instance, pid=pid)
        return SandboxStatus(True, pid, self._version(), self.instance, self.root)

    def down(self, timeout: float = 15.0) -> bool:
        """Stop the instance; True if something was running. Safe after a crash and when not running."""
        _require_root()
        pid = self.pid()
        if pid is not None:
            self._stop_pid(pid, timeout)
            log.info("sandbox.down", instance=self.instance, pid=pid)
        self.pid_file.unlink(missing_ok=True)
        # Sockets and pid files of a crashed Asterisk would make the next `cli` talk to nothing.
        if (self.instance_dir / "run").is_dir():
            for stale in (self.instance_dir / "run").glob("*"):
                stale.unlink(missing_ok=True)
        return pid is not None

    def status(self) -> SandboxStatus:
        pid = self.pid()
        return SandboxStatus(pid is not None, pid, self._version() if pid else None, self.instance, self.root)

    def cli(self, command: str | None) -> int:
        """Run one Asterisk CLI command (or an interactive console) against this instance."""
        _require_root()
        if self.pid() is None:
            raise SandboxError(f"sandbox instance {self.instance!r} is not running: run `medhotline asterisk up`")
        args = ["chroot", str(self.root), "/usr/sbin/asterisk", "-C", str(self.conf_in_chroot)]
        args += ["-rx", command] if command else ["-r"]
        return subprocess.run(args, check=False).returncode

    def cli_output(self, command: str) -> str:
        args = [
            "chroot",
            str(self.root),
            "/usr/sbin/asterisk",
            "-C",
            str(self.conf_in_chroot),
            "-rx",
            command,
        ]
        result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            raise SandboxError(f"asterisk -rx {command!r} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    # -- helpers ---------------------------------------------------------------------------------

    def _version(self) -> str | None:
        try:
            return self.cli_output("core show version").strip() or None
        except (SandboxError, subprocess.TimeoutExpired):
            return None

    def _check_ports_free_soon(self, grace: float = 3.0) -> None:
        """Ports of an Asterisk that was just killed are released a moment after its pid disappears."""
        deadline = time.monotonic() + grace
        while True:
            try:
                self._check_ports_free()
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            else:
                return

    def _check_ports_free(self) -> None:
        ast = self.config.asterisk
        checks = [
            (socket.SOCK_DGRAM, ast.sip_port, "asterisk.sip_port (SIP/UDP)"),
            (socket.SOCK_STREAM, ast.ari_port, "asterisk.ari_port (ARI/HTTP)"),
            (socket.SOCK_STREAM, ast.ami_port, "asterisk.ami_port (AMI)"),
        ]
        if self.config.sip.tls:
            checks.append((socket.SOCK_STREAM, self.config.sip.tls_port, "sip.tls_port (SIP/TLS)"))
        checks += [
            (socket.SOCK_DGRAM, p, "asterisk.rtp_start..rtp_end (RTP)") for p in range(ast.rtp_start, ast.rtp_end + 1)
        ]
        for kind, port, what in checks:
            with socket.socket(socket.AF_INET, kind) as sock:
                if kind == socket.SOCK_STREAM:
                    # As Asterisk does: connections of a previous run in TIME_WAIT don't block a new listener.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((ast.host, port))
                except OSError as exc:
                    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
                    raise SandboxError(
                        f"port {ast.host}:{port}/{proto} for {what} is not available ({exc.strerror}): "
                        "stop what uses it or choose another port in medhotline.toml"
                    ) from None

    def _wait_fully_booted(self) -> int:
        """Log in to AMI and wait for FullyBooted: the only signal that dialplan, PJSIP and ARI are all up."""
        creds = self.credentials()
        started = time.monotonic()
        deadline = started + self.config.asterisk.sandbox.boot_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            pid = self.pid()
            # The launcher chain (setsid → unshare → sh → chroot) execs into Asterisk within milliseconds.
            if pid is None and time.monotonic() - started > 3:
                raise SandboxError(f"Asterisk exited during start-up; its output:\n{self._output_tail()}")
            try:
                if pid is not None and _ami_fully_booted(
                    self.config.asterisk.host,
                    self.config.asterisk.ami_port,
                    creds,
                    5.0,
                    asterisk_client_ssl(self.config),
                ):
                    return pid
                last_error = "logged in but not yet fully booted"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise SandboxError(
            f"Asterisk did not report FullyBooted within {self.config.asterisk.sandbox.boot_timeout:.0f}s "
            f"({last_error}); its output:\n{self._output_tail()}"
        )

    def _output_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.output_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output captured)"

    def _stop_pid(self, pid: int, timeout: float = 15.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the Asterisk sandbox needs root (it uses debootstrap, chroot and mounts): run as root")


def _write_private(path: Path, text: str) -> None:
    write_whole(path, text.encode("utf-8"), 0o600)


def asterisk_client_ssl(config: Config) -> ssl.SSLContext | None:
    """How the service reaches ARI and AMI over TLS ([asterisk] tls): the CA it trusts, the host name checked.

    The CA is ``asterisk.tls_ca_file``, or in sandbox mode the instance's own CA."""
    if not config.asterisk.tls:
        return None
    ca = config.asterisk.tls_ca_file
    if ca is None:
        ca = Sandbox(config).pki().ca_cert
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise SandboxError(f"asterisk.tls_ca_file: can't read {ca} as a CA certificate: {exc}") from None


def _ami_fully_booted(
    host: str, port: int, creds: AsteriskCredentials, timeout: float, tls: ssl.SSLContext | None = None
) -> bool:
    """A minimal synchronous AMI login that reports whether FullyBooted arrived."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
    except BaseException:
        raw.close()
        raise
    with sock, raw:
        fh = sock.makefile("rwb")
        fh.readline()  # banner: "Asterisk Call Manager/x.y.z"
        fh.write(
            f"Action: Login\r\nUsername: {creds.ami_username}\r\nSecret: {creds.ami_secret}\r\n"
            "Events: system\r\n\r\n".encode()
        )
        fh.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = fh.readline()
            if not line:
                return False
            text = line.decode(errors="replace").strip()
            if text == "Response: Error":
                raise OSError("AMI login refused")
            if text == "Event: FullyBooted":
                return True
        return False
