"""Signed call records, sans I/O: the canonical header, what is signed and timestamped, and the checks.

A record is two parts:

- the **header**, canonical JSON (sorted keys, no whitespace, UTF-8, no floats) holding only ids, times and
  digests: the record and call ids, the kind, the record it amends, when it was made, the SHA-256 of the body,
  the recordings it covers (id, plaintext and ciphertext SHA-256) and the handling agent's account id. It is
  signed with Ed25519 by the key service's records key (domain-separated for ``call_records``), and the pair
  (header, signature) is timestamped under RFC 3161 by a timestamp authority: the token's message imprint is
  SHA-256(header ‖ signature), so the token fixes *when* this exact signed header existed;
- the **body**, canonical JSON with the content (summary, the agent's note, consent text), stored encrypted.
  Its digest is in the signed header, so altering the body breaks the record even though the signature never
  saw the plaintext.

Anyone with the public trust anchors can check headers, signatures and timestamps; checking bodies needs the
data key (the key service), checking recordings needs the files. :func:`check_record` names every failure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from compliance.keystore import signed_message
from compliance.timestamps import TimestampError, verify_token
from ground.canonical import canonical_json
from ground.clock import utc_text
from ground.errors import MedhotlineError

HEADER_FORMAT: Final = 1
SIGNING_PURPOSE: Final = "call_records"
# How far the timestamp authority's time may be from the record's own creation time: the TSA is asked right
# after signing, so more than this means the record was timestamped later than it claims (or a clock is off).
MAX_TIMESTAMP_SKEW: Final = timedelta(minutes=10)


class RecordFormatError(MedhotlineError):
    pass


def format_time(at: datetime) -> str:
    if at.tzinfo is None or at.utcoffset() is None:
        raise RecordFormatError("record times must be timezone-aware")
    return utc_text(at)


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CoveredRecording:
    id: str
    plain_sha256: str
    cipher_sha256: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "plain_sha256": self.plain_sha256, "cipher_sha256": self.cipher_sha256}


@dataclass(frozen=True, slots=True)
class Header:
    record: str
    call: str
    kind: str
    amends: str | None
    created_at: datetime
    body_sha256: str
    recordings: tuple[CoveredRecording, ...]
    agent: str | None
    signing_key: str

    def canonical(self) -> bytes:
        return canonical_json(
            {
                "format": HEADER_FORMAT,
                "record": self.record,
                "call": self.call,
                "kind": self.kind,
                "amends": self.amends,
                "created_at": format_time(self.created_at),
                "body_sha256": self.body_sha256,
                "recordings": [r.to_json() for r in self.recordings],
                "agent": self.agent,
                "signing_key": self.signing_key,
            }
        )

    @classmethod
    def parse(cls, text: str) -> Header:
        try:
            data = json.loads(text)
            if data.get("format") != HEADER_FORMAT:
                raise RecordFormatError(f"unsupported header format {data.get('format')!r}")
            header = cls(
                record=str(data["record"]),
                call=str(data["call"]),
                kind=str(data["kind"]),
                amends=data["amends"] if data["amends"] is None else str(data["amends"]),
                created_at=parse_time(str(data["created_at"])),
                body_sha256=str(data["body_sha256"]),
                recordings=tuple(
                    CoveredRecording(str(r["id"]), str(r["plain_sha256"]), str(r["cipher_sha256"]))
                    for r in data["recordings"]
                ),
                agent=data["agent"] if data["agent"] is None else str(data["agent"]),
                signing_key=str(data["signing_key"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RecordFormatError(f"the header is not a medhotline record header: {exc}") from None
        if header.canonical() != text.encode("utf-8"):
            raise RecordFormatError("the header is not in canonical form (it was re-encoded or edited)")
        return header


def key_id(raw_public_key: bytes) -> str:
    """A short, stable name of a signing key: the first 16 bytes of SHA-256 of its raw form, hex."""
    return hashlib.sha256(raw_public_key).hexdigest()[:32]


def timestamp_imprint(header: bytes, signature: bytes) -> bytes:
    """What the timestamp token fixes in time: SHA-256(header ‖ signature)."""
    return hashlib.sha256(header + signature).digest()


def check_signature(header: bytes, signature: bytes, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(signature, signed_message(header, SIGNING_PURPOSE))
    except InvalidSignature:
        return False
    return True


# --- verification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A ``call_records`` row as read, before any check."""

    id: str
    call_id: str
    kind: str
    amends: str | None
    created_at: datetime
    header: str
    signature: bytes
    signing_key_id: str
    timestamp_token: bytes
    timestamped_at: datetime


