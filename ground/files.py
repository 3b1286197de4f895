"""Cheap change detection for directories administrators edit while the service runs (flows, lexicon)."""

from __future__ import annotations

from pathlib import Path


def directory_fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every ``*.yaml`` file: cheap to take, changes with any edit or replacement."""
    entries = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((path.name, stat.st_mtime_ns, stat.st_size))
    return tuple(entries)
