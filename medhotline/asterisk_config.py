"""Render ``asterisk-config/`` with the configured ports, addresses and secrets.

Templates use ``{{name}}`` placeholders, not ``${name}``, because ``${...}`` is Asterisk's own dialplan syntax.
Rendering is a pure function so a missing or unknown placeholder is caught by unit tests, not by a silent
Asterisk that listens on the wrong port.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ground.config import Config
from ground.errors import MedhotlineError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "asterisk-config"
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class TemplateError(MedhotlineError):
    """A template names a value the renderer does not have."""


@dataclass(frozen=True)
class AsteriskCredentials:
    ari_username: str
    ari_password: str
    ami_username: str
    ami_secret: str

    @classmethod
    def generate(cls, config: Config) -> AsteriskCredentials:
        return cls(
            ari_username=config.asterisk.ari_username,
            ari_password=secrets.token_urlsafe(24),
            ami_username=config.asterisk.ami_username,
            ami_secret=secrets.token_urlsafe(24),
        )


def _listeners(config: Config, tls: TlsPaths | None) -> tuple[str, str]:
    """http.conf's and manager.conf's listener lines: plain, or TLS with no plain listener beside it."""
    ast = config.asterisk
    if not ast.tls:
        return (
            f"bindaddr = {ast.host}\nbindport = {ast.ari_port}",
            f"enabled = yes\nport = {ast.ami_port}\nbindaddr = {ast.host}",
        )
    if tls is None:
        raise TemplateError("[asterisk] tls is on but no certificate is given for ARI and AMI")
    # http.conf: without bindaddr Asterisk opens no plain HTTP listener, only the TLS one.
    ari = "\n".join(
        [
            "tlsenable = yes",
            f"tlsbindaddr = {ast.host}:{ast.ari_port}",
            f"tlscertfile = {tls.cert_file}",
            f"tlsprivatekey = {tls.key_file}",
        ]
    )
    # manager.conf: `enabled` is the plain listener only (on by default on *:5038); the TLS one runs without it.
    ami = "\n".join(
        [
            "enabled = no",
            "tlsenable = yes",
            f"tlsbindaddr = {ast.host}:{ast.ami_port}",
            f"tlscertfile = {tls.cert_file}",
            f"tlsprivatekey = {tls.key_file}",
        ]
    )
    return ari, ami


def template_values(
    config: Config,
    credentials: AsteriskCredentials,
    *,
    instance_dir: str,
    module_dir: str,
    tls: TlsPaths | None = None,
) -> dict[str, str]:
    ast = config.asterisk
    ari_listener, ami_listener = _listeners(config, tls)
    return {
        "ari_listener": ari_listener,
        "ami_listener": ami_listener,
        "instance_dir": instance_dir,
        "module_dir": module_dir,
        "host": ast.host,
        "sip_port": str(ast.sip_port),
        "rtp_start": str(ast.rtp_start),
        "rtp_end": str(ast.rtp_end),
        "ari_port": str(ast.ari_port),
        "http_session_limit": str(ast.http_session_limit),
        "ami_port": str(ast.ami_port),
        "ari_app": ast.ari_app,
        "ari_username": credentials.ari_username,
        "ari_password": credentials.ari_password,
        "ami_username": credentials.ami_username,
        "ami_secret": credentials.ami_secret,
        "patient_trunk_match": ast.patient_trunk_match,
        "number": config.hotline.number,
        "entry": config.hotline.entry,
        "flow": config.hotline.flow,
        "fastagi_host": config.fastagi.host,
        "fastagi_port": str(config.fastagi.port),
    }


def render_text(name: str, text: str, values: dict[str, str]) -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - values.keys())
    if missing:
        raise TemplateError(f"asterisk-config/{name}: unknown placeholder(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_all(values: dict[str, str], template_dir: Path = TEMPLATE_DIR) -> dict[str, str]:
    """Return {file name: rendered text} for every ``*.conf`` template."""
    rendered = {}
    for path in sorted(template_dir.glob("*.conf")):
        rendered[path.name] = render_text(path.name, path.read_text(encoding="utf-8"), values)
    return rendered


# SIP over TLS: generated in Python, not a template, because it exists only when ``[sip] tls`` is on; pjsip.conf
# includes it. Written even when off (a comment), so a previous run's TLS endpoints never linger.
TLS_FILE = "pjsip_tls.conf"
TLS_TRANSPORT = "transport-tls"
# The patients' trunk over TLS: identified by its SIP user and authenticated by digest, because calls over
# TLS come from the same addresses as those over UDP and an address can't tell the two apart.
TLS_TRUNK = "patients-tls"


@dataclass(frozen=True)
class TlsPaths:
    """Certificate, key and CA as Asterisk reads them (inside the chroot in sandbox mode)."""

    cert_file: str
    key_file: str
    ca_file: str


def secure_endpoint_lines(config: Config, paths: TlsPaths) -> list[str]:
    """Endpoint options for SIP over TLS with SRTP: every TLS endpoint (agents' phones, the TLS trunk)."""
    lines = [f"transport = {TLS_TRANSPORT}", f"media_encryption = {config.sip.media_encryption}"]
    # Never fall back to plain RTP when the other side offers none: the link is encrypted or the call fails.
    lines.append("media_encryption_optimistic = no")
    if config.sip.media_encryption == "dtls":
        lines += [
            "dtls_verify = fingerprint",
            f"dtls_cert_file = {paths.cert_file}",
            f"dtls_private_key = {paths.key_file}",
            f"dtls_ca_file = {paths.ca_file}",
            "dtls_setup = actpass",
            "dtls_rekey = 0",
            # DTLS-SRTP phones (baresip's dtls_srtp, WebRTC) offer UDP/TLS/RTP/SAVPF, and Asterisk refuses (488)
            # an offer whose profile (AVPF or not) differs from the endpoint's use_avpf.
            "use_avpf = yes",
        ]
    return lines


def render_pjsip_tls(config: Config, paths: TlsPaths | None, trunk_password: str) -> str:
    """``pjsip_tls.conf``: the TLS transport and the TLS trunk endpoint, or only a comment when TLS is off."""
    header = "; Generated by medhotline from [sip]; edits are overwritten."
    if not config.sip.tls:
        return f"{header}\n; [sip] tls is off: no TLS transport.\n"
    if paths is None:
        raise TemplateError("[sip] tls is on but no certificate is given for the TLS transport")
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", trunk_password):
        raise TemplateError(f"{TLS_FILE}: the TLS trunk's password must be 16-128 letters, digits, '-' or '_'")
    ast = config.asterisk
    lines = [
        header,
        "",
        f"[{TLS_TRANSPORT}]",
        "type = transport",
        "protocol = tls",
        f"bind = {ast.host}:{config.sip.tls_port}",
        f"cert_file = {paths.cert_file}",
        f"priv_key_file = {paths.key_file}",
        f"ca_list_file = {paths.ca_file}",
        "method = tlsv1_2",
        "",
        f"[{TLS_TRUNK}]",
        "type = endpoint",
        "context = from-patients",
        "disallow = all",
        "allow = ulaw,alaw",
        "dtmf_mode = rfc4733",
        "direct_media = no",
        f"media_address = {ast.host}",
        "bind_rtp_to_media_address = yes",
        "rtp_symmetric = yes",
        "force_rport = yes",
        "rewrite_contact = yes",
        "language = zh",
        "identify_by = username",
        f"auth = {TLS_TRUNK}",
        *secure_endpoint_lines(config, paths),
        "",
        f"[{TLS_TRUNK}]",
        "type = auth",
        "auth_type = userpass",
        f"username = {TLS_TRUNK}",
        f"password = {trunk_password}",
        "",
    ]
    return "\n".join(lines)
