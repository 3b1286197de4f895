"""One definition each of the helpers several packages need: canonical JSON, the UUID pattern, exit codes."""

from __future__ import annotations

import uuid

import pytest

from ground.canonical import canonical_json
from ground.errors import EXIT_FAILED, EXIT_OK, EXIT_PROBLEMS, EXIT_UNABLE, EXIT_USAGE
from ground.ids import UUID_PATTERN, is_uuid


def test_canonical_json_is_sorted_compact_utf8_and_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": ["急", True, None]}) == '{"a":["急",true,null],"b":1}'.encode()
    with pytest.raises(ValueError, match="JSON"):
        canonical_json({"x": float("nan")})


def test_audit_and_signed_records_encode_the_same_way() -> None:
    from compliance import audit
    from recordings import signed

    # Imported, not defined again: the bytes a verifier hashes can't drift between the two.
    assert vars(signed)["canonical_json"] is canonical_json
    assert vars(audit)["canonical_json"] is canonical_json


def test_one_uuid_pattern() -> None:
    assert is_uuid(str(uuid.uuid4()))
    assert not is_uuid(str(uuid.uuid4()).upper())
    assert not is_uuid(f"{uuid.uuid4()}\n")
    assert UUID_PATTERN.fullmatch(str(uuid.uuid4()))


def test_exit_codes_are_distinct_and_the_cli_uses_them() -> None:
    from medhotline import cli
    from medhotline.commands import audit as audit_commands

    assert len({EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNABLE}) == 4
    assert EXIT_PROBLEMS == EXIT_FAILED
    assert (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE) == (EXIT_OK, EXIT_FAILED, EXIT_USAGE)
    # `audit verify` could not run (no database, no key): not "usage", which is what 2 means elsewhere.
    assert audit_commands.EXIT_ERROR == EXIT_UNABLE
    assert EXIT_USAGE not in (EXIT_UNABLE, audit_commands.EXIT_ERROR)
