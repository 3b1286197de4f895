"""One validated configuration object for the whole service.

The configuration comes from one TOML file (``medhotline.toml``) plus environment overrides of the form
``MEDHOTLINE__SECTION__KEY=value`` (double underscores separate the path, so
``MEDHOTLINE__ASTERISK__SIP_PORT`` sets ``asterisk.sip_port``). Everything is validated once at start into
frozen pydantic models; a wrong value stops the service with the file (or environment variable), the dotted
key and the reason, never later in the middle of a call.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ground.daytime import PolicyError, Window
from ground.errors import MedhotlineError
from ground.workdays import WorkdayError, parse_dates

ENV_PREFIX = "MEDHOTLINE__"
CONFIG_ENV = "MEDHOTLINE_CONFIG"
DEFAULT_CONFIG_FILE = Path("medhotline.toml")


class ConfigError(MedhotlineError):
    """A configuration value is wrong; the message names where (file or variable), the key and why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _port(default: int) -> Any:
    return Field(default=default, ge=1, le=65535)


def _empty_is_none(value: Any) -> Any:
    # TOML and environment variables cannot spell "unset"; "" means it, instead of becoming Path(".").
    return None if isinstance(value, str) and not value.strip() else value


class ServiceConfig(_Section):
    node_name: str = Field(default="node1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    state_dir: Path = Path("/var/lib/medhotline")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Empty means standard error only; a path adds a JSON-lines file (the same redacted lines).
    log_file: Path | None = None

    _log_file_empty = field_validator("log_file", mode="before")(_empty_is_none)


class DatabaseConfig(_Section):
    # Empty means the embedded default: a SQLite file inside service.state_dir.
    url: str = ""

    @model_validator(mode="after")
    def _known_backend(self) -> DatabaseConfig:
        if self.url and not self.url.startswith(("sqlite", "postgresql")):
            raise ValueError("url: only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if self.url.startswith("postgresql"):
            remote = [host for host in _postgres_hosts(self.url) if not _is_local_db_host(host)]
            query = parse_qs(self.url.partition("?")[2])
            if remote and query.get("sslmode") != ["verify-full"]:
                # Only the host is named: the URL may hold a password.
                raise ValueError(
                    f"url: the database host {remote[0]} is not on this machine: add sslmode=verify-full (and "
                    "sslrootcert=<the CA file>) so the link is encrypted and the server's certificate and name are "
                    'checked (docs/cluster.md, "Encrypted links between hosts")'
                )
            for key in _LIBPQ_FILE_PARAMETERS:
                for value in query.get(key, []):
                    if not (key == "sslrootcert" and value == "system") and not Path(value).is_absolute():
                        # libpq opens it relative to whatever directory the process was started in: it would work
                        # from a shell in /etc/medhotline and fail under systemd, at the first connection.
                        raise ValueError(
                            f"url: {key}={value} is a relative path: libpq would look for it relative to the "
                            "service's working directory; give the absolute path"
                        )
        return self


# libpq's connection parameters that name a file (TLS material).
_LIBPQ_FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "sslcrldir")


def _postgres_hosts(url: str) -> list[str]:
    """Every host a libpq URL names: the multi-host list after ``@`` and any ``host=``/``hostaddr=`` parameters."""
    rest = url.partition("://")[2]
    netloc = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    hosts = []
    for item in netloc.split(","):
        host = item[1 : item.index("]")] if item.startswith("[") and "]" in item else item.rsplit(":", 1)[0]
        hosts.append(unquote(host))
    query = parse_qs(rest.partition("?")[2])
    for key in ("host", "hostaddr"):
        for value in query.get(key, []):
            hosts += [h.rsplit(":", 1)[0] if not h.startswith("/") else h for h in value.split(",")]
    return hosts


def _is_local_db_host(host: str) -> bool:
    """A Unix socket directory, no host (libpq's default socket) or a loopback address."""
    return not host or host.startswith("/") or _is_loopback(host)


class SandboxConfig(_Section):
    # The chroot is big (~500 MB) and slow to build, so it lives outside the checkout and is shared by every
    # instance; each instance (demo, test session, second node) keeps its own config and state below it.
    root: Path = Path("/var/cache/medhotline/asterisk-sid")
    instance: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    suite: str = Field(default="sid", pattern=r"^[a-z0-9-]+$")
    # Empty means: read the Debian mirror from the host's own apt sources.
    mirror: str = ""
    boot_timeout: float = Field(default=60.0, gt=0, le=600)


# RTP ports one call may hold at once: three streams (patient leg, agent leg, external media), RTP + RTCP each.
RTP_PORTS_PER_CALL = 6


def _is_loopback(host: str) -> bool:
    """Only an address literal counts: a name could resolve to anything, so it needs TLS."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AsteriskConfig(_Section):
    mode: Literal["sandbox", "external"] = "sandbox"
    host: str = "127.0.0.1"
    sip_port: int = _port(5060)
    # Each call holds up to three RTP streams (patient leg, agent leg, external media for speech), each an even
    # RTP port and the odd RTCP port above it: RTP_PORTS_PER_CALL ports. 10000-20000 is Asterisk's own default
    # and holds about 1600 calls.
    rtp_start: int = _port(10000)
    rtp_end: int = _port(20000)
    # The concurrent calls this node is sized for: the RTP range must hold them, the ARI connection pool and
    # Asterisk's HTTP session limit are sized from it.
    max_calls: int = Field(default=500, ge=1, le=20000)
    ari_port: int = _port(8088)
    # Where the service reaches ARI when something sits in front of Asterisk's HTTP port (a TLS terminator, a
    # proxy); empty: ari_port.
    ari_connect_port: int | None = Field(default=None, ge=1, le=65535)
    # Seconds a REST request may take, waiting for a free connection included, before it counts as unanswered.
    ari_timeout: float = Field(default=5.0, gt=0, le=60)
    # How REST requests reach ARI: "websocket" sends them over the event WebSocket where this Asterisk supports
    # it (22.3+, probed at each connection; HTTP until then, while reconnecting and on older versions), "http"
    # always uses the HTTP connection pool. See docs/performance.md ("REST over the event WebSocket").
    rest_transport: Literal["websocket", "http"] = "websocket"
    ami_port: int = _port(5038)
    ari_app: str = Field(default="medhotline", pattern=r"^[A-Za-z0-9_-]+$")
    ari_username: str = Field(default="medhotline", pattern=r"^[A-Za-z0-9_-]+$")
    # In sandbox mode the secrets are generated per instance when unset; external mode requires them.
    ari_password: SecretStr | None = None
    ami_username: str = Field(default="medhotline", pattern=r"^[A-Za-z0-9_-]+$")
    ami_secret: SecretStr | None = None
    # ARI (HTTPS + WSS) and AMI over TLS, on ari_port and ami_port, with no plain listener. Required when host is
    # not a loopback address: ARI and AMI carry passwords, caller numbers and call control.
    tls: bool = False
    # The CA the service trusts for Asterisk's certificate (its name must match host). Empty in sandbox mode:
    # the instance's own CA. External mode with tls needs it.
    tls_ca_file: Path | None = None
    # The address of the patients' side (SIP trunk or SIPp) that the sandbox accepts calls from.
    patient_trunk_match: str = "127.0.0.1"
    sandbox: SandboxConfig = SandboxConfig()

    _connect_port_empty = field_validator("ari_connect_port", "tls_ca_file", mode="before")(_empty_is_none)

    @property
    def ari_connections(self) -> int:
        """The service's ARI connection pool: one request in flight per call, plus the node's own (queue,
        recordings, dialer, agent endpoints)."""
        return self.max_calls + 20

    @property
    def http_session_limit(self) -> int:
        """Asterisk's HTTP ``sessionlimit``: the pool, the event WebSocket, and room for an operator's tools."""
        return self.ari_connections + 20

    @model_validator(mode="after")
    def _consistent(self) -> AsteriskConfig:
        if self.rtp_start >= self.rtp_end:
            raise ValueError(f"rtp_start ({self.rtp_start}) must be below rtp_end ({self.rtp_end})")
        ports = self.rtp_end - self.rtp_start + 1
        if ports < RTP_PORTS_PER_CALL * self.max_calls:
            raise ValueError(
                f"the RTP range {self.rtp_start}-{self.rtp_end} ({ports} ports) is too small for max_calls = "
                f"{self.max_calls}: each call needs up to {RTP_PORTS_PER_CALL} ports (patient leg, agent leg and "
                f"speech tap, RTP and RTCP each), so at least {RTP_PORTS_PER_CALL * self.max_calls}; widen the "
                "range or lower max_calls"
            )
        if self.ari_port == self.ami_port:
            raise ValueError(f"ari_port and ami_port are both {self.ari_port}")
        if self.rtp_start <= self.sip_port <= self.rtp_end:
            raise ValueError(f"sip_port {self.sip_port} lies inside the RTP range")
        if self.mode == "external" and (self.ari_password is None or self.ami_secret is None):
            raise ValueError("external mode needs ari_password and ami_secret")
        if not self.tls and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: ARI and AMI would carry their passwords and "
                "callers' numbers in clear across the network; set asterisk.tls = true (docs/cluster.md, "
                '"Encrypted links between hosts") or use 127.0.0.1'
            )
        if self.tls and self.mode == "external" and self.tls_ca_file is None:
            raise ValueError("tls: set tls_ca_file (the CA that signed the hospital Asterisk's certificate)")
        return self


class SipConfig(_Section):
    """SIP over TLS with SRTP for agents' phones and trunks (docs/cluster.md, "Encrypted links between hosts")."""

    # Off by default: a single machine's loopback needs no TLS. On: Asterisk also listens for SIP over TLS on
    # tls_port, agents' phones are reached over TLS only, and a TLS trunk endpoint (`patients-tls`) takes calls.
    tls: bool = False
    tls_port: int = _port(5061)
    # How the media of the TLS endpoints is encrypted: "sdes" (keys in the SDP, which TLS protects) or "dtls"
    # (DTLS-SRTP, keys negotiated on the media path). Plain RTP is not an option on an encrypted link.
    media_encryption: Literal["sdes", "dtls"] = "sdes"


class FastAgiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = _port(4573)


def parse_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) where host is an IP address or a DNS name (``address`` may name the
    key service's host: its certificate is verified against that name)."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port (e.g. 10.0.0.20:7443)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _DNS_NAME.fullmatch(host):
            raise ValueError(f"{value!r}: {host!r} is neither an IP address nor a host name") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} is outside 1-65535")
    return host, port


