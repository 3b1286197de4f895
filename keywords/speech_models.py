"""The Vosk models the hotline can use, and a safe download of one of them.

``fetch_model`` downloads the archive to a temporary file beside the destination, verifies its SHA-256,
unpacks it into a temporary directory (refusing absolute paths, ``..``, links and oversized archives), checks
the model layout, and renames the model directory into place: a failure at any step leaves nothing behind
and never a half-unpacked model where ``speech.model_path`` points.

Checksums: the vendor (alphacephei.com) publishes no SHA-256 for its models, so the catalogue holds none
and the operator must pass one (``--sha256``), taken from a copy they trust (computed with ``sha256sum`` on
the archive they validated, or from the hospital's internal mirror). A checksum is never guessed here.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ground.errors import MedhotlineError
from keywords.speech import model_layout_problems

MODELS_URL = "https://alphacephei.com/vosk/models/"
CHUNK_BYTES = 1 << 20
MAX_UNPACKED_BYTES = 20 << 30  # the big Chinese model unpacks to a few GB; refuse zip bombs well above that
MAX_MEMBERS = 10_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelFetchError(MedhotlineError):
    """A model could not be downloaded, verified or unpacked."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    directory: str  # the directory the archive unpacks to, and the name it gets under the destination
    language: str
    approx_size_mb: int
    description: str
    sha256: str | None = None  # None: unknown here, the operator must supply it

    @property
    def url(self) -> str:
        return f"{MODELS_URL}{self.directory}.zip"


CATALOGUE: dict[str, ModelInfo] = {
    "small-cn": ModelInfo(
        name="small-cn",
        directory="vosk-model-small-cn-0.22",
        language="zh",
        approx_size_mb=42,
        description="small Mandarin model, real-time on one core, for the IVR",
    ),
    "cn": ModelInfo(
        name="cn",
        directory="vosk-model-cn-0.22",
        language="zh",
        approx_size_mb=1300,
        description="big Mandarin model, more accurate, needs several GB of memory",
    ),
}


class _Response(Protocol):
    def read(self, amt: int, /) -> bytes: ...

    def close(self) -> None: ...


Opener = Callable[..., Any]
Progress = Callable[[int, int | None], None]


