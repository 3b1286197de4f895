"""Prompt audio: texts from the flows rendered to 8 kHz WAV with espeak-ng (Mandarin) and sox.

Files are named by a hash of voice, speed and text, so an unchanged prompt is never rendered twice and a
changed text can never play stale audio. Each file is written under a temporary name and renamed, so Asterisk
never plays half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ground.errors import MedhotlineError

SOUND_PREFIX = "medhotline"
# Prompts the dialplan plays itself, with fixed names, when the service can't take the call.
SYSTEM_PROMPTS = {
    "unavailable": "系统暂时无法接听您的来电，请稍后再拨。如遇危急情况，请立即拨打120急救电话。",
}
# The "unavailable" prompt is also what a caller hears when the service fails them (the queue, the IVR after a
# telephony failure); its sound name, telephony.channel.UNAVAILABLE_SOUND, is SOUND_PREFIX/unavailable.


class PromptError(MedhotlineError):
    """A prompt could not be rendered."""


@dataclass(frozen=True)
class Voice:
    name: str = "cmn"
    speed: int = 150


@dataclass(frozen=True)
class BuildReport:
    rendered: int
    cached: int
    directory: Path


def sound_name(text: str, voice: Voice) -> str:
    """The Asterisk sound name (no extension) for a prompt text."""
    digest = hashlib.sha256(f"{voice.name}|{voice.speed}|{text}".encode()).hexdigest()[:24]
    return f"{SOUND_PREFIX}/{digest}"


def _check_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise PromptError(f"{' and '.join(missing)} not installed: run `apt-get install espeak-ng sox`")


def render(text: str, voice: Voice, target: Path) -> None:
    """Render one text to an 8 kHz mono 16-bit WAV at ``target`` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medhotline-prompt-") as tmp:
        raw = Path(tmp) / "raw.wav"
        # Text goes through stdin, not argv, so it is not visible in the process list.
        speak = subprocess.run(
            ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-w", str(raw), "--stdin"],
            input=text.encode("utf-8"),
            capture_output=True,
            check=False,
        )
        if speak.returncode != 0 or not raw.exists():
            raise PromptError(
                f"espeak-ng failed for voice {voice.name!r}: {speak.stderr.decode(errors='replace').strip()}"
            )
        partial = target.with_name(f".{target.name}.partial.wav")
        convert = subprocess.run(
            ["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", "-e", "signed-integer", str(partial)],
            capture_output=True,
            check=False,
        )
        if convert.returncode != 0:
            partial.unlink(missing_ok=True)
            raise PromptError(f"sox failed: {convert.stderr.decode(errors='replace').strip()}")
        os.chmod(partial, 0o644)
        partial.replace(target)


def build(texts: Iterable[str], voice: Voice, sounds_dir: Path) -> BuildReport:
    """Render every text not rendered yet, plus the system prompts, into ``sounds_dir/medhotline``."""
    _check_tools()
    directory = sounds_dir / SOUND_PREFIX
    rendered = cached = 0
    jobs = [(sound_name(text, voice).split("/", 1)[1], text) for text in dict.fromkeys(texts)]
    jobs += list(SYSTEM_PROMPTS.items())
    for stem, text in jobs:
        target = directory / f"{stem}.wav"
        marker = directory / f".{stem}.sha256"
        digest = hashlib.sha256(f"{voice.name}|{voice.speed}|{text}".encode()).hexdigest()
        # System prompts have fixed names, so their text hash is kept beside them to detect a changed text.
        if target.exists() and (stem not in SYSTEM_PROMPTS or _read(marker) == digest):
            cached += 1
            continue
        render(text, voice, target)
        if stem in SYSTEM_PROMPTS:
            marker.write_text(digest, encoding="utf-8")
        rendered += 1
    return BuildReport(rendered=rendered, cached=cached, directory=directory)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