_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _unreadable(path: Path) -> str | None:
    """Why ``path`` can't be read by this process, or None. Checked at load: a node must not start, and then
    fail at its first recording, because a certificate file is missing or not its own to read."""
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or type(exc).__name__})"


class KeyServiceConfig(_Section):
    """Where the key service listens and how clients reach it (docs/security.md, docs/cluster.md).

    On one machine: the Unix socket (``socket``, default ``<state_dir>/keyservice.sock``) and nothing else. On
    the key service's own host, ``listen`` adds a mutual-TLS TCP listener (the socket stays, for that host's own
    ``medhotline keys`` commands). On a node of another host, ``address`` makes every client (recordings, TOTP
    vault, patient fields, CLI) connect over mutual TLS instead of the socket. There is no plain TCP: an address
    off this machine is always TLS, with the server verified and a client certificate presented.
    """

    socket: Path | None = None
    # The key service's side: an IP address to listen on for mutual TLS, host:port (empty: the socket only).
    listen: str = ""
    # A node's side: the key service's host:port (empty: the local socket). Host may be a name or an address;
    # the key service's certificate must carry it (or server_name) in its subjectAltName.
    address: str = ""
    # The name to verify in the key service's certificate when it differs from address's host.
    server_name: str = ""
    # With listen: the nodes that may use the key service, by the name their client certificate carries (a DNS
    # subjectAltName or the common name). The CA alone is not enough: a hospital CA signs far more than nodes.
    clients: list[str] = []
    # With listen: ca_file is the CA whose client certificates are accepted, cert_file/key_file the key
    # service's server certificate. With address: ca_file is the CA that signed the key service's certificate,
    # cert_file/key_file the node's client certificate.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Never used by any release; kept only to say what replaced it.
    tcp_port: int | None = None
    # The key-encryption keys: deliberately outside service.state_dir (which holds the database), so a copy of
    # the business data directory never carries the keys that unlock it.
    directory: Path = Path("/var/lib/medhotline-keys")

    _paths_empty = field_validator("socket", "ca_file", "cert_file", "key_file", "tcp_port", mode="before")(
        _empty_is_none
    )

    def tls_files(self) -> tuple[Path, Path, Path] | None:
        """(ca_file, cert_file, key_file), set exactly when listen or address is (validation sees to it)."""
        if self.ca_file is None or self.cert_file is None or self.key_file is None:
            return None
        return self.ca_file, self.cert_file, self.key_file

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value:
            parse_sip_address(value)  # a bind address: an IP literal, never a name to resolve
        return value

    @field_validator("address")
    @classmethod
    def _client_address(cls, value: str) -> str:
        if value:
            parse_host_port(value)
        return value

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        if value and not _DNS_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a host name")
        return value

    @field_validator("clients")
    @classmethod
    def _client_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not _DNS_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"{', '.join(repr(name) for name in bad)}: not a certificate's host name")
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> KeyServiceConfig:
        if self.tcp_port is not None:
            raise ValueError(
                'tcp_port is no longer read: set listen = "<ip>:<port>" on the key service\'s host and '
                'address = "<host>:<port>" on the nodes (with ca_file, cert_file, key_file)'
            )
        if self.listen and self.address:
            raise ValueError(
                "listen and address are both set: listen is for the key service's own host (whose clients use "
                "the Unix socket), address for nodes on other hosts; set one"
            )
        role = "listen" if self.listen else "address" if self.address else ""
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        if self.clients and role != "listen":
            raise ValueError("clients is set but listen is empty: it lists who may use this key service's TLS listener")
        if role == "listen" and not self.clients:
            raise ValueError(
                "listen is set: clients must name the nodes that may use the key service, by the name in their "
                'client certificate (e.g. clients = ["node1.hospital.example"]); any certificate the CA signed is '
                "not enough"
            )
        if not role:
            given = [name for name, path in files.items() if path is not None]
            if given:
                raise ValueError(f"{'/'.join(given)} set but neither listen nor address: TLS files unused")
            if self.server_name:
                raise ValueError("server_name is set but address is empty")
            return self
        if self.server_name and role != "address":
            raise ValueError("server_name is for address (a node verifying the key service), not for listen")
        missing = [name for name, path in files.items() if path is None]
        if missing:
            what = "server certificate" if role == "listen" else "client certificate"
            raise ValueError(
                f"{role} is set: mutual TLS needs {', '.join(missing)} (ca_file: the CA of the other side; "
                f"cert_file/key_file: this side's {what} and its key)"
            )
        problems = [f"{name}: {why}" for name, path in files.items() if path and (why := _unreadable(path))]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class HotlineConfig(_Section):
    number: str = Field(default="12320", pattern=r"^[0-9]{3,15}$")
    # Which path the dialplan sends the hotline number to; both are always reachable through
    # ``ari-<number>`` and ``agi-<number>`` so operators can migrate legacy dialplans one at a time.
    entry: Literal["ari", "fastagi"] = "ari"
    flows_dir: Path = Path("dialplans")
    flow: str = Field(default="hotline", pattern=r"^[a-z0-9_-]+$")
    # How often the flows directory is checked for edits (seconds).
    reload_interval: float = Field(default=1.0, gt=0, le=300)