def fetch_model(
    name: str,
    dest_dir: Path,
    *,
    sha256: str | None,
    opener: Opener = urllib.request.urlopen,
    progress: Progress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and unpack the catalogue model ``name`` under ``dest_dir``; return the model directory.

    If the model directory already exists it is returned as is (nothing is downloaded).
    """
    info = CATALOGUE.get(name)
    if info is None:
        raise ModelFetchError(f"unknown model {name!r}: choose one of {', '.join(sorted(CATALOGUE))}")
    expected = _expected_checksum(info, sha256)
    target = Path(dest_dir) / info.directory
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
    archive = _download(info.url, target.parent, expected=expected, opener=opener, progress=progress, timeout=timeout)
    staging = Path(tempfile.mkdtemp(prefix=f".{info.directory}.", dir=target.parent))
    try:
        _unpack(archive, staging)
        model_root = _model_root(staging, info.directory)
        problems = model_layout_problems(model_root)
        if problems:
            raise ModelFetchError(f"the archive from {info.url} is not a Vosk model: {'; '.join(problems)}")
        try:
            os.rename(model_root, target)
        except OSError as exc:
            raise ModelFetchError(f"cannot move the model into {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return target


def _expected_checksum(info: ModelInfo, sha256: str | None) -> str:
    given = sha256.strip().lower() if sha256 else None
    if given is not None and not _SHA256.fullmatch(given):
        raise ModelFetchError(f"--sha256 {sha256!r} is not a SHA-256 digest (64 hexadecimal characters)")
    if info.sha256 and given and given != info.sha256:
        raise ModelFetchError(f"--sha256 does not match the catalogue's checksum for {info.name} ({info.sha256})")
    checksum = given or info.sha256
    if checksum is None:
        raise ModelFetchError(
            f"no SHA-256 is known for {info.directory}.zip: the vendor publishes none. Pass --sha256 with the "
            "digest of a copy you trust (sha256sum of the archive you validated, or from your internal mirror)"
        )
    return checksum


def _download(
    url: str, directory: Path, *, expected: str, opener: Opener, progress: Progress | None, timeout: float
) -> Path:
    request = urllib.request.Request(url, headers={"User-Agent": "medhotline-fetch-model"})  # noqa: S310 (https URL)
    handle, name = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=directory)
    path = Path(name)
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                response: _Response = opener(request, timeout=timeout)
                try:
                    total = _content_length(response)
                    while chunk := response.read(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                finally:
                    response.close()
            except urllib.error.HTTPError as exc:
                raise ModelFetchError(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise ModelFetchError(
                    f"cannot reach {url} ({reason}): this machine has no internet access? "
                    "Copy the model directory here from a machine that has, and set speech.model_path"
                ) from exc
        actual = digest.hexdigest()
        if actual != expected:
            raise ModelFetchError(
                f"checksum mismatch for {url}: got SHA-256 {actual}, expected {expected}; the download was discarded"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _content_length(response: Any) -> int | None:
    getheader = getattr(response, "getheader", None)
    value = getheader("Content-Length") if callable(getheader) else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _safe_member_path(name: str) -> PurePosixPath:
    """The relative path of an archive member, or ``ModelFetchError`` if it could land outside the target."""
    if "\\" in name or "\x00" in name:
        raise ModelFetchError(f"archive entry {name!r} has a backslash or NUL in its name: refused")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ModelFetchError(f"archive entry {name!r} points outside the model directory: refused")
    return path


def _unpack(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > MAX_MEMBERS:
                raise ModelFetchError(f"the archive has {len(members)} entries, more than {MAX_MEMBERS}: refused")
            if sum(member.file_size for member in members) > MAX_UNPACKED_BYTES:
                raise ModelFetchError(f"the archive unpacks to more than {MAX_UNPACKED_BYTES >> 30} GB: refused")
            root = staging.resolve()
            for member in members:
                relative = _safe_member_path(member.filename)
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise ModelFetchError(f"archive entry {member.filename!r} is a symbolic link: refused")
                destination = (root / relative).resolve()
                if not destination.is_relative_to(root):
                    raise ModelFetchError(f"archive entry {member.filename!r} points outside the model directory")
                if member.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, destination.open("wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ModelFetchError(f"the downloaded archive is not a readable zip file: {exc}") from exc
    except OSError as exc:
        raise ModelFetchError(f"cannot unpack the model into {staging}: {exc.strerror or exc}") from exc


def _model_root(staging: Path, directory: str) -> Path:
    """The unpacked model: the expected top directory, the archive's only directory, or the archive's root."""
    if (staging / directory).is_dir():
        return staging / directory
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return staging


def fetch_command(name: str, dest: Path, sha256: str | None) -> int:
    """``medhotline models fetch``: progress on stdout, errors on stderr; returns the exit code."""
    info = CATALOGUE.get(name)
    if info is not None:
        print(f"fetching {info.directory} ({info.description}, about {info.approx_size_mb} MB) from {info.url}")
    state = {"shown": -1}

    def show(done: int, total: int | None) -> None:
        if total:
            percent = done * 100 // total
            if percent // 5 != state["shown"]:
                state["shown"] = percent // 5
                print(f"  {done >> 20} / {total >> 20} MB ({percent}%)", flush=True)
        elif (done >> 20) // 10 != state["shown"]:
            state["shown"] = (done >> 20) // 10
            print(f"  {done >> 20} MB", flush=True)

    try:
        path = fetch_model(name, dest, sha256=sha256, progress=show)
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model ready in {path}; set speech.model_path = {str(path)!r}")
    return 0
