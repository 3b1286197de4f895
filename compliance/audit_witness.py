"""What the audit trail's database alone cannot prove: that its newest entries were not rolled back.

An attacker with write access to the database can delete the newest entries together with the signed heads
that cover them (or wipe both tables); what is left is a consistent, shorter log that verifies. So whoever signs
heads also remembers them outside the database, in two places:

- the **memory**: the largest head signed, one JSON file beside the signing key (its own key directory),
  replaced atomically (write, fsync, rename, fsync the directory);
- the **witness file**: every head signed, appended as one JSON line and fsynced; its path comes from
  configuration (``[audit] witness_file``) so it can live on another disk or a mount another team owns.

:meth:`compliance.audit.AuditLog.sign_head` refuses to sign a log that does not extend the remembered head, and
``medhotline audit verify`` compares the log with the larger of the two remembered heads, naming what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from compliance.audit import AuditError, AuditIntegrityError, SignedTreeHead
from compliance.merkle import ProofError, root_from_leaf_hashes

MEMORY_FILE: Final = "audit-head.signed.json"


class HeadWitness:
    """The largest signed head, remembered in ``key_directory`` and published to ``witness_file``."""

    def __init__(self, key_directory: Path, witness_file: Path | None = None) -> None:
        self.memory_file = key_directory / MEMORY_FILE
        self.witness_file = witness_file

    def latest(self) -> SignedTreeHead | None:
        """The largest head either place remembers (an attacker must have erased both to hide a rollback)."""
        heads = [h for h in (self._memory(), self._last_witnessed()) if h is not None]
        return max(heads, key=lambda h: h.size, default=None)

    def where(self) -> str:
        places = [str(self.memory_file)] + ([str(self.witness_file)] if self.witness_file is not None else [])
        return " and ".join(places)

    def check_extends(self, hashes: Sequence[bytes]) -> None:
        """AuditIntegrityError unless the log with these leaf hashes extends the remembered head."""
        head = self.latest()
        if head is None:
            return
        if len(hashes) < head.size:
            raise AuditIntegrityError(f"refusing to sign the audit log: {missing_message(len(hashes), head)}")
        if root_from_leaf_hashes(list(hashes[: head.size])) != head.root_hash:
            raise AuditIntegrityError(
                f"refusing to sign the audit log: its first {head.size} entries differ from the head of "
                f"{head.size} entries signed at {_when(head)} (rolled back and rewritten); "
                "run `medhotline audit verify`"
            )

    def record(self, head: SignedTreeHead) -> None:
        """Publish ``head`` to the witness file, then remember it; both durable before the head is stored."""
        line = json.dumps(head.to_json(), sort_keys=True, separators=(",", ":")) + "\n"
        try:
            if self.witness_file is not None:
                self.witness_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.witness_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode("ascii"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            current = self._memory()
            if current is None or head.size >= current.size:
                _replace_atomically(self.memory_file, line.encode("ascii"))
        except OSError as exc:
            raise AuditError(f"cannot remember the signed audit head ({self.where()}): {exc.strerror or exc}") from None

    def _memory(self) -> SignedTreeHead | None:
        try:
            text = self.memory_file.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"{self.memory_file}: cannot read the remembered audit head: {exc}") from None
        return _parse(text, str(self.memory_file))

    def _last_witnessed(self) -> SignedTreeHead | None:
        if self.witness_file is None:
            return None
        try:
            lines = self.witness_file.read_text(encoding="ascii").splitlines()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"{self.witness_file}: cannot read the audit head witness: {exc}") from None
        heads = [_parse(line, f"{self.witness_file}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
        return max(heads, key=lambda h: h.size, default=None)


def missing_message(size: int, head: SignedTreeHead) -> str:
    """What a log of ``size`` entries lacks against a remembered head of more."""
    span = f"entry {size} is" if head.size == size + 1 else f"entries {size}..{head.size - 1} are"
    return (
        f"audit trail has {size} entries but a head of {head.size} entries was signed at {_when(head)}: "
        f"{span} missing (truncated or rolled back, with the heads that covered them)"
    )


def _when(head: SignedTreeHead) -> str:
    return str(head.to_json()["timestamp"])


def _parse(text: str, where: str) -> SignedTreeHead:
    try:
        return SignedTreeHead.from_json(json.loads(text))
    except (ValueError, ProofError, TypeError) as exc:
        raise AuditError(f"{where}: not a signed audit head: {exc}") from None


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write-then-rename with fsyncs: after a crash the file holds the old head or the new one, never half."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