@dataclass(frozen=True, slots=True)
class RecordingFacts:
    """What verification knows of a recording: its row, and the digest of its file as found on disk now."""

    id: str
    call_id: str
    state: str
    plain_sha256: str | None
    cipher_sha256: str | None
    file_sha256: str | None  # None: no file (purged, or missing)


@dataclass
class RecordCheck:
    record_id: str
    call_id: str
    kind: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timestamped_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_record(
    record: StoredRecord,
    *,
    signing_keys: Mapping[str, Ed25519PublicKey],
    tsa_certificates: Sequence[x509.Certificate],
    body_digest: Callable[[StoredRecord], str],
    recordings: Mapping[str, RecordingFacts],
    records: Mapping[str, StoredRecord],
) -> RecordCheck:
    """Every check of one record; each failure named. ``body_digest`` decrypts the body and returns its SHA-256
    (raising MedhotlineError with the reason when it can't); ``recordings`` and ``records`` are what the
    database holds for the links."""
    result = RecordCheck(record.id, record.call_id, record.kind)
    problems = result.problems
    try:
        header = Header.parse(record.header)
    except RecordFormatError as exc:
        problems.append(f"header: {exc}")
        return result
    for what, in_header, in_row in (
        ("record id", header.record, record.id),
        ("call id", header.call, record.call_id),
        ("kind", header.kind, record.kind),
        ("amended record", header.amends, record.amends),
        ("signing key", header.signing_key, record.signing_key_id),
    ):
        if in_header != in_row:
            problems.append(f"header: the signed {what} differs from the row's (row altered)")
    if header.created_at != record.created_at:
        problems.append("header: the signed creation time differs from the row's (row altered)")
    public_key = signing_keys.get(header.signing_key)
    header_bytes = record.header.encode("utf-8")
    if public_key is None:
        problems.append(f"signature: signing key {header.signing_key} is not a trusted records key")
    elif not check_signature(header_bytes, record.signature, public_key):
        problems.append("signature: does not verify (the header or the signature was altered)")
    try:
        info = verify_token(record.timestamp_token, timestamp_imprint(header_bytes, record.signature), tsa_certificates)
        result.timestamped_at = info.gen_time
        if abs(info.gen_time - header.created_at) > MAX_TIMESTAMP_SKEW:
            problems.append(
                f"timestamp: the authority's time {format_time(info.gen_time)} is more than "
                f"{int(MAX_TIMESTAMP_SKEW.total_seconds() // 60)} minutes from the record's creation time"
            )
    except TimestampError as exc:
        problems.append(f"timestamp: {exc}")
    try:
        if body_digest(record) != header.body_sha256:
            problems.append("body: its SHA-256 differs from the signed one (the content was altered)")
    except MedhotlineError as exc:
        problems.append(f"body: {exc}")
    for covered in header.recordings:
        facts = recordings.get(covered.id)
        if facts is None:
            problems.append(f"recording {covered.id}: named by the record but not in the database")
            continue
        if facts.call_id != header.call:
            problems.append(f"recording {covered.id}: belongs to another call")
        if facts.plain_sha256 != covered.plain_sha256 or facts.cipher_sha256 != covered.cipher_sha256:
            problems.append(f"recording {covered.id}: the database's digests differ from the signed ones")
        if facts.state == "purged":
            result.notes.append(f"recording {covered.id}: purged after its retention; its signed digests remain")
        elif facts.file_sha256 is None:
            problems.append(f"recording {covered.id}: the encrypted file is missing")
        elif facts.file_sha256 != covered.cipher_sha256:
            problems.append(f"recording {covered.id}: the encrypted file's SHA-256 differs from the signed one")
    if header.amends is not None:
        original = records.get(header.amends)
        if original is None:
            problems.append(f"amends {header.amends}: no such record")
        elif original.call_id != header.call:
            problems.append(f"amends {header.amends}: a record of another call")
    return result
