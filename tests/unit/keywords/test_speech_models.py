"""Model download: a fake opener serves small zip archives; nothing touches the network."""

from __future__ import annotations

import hashlib
import io
import stat
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from keywords import speech_models as models
from keywords.speech_models import CATALOGUE, ModelFetchError, fetch_command, fetch_model

TOP = CATALOGUE["small-cn"].directory
MODEL_FILES = {
    f"{TOP}/am/final.mdl": b"acoustic model",
    f"{TOP}/conf/mfcc.conf": b"--use-energy=false\n",
    f"{TOP}/conf/model.conf": b"--beam=10.0\n",
    f"{TOP}/graph/HCLr.fst": b"fst",
    f"{TOP}/graph/Gr.fst": b"fst",
    f"{TOP}/README": b"small Chinese model",
}


def make_zip(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


class FakeResponse:
    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)
        self._length = len(data)
        self.closed = False

    def read(self, amt: int, /) -> bytes:
        return self._stream.read(amt)

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return str(self._length) if name.lower() == "content-length" else default

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    def __init__(self, data: bytes | None = None, error: Exception | None = None) -> None:
        self.data = data
        self.error = error
        self.requests: list[urllib.request.Request] = []
        self.responses: list[FakeResponse] = []

    def __call__(self, request: urllib.request.Request, timeout: float) -> FakeResponse:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        assert self.data is not None
        response = FakeResponse(self.data)
        self.responses.append(response)
        return response


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_fetch_verifies_unpacks_and_renames_into_place(tmp_path: Path) -> None:
    archive = make_zip(MODEL_FILES)
    opener = FakeOpener(archive)
    seen: list[tuple[int, int | None]] = []
    path = fetch_model(
        "small-cn",
        tmp_path / "models",
        sha256=sha(archive).upper(),
        opener=opener,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert path == tmp_path / "models" / TOP
    assert (path / "am" / "final.mdl").read_bytes() == b"acoustic model"
    assert (path / "graph" / "Gr.fst").is_file()
    assert leftovers(tmp_path / "models") == [TOP]  # no temporary file or staging directory left
    assert opener.requests[0].full_url == "https://alphacephei.com/vosk/models/vosk-model-small-cn-0.22.zip"
    assert opener.responses[0].closed
    assert seen[-1] == (len(archive), len(archive))
    # a second fetch finds the model and downloads nothing
    assert (
        fetch_model("small-cn", tmp_path / "models", sha256=sha(archive), opener=FakeOpener(error=AssertionError()))
        == path
    )


def test_checksum_mismatch_discards_the_download(tmp_path: Path) -> None:
    archive = make_zip(MODEL_FILES)
    with pytest.raises(ModelFetchError, match=f"checksum mismatch .* got SHA-256 {sha(archive)}, expected {'0' * 64}"):
        fetch_model("small-cn", tmp_path, sha256="0" * 64, opener=FakeOpener(archive))
    assert leftovers(tmp_path) == []


def test_checksum_is_required_and_must_look_like_one(tmp_path: Path) -> None:
    assert all(info.sha256 is None for info in CATALOGUE.values())  # none invented: the vendor publishes none
    with pytest.raises(ModelFetchError, match=r"no SHA-256 is known .* Pass --sha256"):
        fetch_model("small-cn", tmp_path, sha256=None, opener=FakeOpener(b""))
    with pytest.raises(ModelFetchError, match="not a SHA-256 digest"):
        fetch_model("small-cn", tmp_path, sha256="abc", opener=FakeOpener(b""))
    with pytest.raises(ModelFetchError, match="unknown model 'tiny-cn': choose one of cn, small-cn"):
        fetch_model("tiny-cn", tmp_path, sha256="0" * 64, opener=FakeOpener(b""))


@pytest.mark.parametrize(
    "entry", ["../evil.txt", f"{TOP}/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_traversal_entry_is_rejected(tmp_path: Path, entry: str) -> None:
    archive = make_zip({**MODEL_FILES, entry: b"owned"})
    dest = tmp_path / "models"
    with pytest.raises(ModelFetchError, match="refused"):
        fetch_model("small-cn", dest, sha256=sha(archive), opener=FakeOpener(archive))
    assert leftovers(dest) == []
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_entry_is_rejected(tmp_path: Path) -> None:
    archive = make_zip(MODEL_FILES, symlinks=(f"{TOP}/conf/link",))
    with pytest.raises(ModelFetchError, match="symbolic link: refused"):
        fetch_model("small-cn", tmp_path, sha256=sha(archive), opener=FakeOpener(archive))
    assert leftovers(tmp_path) == []


def test_archive_without_a_model_is_rejected(tmp_path: Path) -> None:
    archive = make_zip({f"{TOP}/README": b"just a readme"})
    with pytest.raises(ModelFetchError, match=r"not a Vosk model: am/final.mdl is missing"):
        fetch_model("small-cn", tmp_path, sha256=sha(archive), opener=FakeOpener(archive))
    assert leftovers(tmp_path) == []


def test_not_a_zip_is_a_clear_error(tmp_path: Path) -> None:
    data = b"<html>captive portal</html>"
    with pytest.raises(ModelFetchError, match="not a readable zip file"):
        fetch_model("small-cn", tmp_path, sha256=sha(data), opener=FakeOpener(data))
    assert leftovers(tmp_path) == []


def test_network_error_says_what_to_do(tmp_path: Path) -> None:
    opener = FakeOpener(error=urllib.error.URLError(OSError(-3, "Temporary failure in name resolution")))
    with pytest.raises(ModelFetchError) as caught:
        fetch_model("cn", tmp_path, sha256="a" * 64, opener=opener)
    message = str(caught.value)
    assert message.startswith("cannot reach https://alphacephei.com/vosk/models/vosk-model-cn-0.22.zip")
    assert "Temporary failure in name resolution" in message
    assert "no internet access?" in message
    assert "set speech.model_path" in message
    assert leftovers(tmp_path) == []


def test_http_error_is_reported_with_its_status(tmp_path: Path) -> None:
    url = CATALOGUE["cn"].url
    error = urllib.error.HTTPError(url, 404, "Not Found", hdrs=None, fp=None)  # type: ignore[arg-type]
    with pytest.raises(ModelFetchError, match="answered HTTP 404 Not Found"):
        fetch_model("cn", tmp_path, sha256="a" * 64, opener=FakeOpener(error=error))


def test_fetch_command_prints_progress_and_returns_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = make_zip(MODEL_FILES)
    real_fetch = models.fetch_model

    def fake_fetch(name: str, dest_dir: Path, **kwargs: Any) -> Path:
        return real_fetch(name, dest_dir, opener=FakeOpener(archive), **kwargs)

    monkeypatch.setattr(models, "fetch_model", fake_fetch)
    assert fetch_command("small-cn", tmp_path, sha(archive)) == 0
    out = capsys.readouterr().out
    assert "fetching vosk-model-small-cn-0.22" in out
    assert "(100%)" in out
    assert f"speech.model_path = '{tmp_path / TOP}'" in out

    assert fetch_command("small-cn", tmp_path / "other", None) == 1
    assert "error: no SHA-256 is known" in capsys.readouterr().err
