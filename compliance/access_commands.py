"""CLI commands of this package (filled in by its feature work)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's command groups to the ``medhotline`` parser."""