class PromptsConfig(_Section):
    voice: str = Field(default="cmn", pattern=r"^[A-Za-z0-9_+-]+$")
    speed: int = Field(default=150, ge=80, le=450)
    # External mode: the Asterisk sounds directory to render into (the sandbox knows its own).
    sounds_dir: Path | None = None


def speech_server_url_problem(url: str) -> str | None:
    """What is wrong with a speech server's URL (None: usable). ``ws://host:port`` or ``wss://…``, no credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("ws", "wss"):
        return f"{url!r} is not a ws:// or wss:// URL (vosk-server listens on ws://host:2700)"
    if not parts.hostname:
        return f"{url!r} names no host"
    if parts.username is not None or parts.password is not None:
        return f"{url!r} carries credentials; vosk-server takes none and URLs end up in logs"
    if parts.query or parts.fragment:
        return f"{url!r} has a query or fragment; the protocol uses neither"
    if port == 0:
        return f"{url!r} has port 0"
    return None


class SpeechServerConfig(_Section):
    """A speech server speaking Vosk's WebSocket protocol, and how many streams it decodes in real time."""

    url: str
    capacity: int = Field(ge=1, le=10000)

    @field_validator("url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        problem = speech_server_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url


class SpeechConfig(_Section):
    # none: `listen` nodes use their key-menu fallback. vosk: real recognition with the model at model_path.
    # servers: recognition on the speech servers of `servers` (vosk-server or `medhotline speech serve`).
    # scripted: a stand-in that hears the caller's audio and returns the sentences of `script` in turn
    # (demos and tests on machines without a Chinese model).
    engine: Literal["none", "vosk", "scripted", "servers"] = "none"
    model_path: Path | None = None
    script: list[str] = Field(default_factory=list)
    # Empty: the lexicon shipped in keywords/lexicon/. Edits are picked up while the service runs.
    lexicon_dir: Path | None = None
    # How many callers this node listens to at once; the others get the key menu at once (docs/performance.md).
    # Unset: one per CPU core (the live knee benchmarks.asr --sandbox measured: 2 streams on 2 cores), at least 1.
    max_streams: int | None = None

    @field_validator("max_streams", mode="before")
    @classmethod
    def _max_streams(cls, value: Any) -> Any:
        value = _empty_is_none(value)
        if value is None:
            return None
        # bool is an int to Python; `max_streams = true` is a mistake, not one stream.
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 1000:
            raise ValueError(
                "must be a whole number of concurrent recognitions from 1 to 1000 "
                '(leave it out for one per CPU core; engine = "none" turns speech off)'
            )
        return number

    # engine "servers": where streams go, least loaded first (docs/speech.md).
    servers: list[SpeechServerConfig] = Field(default_factory=list)

    @field_validator("servers", mode="before")
    @classmethod
    def _servers_from_environment(cls, value: Any) -> Any:
        # An environment variable is one string: MEDHOTLINE__SPEECH__SERVERS='[{"url": "ws://…", "capacity": 2}]'
        # (how the demo points its child service at the speech server it started). TOML gives a list already.
        if not isinstance(value, str):
            return value
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'is not a JSON list of servers ({exc.msg} at character {exc.pos}); e.g. [{{"url": '
                '"ws://127.0.0.1:2700", "capacity": 2}]'
            ) from None

    # Seconds to open a stream on a server (then the next server is tried); seconds a server may leave audio
    # unanswered before the stream counts as failed (the caller goes to the key menu); seconds a failed server
    # gets no new streams.
    connect_timeout: float = Field(default=2.0, gt=0, le=30)
    reply_timeout: float = Field(default=3.0, gt=0, le=60)
    retry_after: float = Field(default=5.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _engine_needs(self) -> SpeechConfig:
        if self.engine == "vosk" and self.model_path is None:
            raise ValueError("engine 'vosk' needs model_path (a Vosk model directory; `medhotline models fetch`)")
        if self.engine == "servers" and not self.servers:
            raise ValueError('engine "servers" needs servers, e.g. servers = [{url = "ws://…:2700", capacity = 4}]')
        if self.servers and self.engine != "servers":
            raise ValueError(f'servers are only used with engine = "servers", not {self.engine!r}')
        urls = [server.url for server in self.servers]
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise ValueError(f"servers lists {', '.join(repeated)} more than once")
        return self


class EscalationTarget(_Section):
    """Where a rule's escalation ``group`` is reached: a number, over a PJSIP trunk (empty: an internal
    endpoint or extension of this Asterisk), rung ``ring_seconds``; if nobody answers there, ``then_number``
    (e.g. the external emergency number 120 over the PSTN trunk)."""

    number: str = Field(pattern=r"^\+?[0-9*#]{1,20}$")
    trunk: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    ring_seconds: int = Field(default=30, ge=5, le=300)
    then_number: str = Field(default="", pattern=r"^(\+?[0-9*#]{1,20})?$")
    then_trunk: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")


class RoutingConfig(_Section):
    # Empty: the built-in rules (routing/rules.py); a YAML file is validated at start like the flows.
    rules_file: Path | None = None
    # How long an agent's phone rings before the call goes to the next agent (and the agent is paused).
    ring_timeout: float = Field(default=15.0, ge=3, le=120)
    # After a conversation, before the agent gets the next call; the agent stays reserved meanwhile.
    wrap_up: float = Field(default=10.0, ge=0, le=600)
    # How long an agent who let a call ring out stays paused (agents have only a SIP phone to "log in" with).
    no_answer_pause: float = Field(default=60.0, ge=0, le=3600)
    # Position announcements for waiting callers: the first after this long, then every `announce_every`.
    first_announcement: float = Field(default=5.0, ge=0, le=600)
    announce_every: float = Field(default=30.0, ge=5, le=600)
    moh_class: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # A waiting caller who presses this key becomes an emergency and jumps ahead ("" disables it).
    emergency_key: str = Field(default="0", pattern=r"^[0-9*#]?$")
    # An agent who presses these keys on their phone during a conversation upgrades the call to emergency: the
    # record says so, with who and when ("" disables it; 2 to 4 keys, so one stray key never does it).
    upgrade_keys: str = Field(default="*0", pattern=r"^([0-9*#]{2,4})?$")
    # How often each node re-reads agent states (frozen, paused, reserved elsewhere) from the database.
    refresh_interval: float = Field(default=0.5, gt=0, le=30)
    # Targets of the rules' escalation groups, e.g. [routing.escalation_groups.on_call_physicians].
    escalation_groups: dict[str, EscalationTarget] = Field(default_factory=dict)
    # Callbacks instead of waiting: a waiting caller whose estimated wait is longer than `callback_threshold`
    # seconds hears the offer and may press `callback_key` to hang up and be called back at their place ("" turns
    # callbacks off). The estimate counts `callback_handle_seconds` per call and agent (talk and wrap-up).
    callback_key: str = Field(default="1", pattern=r"^[0-9*#]?$")
    callback_threshold: float = Field(default=120.0, ge=0, le=7200)
    callback_handle_seconds: float = Field(default=240.0, gt=0, le=7200)
    # Dialling attempts before an unanswered callback becomes an `unreachable` task for staff, and the pause
    # between two attempts.
    callback_attempts: int = Field(default=3, ge=1, le=10)
    callback_retry_after: float = Field(default=120.0, ge=0, le=86400)

    _rules_empty = field_validator("rules_file", mode="before")(_empty_is_none)

    @model_validator(mode="after")
    def _distinct_keys(self) -> RoutingConfig:
        if self.callback_key and self.callback_key == self.emergency_key:
            raise ValueError(
                f"callback_key and emergency_key are both {self.callback_key!r}: a waiting caller's key "
                "must mean one thing"
            )
        return self


def parse_sip_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) with an IP literal host: Kamailio's list and listen lines take
    addresses, and a host name would make the proxy depend on DNS at every probe."""
    host, sep, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port (an IP address and a port, e.g. 10.0.0.5:5060)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address (host names are not accepted here)") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} is outside 1-65535")
    return host, port


class FrontConfig(_Section):
    """The SIP front: Kamailio's dispatcher before the nodes' Asterisks (``medhotline cluster config``)."""

    # Where Kamailio listens for the patients' trunks (UDP).
    listen: str = "127.0.0.1:5060"
    # Each node's Asterisk SIP address, host:port; calls are spread over them.
    nodes: tuple[str, ...] = ()
    # Seconds between OPTIONS probes of every node; a probe unanswered within ping_timeout fails.
    ping_interval: int = Field(default=2, ge=1, le=60)
    ping_timeout: float = Field(default=1.5, gt=0, le=30)
    # Failed probes before a node is taken out, answered probes before it is put back.
    probing_threshold: int = Field(default=1, ge=1, le=10)
    inactive_threshold: int = Field(default=1, ge=1, le=10)
    # call_load: the node with the fewest calls in progress (dispatcher algorithm 10); round_robin: algorithm 4.
    algorithm: Literal["call_load", "round_robin"] = "call_load"
    # Seconds an INVITE may wait for a node's first answer (100 Trying) before the next node is tried.
    invite_timeout: float = Field(default=2.0, gt=0, le=30)
    # What a probe asks. service: a node is up only while its medhotline service has its ARI application
    # registered in that node's Asterisk (OPTIONS to the health user, docs/cluster.md); asterisk: any answer from
    # the node's SIP stack (nodes without a service, `cluster up --asterisk-only`).
    probe: Literal["service", "asterisk"] = "service"

    # SIP over TLS for the trunks: where Kamailio also listens for TLS (host:port; empty: no TLS listener), its
    # certificate and key (from the hospital's PKI), and the CA whose client certificates it accepts (empty:
    # trunks are not asked for one). Kamailio's tls module is Debian's kamailio-tls-modules.
    tls_listen: str = ""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # How Kamailio reaches the nodes: "udp" (the default, for one machine whose loopback carries it) or "tls" once
    # the nodes are other hosts. tls needs tls_listen (Kamailio's TLS socket: its connections leave from it, and
    # the nodes send a dialog's later requests back to it), each node's Asterisk with [sip] tls (its transport-tls;
    # list the nodes by their tls_port then), and node_ca_file: the CA that signed the nodes' certificates, against
    # which Kamailio verifies every node it connects to.
    node_transport: Literal["udp", "tls"] = "udp"
    node_ca_file: Path | None = None

    _tls_paths_empty = field_validator("tls_cert_file", "tls_key_file", "tls_ca_file", "node_ca_file", mode="before")(
        _empty_is_none
    )

    @field_validator("listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        parse_sip_address(value)
        return value

    @field_validator("tls_listen")
    @classmethod
    def _tls_listen_address(cls, value: str) -> str:
        if value:
            parse_sip_address(value)
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> FrontConfig:
        if self.tls_listen and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("tls_listen: set tls_cert_file and tls_key_file (the front's certificate and its key)")
        if not self.tls_listen and (self.tls_cert_file or self.tls_key_file or self.tls_ca_file):
            raise ValueError("tls_cert_file/tls_key_file/tls_ca_file are set but tls_listen is empty")
        if self.tls_listen and self.tls_listen == self.listen:
            raise ValueError(f"tls_listen {self.tls_listen} is also listen; choose another port")
        if self.node_ca_file is not None and self.node_transport != "tls":
            raise ValueError('node_ca_file is set but node_transport is "udp": set node_transport = "tls" or remove it')
        return self

    @field_validator("nodes")
    @classmethod
    def _node_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, node in enumerate(value):
            try:
                parse_sip_address(node)
            except ValueError as exc:
                raise ValueError(f"nodes[{index}]: {exc}") from None
        if len(set(value)) != len(value):
            raise ValueError("the same node address is listed twice")
        return value


class ClusterConfig(_Section):
    # Several nodes on one PostgreSQL share one queue of waiting calls and hold their reservations and calls under
    # a lease (docs/cluster.md). Off: the node routes its own callers only, as a single node does.
    enabled: bool = False
    # A node that stops renewing for this long is taken over by another (its agents freed, its calls closed as
    # lost); it renews every third of it. Keep the nodes' clocks NTP-synchronised, far closer than this.
    lease_seconds: float = Field(default=6.0, ge=1, le=10)
    front: FrontConfig = FrontConfig()


# The legal floor: call records are part of the medical record (医疗机构病历管理规定), kept at least 15 years.
RETENTION_FLOOR_YEARS = 15


class RetentionYears(_Section):
    """Years a recording (and its call's records) is kept after the call, per record type. Configurable up,
    never below the legal floor."""

    outpatient: int = Field(default=15, ge=RETENTION_FLOOR_YEARS, le=100)
    emergency: int = Field(default=15, ge=RETENTION_FLOOR_YEARS, le=100)
    inpatient: int = Field(default=30, ge=RETENTION_FLOOR_YEARS, le=100)


class RecordingsConfig(_Section):
    # Every answered call is recorded from the moment an agent joins; false is for test benches only.
    enabled: bool = True
    # Also record the IVR part (from the answer until the queue); consent steps are recorded regardless.
    record_ivr: bool = False
    # Encrypted recordings. Empty: <state_dir>/recordings.
    store_dir: Path | None = None
    # Where Asterisk writes recordings (astspooldir/recording), as this host sees it. Empty: the sandbox's own
    # in sandbox mode, Asterisk's default /var/spool/asterisk/recording in external mode (a PBX on this host);
    # a PBX elsewhere needs its spool mounted here.
    spool_dir: Path | None = None
    # The department that owns recordings of callers the IVR did not identify (the access policy's scope).
    department: str = Field(default="hotline", pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    retention_years: RetentionYears = RetentionYears()
    # RFC 3161 timestamps: empty uses the local timestamp authority inside the key service; a URL names an
    # external (qualified) TSA, whose issuing CA certificates (PEM files) are listed in tsa_certificates.
    tsa_url: str = ""
    tsa_certificates: list[Path] = Field(default_factory=list)

    _store_empty = field_validator("store_dir", mode="before")(_empty_is_none)
    _spool_empty = field_validator("spool_dir", mode="before")(_empty_is_none)

    @model_validator(mode="after")
    def _tsa(self) -> RecordingsConfig:
        if self.tsa_url and not self.tsa_url.startswith(("https://", "http://")):
            raise ValueError("tsa_url must be an http(s) URL of an RFC 3161 timestamp authority")
        if self.tsa_url and not self.tsa_certificates:
            raise ValueError("tsa_url needs tsa_certificates: the CA certificates that issue the TSA's certificate")
        return self


class OutreachConfig(_Section):
    """Outbound calls (follow-ups, medication reminders) and notifications."""

    # Only the scheduler's leader dials; false keeps this node from ever leading (e.g. an inbound-only node).
    enabled: bool = True
    # The PJSIP endpoint of the trunk that reaches patients' phones, and how a number is dialled over it.
    trunk: str = Field(default="patients", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    dial_string: str = "PJSIP/{number}@{trunk}"
    caller_id: str = Field(default="12320", pattern=r"^[0-9]{3,15}$")
    ring_seconds: int = Field(default=30, ge=5, le=120)
    quiet_hours: str = "21:00-08:00"
    max_attempts: int = Field(default=3, ge=1, le=10)
    backoff_minutes: list[int] = Field(default_factory=lambda: [30, 120], min_length=1)
    trunk_cap: int = Field(default=4, ge=1, le=500)
    # A JSON-over-HTTPS SMS gateway for reminders that don't need a call; empty: messages wait in the outbox.
    sms_gateway_url: str = ""
    sms_token_file: Path | None = None

    _token_empty = field_validator("sms_token_file", mode="before")(_empty_is_none)

    @model_validator(mode="after")
    def _consistent(self) -> OutreachConfig:
        if "{number}" not in self.dial_string:
            raise ValueError("dial_string must contain {number}")
        try:
            Window.parse(self.quiet_hours, "quiet_hours")
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        if any(m < 1 for m in self.backoff_minutes):
            raise ValueError("backoff_minutes must all be at least 1")
        if self.sms_gateway_url:
            if not _safe_gateway_url(self.sms_gateway_url):
                raise ValueError("sms_gateway_url must be https:// (plain http only to this host)")
            if self.sms_token_file is None:
                raise ValueError("sms_gateway_url needs sms_token_file: the gateway's bearer token, mode 0600")
        return self


def _safe_gateway_url(url: str) -> bool:
    """https:// to any host, or plain http:// only to this host (the bearer token must not cross a network in
    clear). The host is parsed, not prefix-matched: ``http://localhost.gateway.invalid`` is another machine."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if host == "localhost":  # urlsplit lower-cases the host
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False


