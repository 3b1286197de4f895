"""find_debian_mirror over fake /etc/apt trees: one-line and deb822 sources, and what must be skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from medhotline.apt_sources import MirrorNotFound, find_debian_mirror

MIRROR = "http://mirror.example.org/debian"


def _apt(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    """A fake /etc/apt: ``sources_list`` and files of sources.list.d (``name_sources`` → ``name.sources``)."""
    if sources_list is not None:
        (tmp_path / "sources.list").write_text(sources_list, encoding="utf-8")
    if parts:
        (tmp_path / "sources.list.d").mkdir()
        for name, text in parts.items():
            stem, _, ext = name.rpartition("_")
            (tmp_path / "sources.list.d" / f"{stem}.{ext}").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "sources_list",
    [
        pytest.param(f"deb {MIRROR} bookworm main\n", id="plain"),
        pytest.param(f"deb {MIRROR}/ bookworm main contrib\n", id="trailing-slash"),
        pytest.param(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} sid main\n", id="opt"),
        pytest.param(f"deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] {MIRROR} trixie main\n", id="two-opts"),
        pytest.param(
            "# deb http://old.example.org/debian bookworm main\n"
            "deb-src http://src.example.org/debian bookworm main\n"
            "deb http://security.example.org/debian-security bookworm-security main\n"
            "deb http://mirror.example.org/debian bookworm-updates main\n"
            "deb [signed-by=/usr/share/keyrings/nodesource.gpg] "
            "https://nodesource.example.org/node_20.x nodistro main\n"
            "deb http://security.example.org/debian bookworm/updates main\n"
            f"\ndeb {MIRROR} bookworm main  # the one\n",
            id="skips-comments-src-security-updates-other-repos",
        ),
    ],
)
def test_one_line_sources_list(tmp_path: Path, sources_list: str) -> None:
    assert find_debian_mirror(_apt(tmp_path, sources_list)) == MIRROR


def test_deb822_sources(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        a_disabled_sources="Types: deb\nURIs: http://disabled.example.org/debian\nSuites: bookworm\nEnabled: no\n",
        b_debian_sources=(
            "# security first, in its own stanza\n"
            "Types: deb\nURIs: http://security.example.org/debian-security\nSuites: bookworm-security\n"
            "Components: main\n\n"
            "Types: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n\n"
            "Types: deb deb-src\n"
            f"URIs: {MIRROR}\n"
            "Suites: bookworm bookworm-updates\n"
            "Components: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    assert find_debian_mirror(apt) == MIRROR


def test_deb822_updates_only_is_skipped(tmp_path: Path) -> None:
    apt = _apt(tmp_path, debian_sources=f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm-updates bookworm-backports\n")
    with pytest.raises(MirrorNotFound):
        find_debian_mirror(apt)


def test_sources_list_comes_before_sources_list_d(tmp_path: Path) -> None:
    apt = _apt(
        tmp_path,
        "deb http://first.example.org/debian bookworm main\n",
        debian_sources=f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm\n",
    )
    assert find_debian_mirror(apt) == "http://first.example.org/debian"


def test_list_files_in_sources_list_d_and_unreadable_files(tmp_path: Path) -> None:
    apt = _apt(tmp_path, "", mirror_list=f"deb {MIRROR} sid main\n")
    (apt / "sources.list.d" / "0broken.list").write_bytes(b"deb \xff\xfe")
    assert find_debian_mirror(apt) == MIRROR


@pytest.mark.parametrize(
    "parts",
    [
        {},
        {"nodesource_sources": "Types: deb\nURIs: https://nodesource.example.org/node_20.x\nSuites: nodistro\n"},
        {"ubuntu_list": "deb http://archive.example.org/ubuntu noble main\n"},
    ],
)
def test_nothing_found_tells_to_set_the_mirror(tmp_path: Path, parts: dict[str, str]) -> None:
    with pytest.raises(MirrorNotFound, match=r"set asterisk\.sandbox\.mirror in medhotline\.toml") as info:
        find_debian_mirror(_apt(tmp_path, **parts))
    assert str(tmp_path) in str(info.value)
