"""The compliance commands' error paths through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from ground.errors import EXIT_UNABLE
from medhotline.cli import main


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "medhotline.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n[keyservice]\ndirectory = "{tmp_path / "keys"}"\n',
        encoding="utf-8",
    )
    return path


def test_audit_prove_without_an_entry_number_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(_config(tmp_path)), "audit", "prove"]) == 1
    assert "audit prove needs the entry number" in capsys.readouterr().err


def test_audit_verify_without_the_public_key_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    assert main(["--config", str(config), "audit", "verify"]) == EXIT_UNABLE  # could not run: not a usage error
    assert "audit-head.pub.pem" in capsys.readouterr().err


def test_a_bad_keyservice_directory_value_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text("[keyservice]\ndirectory = 5\n", encoding="utf-8")
    assert main(["--config", str(path), "keyservice"]) == 2
    assert "keyservice.directory" in capsys.readouterr().err