class StatisticsConfig(_Section):
    """How ``medhotline stats`` (docs/statistics.md) judges waits. Changing a value changes the figures of past
    days too: the figures are computed from the stored records each time, never stored themselves."""

    # A call answered after waiting at most this long counts as answered within the service level.
    service_level_seconds: float = Field(default=20.0, gt=0, le=3600)
    # The same for calls that waited as emergencies (their own, shorter target).
    emergency_target_seconds: float = Field(default=10.0, gt=0, le=3600)
    # A caller who hangs up after waiting less than this is a short abandon (a wrong number, a change of mind):
    # counted as abandoned, but left out of the service level's and the abandon rate's denominator. 0: none is.
    short_abandon_seconds: float = Field(default=5.0, ge=0, le=600)
    # A call note written more than this long after the conversation ended is a late note, not wrap-up work.
    wrap_up_max_seconds: float = Field(default=1800.0, gt=0, le=86400)


class QualityConfig(_Section):
    """Quality control (docs/quality.md): where the rules and the review form are, and the key of the sample."""

    # The rules and the reviewers' form (YAML); default: ``<hotline.flows_dir>/quality/rules.yaml``.
    rules_file: Path | None = None
    # The secret that picks the sample (HMAC of the call id), so nobody can tell in advance which calls are
    # reviewed. Default: ``<state_dir>/quality/sample.key``, created (0600) on first use.
    sample_key_file: Path | None = None


