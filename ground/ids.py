"""Identifier shapes shared by several packages."""

from __future__ import annotations

import re
from typing import Final

# A random id as this project writes them (uuid4, lower case): calls, recordings, records, registry patients.
UUID_PATTERN: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_uuid(value: object) -> bool:
    """True for a lower-case UUID string, nothing around it (``fullmatch``: no trailing newline slips by)."""
    return isinstance(value, str) and UUID_PATTERN.fullmatch(value) is not None
