"""Find the Debian mirror the host's own apt sources use.

The sandbox installs Debian's ``asterisk`` package from the ``sid`` suite of the same mirror the machine already
trusts, so no host name is ever written into the repository or the configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ground.errors import MedhotlineError

APT_DIR = Path("/etc/apt")


class MirrorNotFound(MedhotlineError):
    """No usable Debian mirror in the apt sources."""


def _one_line_entries(text: str) -> Iterable[tuple[str, list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        parts = line.split()[1:]
        if parts and parts[0].startswith("["):  # options such as [signed-by=...]
            while parts and not parts[0].endswith("]"):
                parts.pop(0)
            parts = parts[1:]
        if len(parts) >= 2:
            yield parts[0], parts[1:2]


def _deb822_entries(text: str) -> Iterable[tuple[str, list[str]]]:
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw:
                continue
            key, value = raw.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def _is_debian_archive(uri: str, suites: list[str]) -> bool:
    if "security" in uri:
        return False
    return any(suite and "-" not in suite for suite in suites) and uri.rstrip("/").endswith("/debian")


def find_debian_mirror(apt_dir: Path = APT_DIR) -> str:
    """Return the URI of the first Debian archive (not security, not updates) in the apt sources."""
    files: list[Path] = []
    if (apt_dir / "sources.list").exists():
        files.append(apt_dir / "sources.list")
    if (apt_dir / "sources.list.d").is_dir():
        files.extend(sorted((apt_dir / "sources.list.d").glob("*")))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uri, suites in entries:
            if _is_debian_archive(uri, suites):
                return uri.rstrip("/")
    raise MirrorNotFound(
        f"no Debian archive found in {apt_dir}/sources.list or {apt_dir}/sources.list.d: "
        "set asterisk.sandbox.mirror in medhotline.toml"
    )