class ComplaintsConfig(_Section):
    """12320 complaint tasks (docs/complaints.md): deadlines in working days and the calendar they count in."""

    refer_days: int = Field(default=1, ge=1, le=30)
    resolve_days: int = Field(default=5, ge=1, le=60)
    answer_days: int = Field(default=1, ge=1, le=30)
    # Public holidays ("YYYY-MM-DD", local), and the weekend days worked in their place (调休): the State Council
    # publishes both each year, so they are configured, not computed.
    holidays: list[str] = []
    extra_workdays: list[str] = []

    @model_validator(mode="after")
    def _dates(self) -> ComplaintsConfig:
        try:
            holidays = parse_dates(self.holidays, "holidays")
            extra = parse_dates(self.extra_workdays, "extra_workdays")
        except WorkdayError as exc:
            raise ValueError(str(exc)) from None
        both = sorted(holidays & extra)
        if both:
            raise ValueError(f"{both[0].isoformat()} is in both holidays and extra_workdays")
        return self


class AuditConfig(_Section):
    # Every signed audit head is appended here (JSON lines, fsynced) so `audit verify` can tell a rolled-back
    # trail from a short one. Best on another disk or a mount the database's administrators can't write.
    # Default: <state_dir>/audit/heads.witness.jsonl.
    witness_file: Path | None = None


