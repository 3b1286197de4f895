"""``medhotline audit verify`` and ``medhotline audit prove N``, as functions the CLI wires up.

Exit codes (ground.errors): 0 the log (or proof) checks out, 1 it does not (tampering found), 4 the check
could not run (database unreachable, schema not migrated, key unreadable, no such entry).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from compliance.audit import AuditError, SqlAuditStore, check_inclusion, load_public_key, prove, verify
from compliance.audit_witness import HeadWitness, missing_message
from compliance.merkle import ProofError
from ground.db import DatabaseError, make_engine, mask_url
from ground.errors import EXIT_OK, EXIT_PROBLEMS, EXIT_UNABLE

EXIT_TAMPERED = EXIT_PROBLEMS
EXIT_ERROR = EXIT_UNABLE


def _fail(message: str) -> int:
    print(f"medhotline audit: {message}", file=sys.stderr)
    return EXIT_ERROR


def _open(database_url: str, public_key_path: Path) -> tuple[Ed25519PublicKey, Engine] | int:
    """The auditor's public key and the database, or the exit code of a clear failure to open either."""
    try:
        return load_public_key(public_key_path), make_engine(database_url)
    except (AuditError, DatabaseError) as exc:
        return _fail(str(exc))


def verify_command(database_url: str, public_key_path: Path, *, witness: HeadWitness | None = None) -> int:
    """Verify the whole audit log; print a one-line verdict (first problem named) and return the exit code.

    With a ``witness`` the log must also still hold the largest head ever signed: deleting the newest entries
    together with their heads (or wiping both tables) leaves a log that is consistent on its own.
    """
    opened = _open(database_url, public_key_path)
    if isinstance(opened, int):
        return opened
    public_key, engine = opened
    try:
        store = SqlAuditStore(engine)
        remembered = witness.latest() if witness is not None else None
        if remembered is not None:
            try:
                remembered.check_signature(public_key)
            except ProofError as exc:
                assert witness is not None
                print(f"audit log BROKEN: the head remembered in {witness.where()} is not signed by this key: {exc}")
                return EXIT_TAMPERED
            size = len(store.leaf_hashes())
            if size < remembered.size:
                print(f"audit log BROKEN: {missing_message(size, remembered)}")
                return EXIT_TAMPERED
            if any(h.size == remembered.size and h.root_hash == remembered.root_hash for h in store.heads()):
                remembered = None  # the database still holds it: verify() checks it there
        report = verify(store, public_key, trusted_head=remembered)
    except AuditError as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        return _fail(f"database at {mask_url(database_url)}: reading the audit log failed: {type(exc).__name__}")
    finally:
        engine.dispose()
    print(report.summary())
    if report.ok and report.latest_head is not None:
        head = report.latest_head
        print(f"latest signed head: size {head.size}, root {head.root_hash.hex()}, signed {head.timestamp}")
    return EXIT_OK if report.ok else EXIT_TAMPERED


def prove_command(database_url: str, seq: int, public_key_path: Path) -> int:
    """Print (stdout, JSON) an inclusion proof of entry ``seq`` against the latest signed head.

    The proof is checked here too, with the public key, before it is printed; a one-line summary goes to stderr
    so stdout stays machine-readable.
    """
    opened = _open(database_url, public_key_path)
    if isinstance(opened, int):
        return opened
    public_key, engine = opened
    try:
        proof = prove(SqlAuditStore(engine), seq)
    except AuditError as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        return _fail(f"database at {mask_url(database_url)}: reading the audit log failed: {type(exc).__name__}")
    finally:
        engine.dispose()
    assert proof.head is not None
    try:
        check_inclusion(proof, proof.head, public_key)
    except ProofError as exc:
        print(f"medhotline audit: entry {seq}: proof does NOT verify: {exc}", file=sys.stderr)
        return EXIT_TAMPERED
    print(json.dumps(proof.to_json(), indent=2, sort_keys=True))
    print(
        f"entry {seq} is included in the signed tree of {proof.tree_size} entries "
        f"(root {proof.head.root_hash.hex()}); proof verified",
        file=sys.stderr,
    )
    return EXIT_OK
