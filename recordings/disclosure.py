"""Giving out what recordings keep: a recording's audio (play, export) and a call's signed records (show).

Each goes through the access policy first: the account must be allowed to read (play, show) or export, with a
reason, and the policy audits every attempt, allowed or refused. The policy is the :class:`Authorizer` port
the caller passes in (``compliance.access_store.AccessControl`` satisfies it), so this module decides what is
asked for and in what order, and the commands only parse, call and print.

An export is either re-encrypted to the requester's X25519 public key or written as a WAV watermarked with who
exported it and when; the data key is wiped and the partial file removed whatever happens, and the export is
appended to the audit trail with the digest of what left.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from compliance.access import Action, Resource
from compliance.audit import AuditLog
from compliance.keyservice_client import wipe
from ground.errors import CommandError
from recordings.envelope import open_sealed, seal_for_recipient, watermark_wav
from recordings.ingest import RecordingKeys
from recordings.store import RecordingRow, RecordingStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from recordings.records import RecordSealer


class Authorizer(Protocol):
    """The access policy as recordings needs it: allow, or raise ``AccessDenied`` (audited either way)."""

    def authorize(
        self, account_id: str, action: Action, resource: Resource, at: datetime, *, reason: str | None = None
    ) -> object: ...


def _utc_now() -> datetime:
    return datetime.now(UTC)


def check_new_output(out: Path) -> None:
    """Exports never overwrite a file: refuse before the key service is even asked."""
    if out.exists():
        raise CommandError(f"{out} exists: exports never overwrite a file")


@dataclass(frozen=True, slots=True)
class Exported:
    recording_id: str
    out: Path
    form: Literal["recipient", "watermark"]
    sha256: str


@dataclass(frozen=True, slots=True)
class ShownRecord:
    kind: str
    id: str
    created_at: datetime
    text: str


@dataclass
class Disclosure:
    """Play, export and show, each behind the access policy."""

    store: RecordingStore
    keys: RecordingKeys
    store_dir: Path
    authorizer: Authorizer
    audit: AuditLog
    clock: Callable[[], datetime] = field(default=_utc_now)

    async def _authorized_row(self, recording_id: str, account: str, action: Action, reason: str) -> RecordingRow:
        row = await asyncio.to_thread(self.store.get, recording_id)
        resource = Resource(kind="recording", patient_id=row.patient_id, department=row.department, call_id=row.call_id)
        await asyncio.to_thread(self.authorizer.authorize, account, action, resource, self.clock(), reason=reason)
        return row

    async def _plain_chunks(self, row: RecordingRow) -> tuple[Iterator[bytes], bytearray]:
        if row.state != "stored" or row.path is None or row.wrapped_key is None:
            raise CommandError(f"recording {row.id} is {row.state}: there is no audio to give out")
        key = await self.keys.unwrap(row.wrapped_key, row.key_purpose)
        return open_sealed(self.store_dir / row.path, key, context=row.context), key

    async def play(self, recording_id: str, *, account: str, reason: str, sink: Callable[[bytes], object]) -> None:
        """The decrypted WAV, chunk by chunk into ``sink``, once the policy allows ``account`` to read it."""
        row = await self._authorized_row(recording_id, account, "read", reason)
        chunks, key = await self._plain_chunks(row)
        try:
            for chunk in chunks:
                sink(chunk)
        finally:
            wipe(key)

    async def export(
        self,
        recording_id: str,
        *,
        account: str,
        role: str | None,
        reason: str,
        out: Path,
        recipient: X25519PublicKey | None,
    ) -> Exported:
        """Re-encrypted to ``recipient`` (or, without one, watermarked) into the new file ``out``; audited."""
        check_new_output(out)
        row = await self._authorized_row(recording_id, account, "export", reason)
        chunks, key = await self._plain_chunks(row)
        at = self.clock()
        temp = out.with_name(f".{out.name}.part-{os.getpid()}")
        form: Literal["recipient", "watermark"]
        try:
            if recipient is not None:
                label = f"{row.id}|{account}|{at:%Y-%m-%dT%H:%M:%SZ}"
                sealed = await asyncio.to_thread(seal_for_recipient, chunks, temp, recipient, label=label)
                digest, form = sealed.cipher_sha256, "recipient"
            else:
                text = f"exported by {account} at {at:%Y-%m-%d %H:%M:%S} UTC; medhotline recording {row.id}"
                digest, form = await asyncio.to_thread(watermark_wav, chunks, temp, text), "watermark"
            os.replace(temp, out)
        finally:
            wipe(key)
            temp.unlink(missing_ok=True)
        await asyncio.to_thread(
            self.audit.append,
            actor=account,
            role=role or "account",
            action="export",
            outcome="success",
            reason=reason,
            details={"recording": row.id, "call": row.call_id, "form": form, "output_sha256": digest},
        )
        return Exported(row.id, out, form, digest)

    async def call_records(
        self, sealer: RecordSealer, call_id: str, *, account: str, reason: str, department: str | None
    ) -> list[ShownRecord]:
        """A call's signed records, decrypted, once the policy allows ``account`` to read them. The call's
        patient is the one its recordings name; without one the record counts as ``department``'s."""
        recordings = await asyncio.to_thread(self.store.for_call, call_id)
        patient = next((r.patient_id for r in recordings if r.patient_id), None)
        resource = Resource(
            kind="call_record", patient_id=patient, department=None if patient else department, call_id=call_id
        )
        await asyncio.to_thread(self.authorizer.authorize, account, "read", resource, self.clock(), reason=reason)
        shown = []
        for record in await asyncio.to_thread(sealer.records.for_call, call_id):
            body = await sealer.body(record)
            shown.append(ShownRecord(record.kind, record.id, record.created_at, body.decode("utf-8")))
        return shown