_HL7_NAME = r"^[A-Za-z0-9_. -]{1,20}$"


class HisConfig(_Section):
    """The hospital's HIS over HL7 v2 / MLLP (``his/``, docs/his.md). Off until ``enabled``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = _port(2575)
    # TLS: the CA that signed the HIS's certificate; with cert_file and key_file the hotline presents its own
    # (mutual TLS, where the HIS asks for it). server_name: the name in the HIS's certificate, default host.
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""
    sending_application: str = Field(default="MEDHOTLINE", pattern=_HL7_NAME)
    sending_facility: str = Field(default="HOTLINE", pattern=_HL7_NAME)
    receiving_application: str = Field(default="HIS", pattern=_HL7_NAME)
    receiving_facility: str = Field(default="HOSPITAL", pattern=_HL7_NAME)
    connect_timeout: float = Field(default=2.0, gt=0, le=60)
    reply_timeout: float = Field(default=10.0, gt=0, le=300)
    # How long a caller's identification may wait for the HIS (PDQ) before the local registry answers.
    pdq_budget: float = Field(default=0.8, gt=0, le=10)
    max_message_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    # Reconnect and outbox retry delays: backoff_initial seconds, doubling up to backoff_max.
    backoff_initial: float = Field(default=1.0, gt=0, le=600)
    backoff_max: float = Field(default=60.0, gt=0, le=3600)
    # An outbox message the HIS answers AE (application error) is retried this many times, then set aside.
    outbox_max_attempts: int = Field(default=10, ge=1, le=1000)
    # How bookings reach the HIS: "siu" tells it (SIU^S12/S13/S15, ACK answers); "srm" asks it (SRM^S01/S02/S04,
    # SRR answers), for a HIS that is the filler of appointments and wants requests.
    appointment_messages: Literal["siu", "srm"] = "siu"
    # The hotline's own MLLP listener, where the HIS sends ADT (demographics). listen_port unset: no listener;
    # 0: a free port (tests). TLS with listen_cert_file/listen_key_file; with listen_client_ca_file the HIS must
    # present a certificate that CA signed (mutual TLS).
    listen_host: str = "127.0.0.1"
    listen_port: int | None = Field(default=None, ge=0, le=65535)
    listen_cert_file: Path | None = None
    listen_key_file: Path | None = None
    listen_client_ca_file: Path | None = None

    _paths_empty = field_validator(
        "ca_file",
        "cert_file",
        "key_file",
        "listen_cert_file",
        "listen_key_file",
        "listen_client_ca_file",
        "listen_port",
        mode="before",
    )(_empty_is_none)

    @model_validator(mode="after")
    def _consistent(self) -> HisConfig:
        if self.tls and self.ca_file is None:
            raise ValueError("tls: set ca_file (the CA that signed the HIS's certificate)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file: set both (mutual TLS) or neither")
        if self.cert_file is not None and not self.tls:
            raise ValueError("cert_file is set but tls is false: a client certificate needs TLS")
        if self.backoff_initial > self.backoff_max:
            raise ValueError(f"backoff_initial ({self.backoff_initial}) must not exceed backoff_max")
        if (self.listen_cert_file is None) != (self.listen_key_file is None):
            raise ValueError("listen_cert_file and listen_key_file: set both (TLS listener) or neither")
        if self.listen_client_ca_file is not None and self.listen_cert_file is None:
            raise ValueError("listen_client_ca_file needs listen_cert_file/listen_key_file (mutual TLS is TLS)")
        return self


class Config(_Section):
    service: ServiceConfig = ServiceConfig()
    database: DatabaseConfig = DatabaseConfig()
    asterisk: AsteriskConfig = AsteriskConfig()
    sip: SipConfig = SipConfig()
    fastagi: FastAgiConfig = FastAgiConfig()
    keyservice: KeyServiceConfig = KeyServiceConfig()
    hotline: HotlineConfig = HotlineConfig()
    prompts: PromptsConfig = PromptsConfig()
    speech: SpeechConfig = SpeechConfig()
    routing: RoutingConfig = RoutingConfig()
    cluster: ClusterConfig = ClusterConfig()
    recordings: RecordingsConfig = RecordingsConfig()
    outreach: OutreachConfig = OutreachConfig()
    audit: AuditConfig = AuditConfig()
    statistics: StatisticsConfig = StatisticsConfig()
    quality: QualityConfig = QualityConfig()
    complaints: ComplaintsConfig = ComplaintsConfig()
    his: HisConfig = HisConfig()

    @model_validator(mode="after")
    def _tls_port_free_of_asterisk_ports(self) -> Config:
        # SIP over TLS is TCP, as ARI and AMI are: one port can't serve two of them.
        ast = self.asterisk
        if self.sip.tls and self.sip.tls_port in (ast.ari_port, ast.ami_port):
            other = "asterisk.ari_port" if self.sip.tls_port == ast.ari_port else "asterisk.ami_port"
            raise ValueError(f"sip.tls_port {self.sip.tls_port} is also {other}; choose another port")
        return self

    @model_validator(mode="after")
    def _sounds_where_asterisk_plays_them(self) -> Config:
        # One rule for where prompts are rendered (medhotline.prompts.sounds_dir): the sandbox's own directory,
        # or, for an Asterisk managed elsewhere, the directory that Asterisk plays from. Never a guess.
        if self.asterisk.mode == "external" and self.prompts.sounds_dir is None:
            raise ValueError(
                "asterisk.mode is external: set prompts.sounds_dir to that Asterisk's sounds directory "
                "(where prompts are rendered)"
            )
        if self.asterisk.mode == "sandbox" and self.prompts.sounds_dir is not None:
            raise ValueError(
                "prompts.sounds_dir is for asterisk.mode external; the sandbox renders prompts into its own "
                "sounds directory, which is the only one its Asterisk plays"
            )
        return self

    @property
    def recordings_store(self) -> Path:
        return self.recordings.store_dir or self.service.state_dir / "recordings"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.service.state_dir / 'medhotline.db'}"

    @property
    def audit_key_dir(self) -> Path:
        """The audit head signer's own directory: its key, and the largest head it signed."""
        return self.service.state_dir / "audit"

    @property
    def audit_witness_file(self) -> Path:
        return self.audit.witness_file or self.audit_key_dir / "heads.witness.jsonl"

    @property
    def keyservice_socket(self) -> Path:
        return self.keyservice.socket or self.service.state_dir / "keyservice.sock"


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Turn MEDHOTLINE__A__B=v into {"a": {"b": "v"}}; remember which variable set which key."""
    tree: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            raise ConfigError([f"environment {name}: empty key segment"])
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"environment {name}: {'.'.join(path)} is not a section"])
            node = child
        node[path[-1]] = value
        origin[path] = name
    return tree, origin


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def _describe(err: Mapping[str, Any]) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key (typo?)"
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict | SecretStr):
        return f"{message} (got {err['input']!r})"
    return message


def _section_sources(loc: tuple[str, ...], origin: Mapping[tuple[str, ...], str], path: Path | None) -> str:
    """Where a cross-field (section-level) error comes from: the file and every variable set inside it."""
    sources = [str(path)] if path is not None else []
    sources += [f"environment {name}" for key, name in sorted(origin.items()) if key[: len(loc)] == loc]
    return " + ".join(sources) or "built-in defaults"


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration; raise ConfigError naming every problem at once.

    ``path`` None means ``$MEDHOTLINE_CONFIG``, or ``./medhotline.toml`` when it exists, else built-in
    defaults.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or CONFIG_ENV in environ
    if path is None:
        path = Path(environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
    data: dict[str, Any] = {}
    file_read = path.exists()
    if file_read:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: cannot be read: {exc}"]) from None
    elif explicit:
        raise ConfigError([f"{path}: configuration file does not exist"])
    overrides, origin = _env_overrides(environ)
    try:
        return Config.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            key = ".".join(loc) or "(top level)"
            where = next(
                (f"environment {origin[loc[:i]]}" for i in range(len(loc), 0, -1) if loc[:i] in origin),
                None,
            ) or _section_sources(loc, origin, path if file_read else None)
            problems.append(f"{where}: {key}: {_describe(err)}")
        raise ConfigError(problems) from None
