"""Canonical JSON: the one encoding whose bytes are hashed and signed (audit entries, tree heads, call records).

Keys sorted, no whitespace, UTF-8 as is, no NaN or infinities: two writers encoding the same value get the same
bytes, so a hash or signature over them is reproducible by any verifier.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes; ValueError for NaN or infinity (they have no JSON form)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
