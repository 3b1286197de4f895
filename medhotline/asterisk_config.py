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


def template_values(
    config: Config, credentials: AsteriskCredentials, *, instance_dir: str, module_dir: str
) -> dict[str, str]:
    ast = config.asterisk
    return {
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
