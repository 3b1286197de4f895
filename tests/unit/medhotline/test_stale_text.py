"""Text that describes the code as it was planned, not as it is, misleads the next reader."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("compliance", "his", "ivr", "keywords", "medhotline", "recordings", "routing", "scheduler")


@pytest.mark.parametrize("package", PACKAGES)
def test_package_docstrings_describe_what_is_there(package: str) -> None:
    doc = importlib.import_module(package).__doc__ or ""
    assert "arrives with its own issue" not in doc


def test_the_schema_docstring_does_not_promise_encryption_that_exists() -> None:
    doc = importlib.import_module("ground.models").__doc__ or ""
    assert "come with the encryption work" not in doc


def test_the_security_model_does_not_defer_recordings() -> None:
    assert "next issue" not in (REPO / "docs" / "security.md").read_text(encoding="utf-8")
