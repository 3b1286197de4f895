"""Identifier shapes shared by several packages."""

from __future__ import annotations

import re
from typing import Final, Literal

# A random id as this project writes them (uuid4, lower case): calls, recordings, records, registry patients.
UUID_PATTERN: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_uuid(value: object) -> bool:
    """True for a lower-case UUID string, nothing around it (``fullmatch``: no trailing newline slips by)."""
    return isinstance(value, str) and UUID_PATTERN.fullmatch(value) is not None


# Which shapes a patient id may take where it is checked. The registry (``his``) issues only UUIDs and accepts only
# those; the access policy (``compliance``) also accepts 32-128 lower-case hex digits, which callers and tests use
# as opaque references (docs/decisions.md, "One patient-id rule with an explicit allowance").
PatientIdForms = Literal["uuid", "uuid_or_hex"]
HEX_ID_PATTERN: Final = re.compile(r"(?:[0-9a-f]{2}){16,64}")


def is_patient_id(value: object, *, allow: PatientIdForms) -> bool:
    """True for an opaque patient id of an allowed shape; never for a name, phone or record number."""
    if is_uuid(value):
        return True
    return allow == "uuid_or_hex" and isinstance(value, str) and HEX_ID_PATTERN.fullmatch(value) is not None
