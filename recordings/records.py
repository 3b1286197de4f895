"""Signed call records, with I/O: sealing (sign + timestamp + store) and verification against the database and
the recordings store. The format and the checks themselves are in :mod:`recordings.signed`.

Sealing happens in the service: the call summary at the end of the wrap-up (with the agent's note when it was
written by then), a consent as soon as its recording is stored. A note written after the summary was sealed
becomes an *amendment*: a new signed record naming the summary; the summary itself is never changed (the table
is append-only in the database).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit import AuditLog, JsonValue
from compliance.data_keys import DataKeyRing, DataKeyStore, KeyServicePort
from compliance.keyservice_client import TrustAnchors
from compliance.timestamps import HttpTimestampClient, TimestampError, make_request, token_from_response, verify_token
from ground.canonical import canonical_json
from ground.config import Config
from ground.db import CallRepository, DatabaseError, Repository
from ground.errors import MedhotlineError
from ground.logs import get_logger
from recordings.envelope import sha256_file
from recordings.signed import (
    SIGNING_PURPOSE,
    CoveredRecording,
    Header,
    RecordCheck,
    RecordingFacts,
    StoredRecord,
    check_record,
    format_time,
    key_id,
    timestamp_imprint,
)
from recordings.store import RecordingRow
from recordings.tables import CallNote, Recording, SignedCallRecord

log = get_logger(__name__)

DATA_KEY_PURPOSE: Final = "call_records"
TABLE: Final = "call_records"
MAX_NOTE_CHARS: Final = 20_000


class RecordsError(MedhotlineError):
    pass


class SigningPort(Protocol):
    """The key service's records operations (``KeyServiceClient`` satisfies it)."""

    async def sign(self, message: bytes, purpose: str) -> bytes: ...

    async def trust_anchors(self) -> TrustAnchors: ...

    async def timestamp(self, request_der: bytes) -> bytes: ...


class Timestamper(Protocol):
    async def stamp(self, digest: bytes) -> bytes: ...


class KeyServiceTimestamper:
    """The embedded default: the local RFC 3161 authority inside the key service."""

    def __init__(self, keys: SigningPort) -> None:
        self._keys = keys

    async def stamp(self, digest: bytes) -> bytes:
        request = make_request(digest, nonce=secrets.randbits(63))
        return token_from_response(await self._keys.timestamp(request), request)


def _stored(row: SignedCallRecord) -> StoredRecord:
    return StoredRecord(
        id=row.id,
        call_id=row.call_id,
        kind=row.kind,
        amends=row.amends,
        created_at=row.created_at,
        header=row.header,
        signature=row.signature,
        signing_key_id=row.signing_key_id,
        timestamp_token=row.timestamp_token,
        timestamped_at=row.timestamped_at,
    )


@dataclass(frozen=True, slots=True)
class SealedRecord:
    id: str
    call_id: str
    kind: str
    timestamped_at: datetime


class CallRecordStore(Repository):
    def add(self, row: SignedCallRecord, *, note_of: str | None = None) -> None:
        with self._transaction(f"storing signed record {row.id} of call {row.call_id}") as session:
            session.add(row)
            session.flush()
            if note_of is not None:
                session.execute(
                    update(CallNote).where(CallNote.call_id == note_of, CallNote.sealed_in.is_(None))
                    .values(sealed_in=row.id)
                )  # fmt: skip

    def for_call(self, call_id: str) -> list[StoredRecord]:
        with self._transaction(f"reading the signed records of call {call_id}") as session:
            rows = session.scalars(
                select(SignedCallRecord)
                .where(SignedCallRecord.call_id == call_id)
                .order_by(SignedCallRecord.created_at)
            ).all()
            return [_stored(r) for r in rows]

    def all(self) -> list[StoredRecord]:
        with self._transaction("reading all signed records") as session:
            rows = session.scalars(select(SignedCallRecord).order_by(SignedCallRecord.created_at)).all()
            return [_stored(r) for r in rows]

    def get(self, record_id: str) -> StoredRecord | None:
        with self._transaction(f"reading signed record {record_id}") as session:
            row = session.get(SignedCallRecord, record_id)
            return _stored(row) if row is not None else None

    def body(self, record_id: str) -> tuple[str, int]:
        with self._transaction(f"reading the body of record {record_id}") as session:
            row = session.get(SignedCallRecord, record_id)
            if row is None:
                raise RecordsError(f"no signed record {record_id}")
            return row.body_token, row.data_key_id

    def summary_of(self, call_id: str) -> StoredRecord | None:
        with self._transaction(f"reading the summary of call {call_id}") as session:
            row = session.scalars(
                select(SignedCallRecord).where(
                    SignedCallRecord.call_id == call_id, SignedCallRecord.kind == "call_summary"
                )
            ).first()
            return _stored(row) if row is not None else None

    def pending_note(self, call_id: str) -> tuple[str, str, datetime, str, int] | None:
        """(call id, author, written at, note token, data key id) of a note not yet sealed."""
        with self._transaction(f"reading the note of call {call_id}") as session:
            note = session.get(CallNote, call_id)
            if note is None or note.sealed_in is not None:
                return None
            return note.call_id, note.author, note.written_at, note.note_token, note.data_key_id

    def note_times(self, call_ids: Sequence[str]) -> list[tuple[str, str, datetime]]:
        """(call id, author, written at) of the calls' notes, never their text: the statistics' wrap-up times."""
        found: list[tuple[str, str, datetime]] = []
        with self._transaction("reading the times of call notes") as session:
            for i in range(0, len(call_ids), 500):  # bound parameters per statement stay far below the limits
                query = select(CallNote.call_id, CallNote.author, CallNote.written_at).where(
                    CallNote.call_id.in_(list(call_ids[i : i + 500]))
                )
                found.extend((call_id, author, at) for call_id, author, at in session.execute(query))
        return found

    def stage_note(self, call_id: str, author: str, at: datetime, token: str, data_key_id: int) -> bool:
        """Keep a note until the summary is sealed; False if the call already has a (staged or sealed) note."""
        with self._transaction(f"staging the note of call {call_id}") as session:
            if session.get(CallNote, call_id) is not None:
                return False
            session.add(
                CallNote(call_id=call_id, author=author, written_at=at, note_token=token, data_key_id=data_key_id)
            )
            return True

    def recording_facts(self, ids: Sequence[str], store_dir: Path) -> dict[str, RecordingFacts]:
        with self._transaction("reading recordings for verification") as session:
            rows = session.scalars(select(Recording).where(Recording.id.in_(list(ids)))).all()
            facts = {}
            for r in rows:
                path = store_dir / r.path if r.path else None
                file_sha = sha256_file(path) if path is not None and path.exists() else None
                facts[r.id] = RecordingFacts(r.id, r.call_id, r.state, r.plain_sha256, r.cipher_sha256, file_sha)
            return facts

    def call_ids(self) -> list[str]:
        with self._transaction("listing calls with signed records") as session:
            return list(session.scalars(select(SignedCallRecord.call_id).distinct()).all())


class RecordSealer:
    """Makes signed, timestamped records (see the module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        signer: SigningPort,
        timestamper: Timestamper,
        ring: DataKeyRing,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._records = CallRecordStore(sessions)
        self._calls = CallRepository(sessions)
        self._signer = signer
        self._timestamper = timestamper
        self._ring = ring
        self._audit = audit
        self._clock = clock or (lambda: datetime.now(UTC))
        self._signing_key_id: str | None = None

    @property
    def records(self) -> CallRecordStore:
        return self._records

    async def seal(
        self,
        call_id: str,
        kind: str,
        body: dict[str, Any],
        *,
        recordings: Sequence[RecordingRow] = (),
        agent: str | None = None,
        amends: str | None = None,
        note_of: str | None = None,
        actor: str = "medhotline",
        role: str = "system",
    ) -> SealedRecord:
        unstored = [r.id for r in recordings if r.state != "stored"]
        if unstored:
            raise RecordsError(
                f"call {call_id}: recordings {', '.join(unstored)} are not stored yet; seal after ingest"
            )
        if self._signing_key_id is None:
            anchors = await self._signer.trust_anchors()
            self._signing_key_id = key_id(anchors.signing_key)
        record_id = str(uuid.uuid4())
        body_bytes = canonical_json(body)
        created = self._clock()
        header = Header(
            record=record_id,
            call=call_id,
            kind=kind,
            amends=amends,
            created_at=created,
            body_sha256=hashlib.sha256(body_bytes).hexdigest(),
            recordings=tuple(CoveredRecording(r.id, r.plain_sha256 or "", r.cipher_sha256 or "") for r in recordings),
            agent=agent,
            signing_key=self._signing_key_id,
        )
        header_bytes = header.canonical()
        signature = await self._signer.sign(header_bytes, SIGNING_PURPOSE)
        try:
            token = await self._timestamper.stamp(timestamp_imprint(header_bytes, signature))
        except TimestampError as exc:
            raise RecordsError(f"call {call_id}: the {kind} record could not be timestamped: {exc}") from None
        key = await self._ring.current_key(DATA_KEY_PURPOSE)
        async with self._ring.cipher([key]) as cipher:
            body_token = cipher.encrypt_bytes(body_bytes, table=TABLE, column="body", row_id=record_id)
        anchors = await self._signer.trust_anchors()
        certificate = x509.load_pem_x509_certificate(anchors.tsa_certificate_pem)
        stamped_at = _token_time(token, timestamp_imprint(header_bytes, signature), certificate)
        row = SignedCallRecord(
            id=record_id,
            call_id=call_id,
            kind=kind,
            amends=amends,
            created_at=created,
            header=header_bytes.decode("utf-8"),
            signature=signature,
            signing_key_id=self._signing_key_id,
            timestamp_token=token,
            timestamped_at=stamped_at or created,
            body_token=body_token,
            data_key_id=key.id,
        )
        await asyncio.to_thread(self._records.add, row, note_of=note_of)
        if self._audit is not None:
            details: dict[str, JsonValue] = {"record": record_id, "call": call_id, "kind": kind}
            if amends is not None:
                details["amends"] = amends
            await asyncio.to_thread(
                self._audit.append, actor=actor, role=role, action="sign", outcome="success", details=details
            )
        log.info("record.sealed", record_id=record_id, kind=kind, recordings=len(recordings))
        return SealedRecord(record_id, call_id, kind, stamped_at or created)

    # --- the kinds of record ---------------------------------------------------------------------------------

    async def seal_call_summary(self, call_id: str, recordings: Sequence[RecordingRow]) -> SealedRecord | None:
        """The call's summary (category, keywords, routing path, agent, times, recording hashes, the note if
        written); once per call. None when it exists already."""
        if await asyncio.to_thread(self._records.summary_of, call_id) is not None:
            return None
        call = await asyncio.to_thread(self._calls.get, call_id)
        if call is None:
            raise RecordsError(f"no call {call_id}")
        steps = await asyncio.to_thread(self._calls.steps, call_id)
        agent = next((s.edge for s in steps if s.flow == "queue" and s.node == "answered"), None)
        note = await self._pending_note(call_id)
        body: dict[str, Any] = {
            "call": call_id,
            "flow": call.flow,
            "flow_version": call.flow_version,
            "category": call.route_category,
            "priority": call.route_priority,
            "outcome": call.outcome,
            "started_at": format_time(call.started_at),
            "answered_at": format_time(call.answered_at) if call.answered_at else None,
            "ended_at": format_time(call.ended_at) if call.ended_at else None,
            "keywords": [s.input for s in steps if s.node_type == "listen" and s.input],
            "path": [
                {"flow": s.flow, "node": s.node, "type": s.node_type, "edge": s.edge, "at": format_time(s.at)}
                for s in steps
            ],
            "agent": agent,
            "note": note[1] if note else None,
            "note_author": note[0] if note else None,
        }
        try:
            sealed = await self.seal(
                call_id, "call_summary", body, recordings=recordings, agent=agent, note_of=call_id if note else None
            )
        except DatabaseError:
            # Sealed concurrently (the wrap-up timer and a resumed seal): the database keeps one summary per
            # call (a unique index), and the loser's record, never stored, is simply dropped.
            if await asyncio.to_thread(self._records.summary_of, call_id) is not None:
                log.info("record.summary_sealed_elsewhere", call_id=call_id)
                return None
            raise
        if note is None:
            # A note staged after it was read above (while this summary was being signed) is not in it: it
            # becomes an amendment now rather than wait unsealed for ever (see add_note for the other side).
            await self._amend_with_pending_note(call_id, sealed.id)
        return sealed

    async def seal_consent(self, call_id: str, consent: dict[str, Any], recording: RecordingRow | None) -> SealedRecord:
        return await self.seal(call_id, "consent", consent, recordings=[recording] if recording else [])

    async def add_note(self, call_id: str, author: str, text: str) -> tuple[str, str]:
        """The agent's note: staged for the summary if not sealed yet, else signed as an amendment of it.
        Returns ("staged", call id) or ("amendment", record id)."""
        text = text.strip()
        if not text or len(text) > MAX_NOTE_CHARS:
            raise RecordsError(f"a call note must hold 1 to {MAX_NOTE_CHARS} characters")
        if await asyncio.to_thread(self._calls.get, call_id) is None:
            raise RecordsError(f"no call {call_id}")
        summary = await asyncio.to_thread(self._records.summary_of, call_id)
        if summary is None:
            key = await self._ring.current_key(DATA_KEY_PURPOSE)
            async with self._ring.cipher([key]) as cipher:
                token = cipher.encrypt(text, table="call_notes", column="note", row_id=call_id)
            staged = await asyncio.to_thread(self._records.stage_note, call_id, author, self._clock(), token, key.id)
            if staged:
                # The summary may have been sealed between the look above and the staging, without this note:
                # then it is amended now (seal_call_summary does the same from its side, so either sees it).
                sealed_meanwhile = await asyncio.to_thread(self._records.summary_of, call_id)
                if sealed_meanwhile is not None:
                    amendment = await self._amend_with_pending_note(call_id, sealed_meanwhile.id)
                    if amendment is not None:
                        return "amendment", amendment
                return "staged", call_id
        original = summary or await asyncio.to_thread(self._records.summary_of, call_id)
        if original is None:
            raise RecordsError(f"call {call_id} already has a note waiting for its summary; amend after the seal")
        return "amendment", await self._amend(call_id, original.id, author, text, note_of=None)

    async def _amend(self, call_id: str, original_id: str, author: str, text: str, *, note_of: str | None) -> str:
        body = {"call": call_id, "amends": original_id, "note": text, "note_author": author}
        sealed = await self.seal(
            call_id, "amendment", body, amends=original_id, agent=author, actor=author, role="agent", note_of=note_of
        )
        return sealed.id

    async def _amend_with_pending_note(self, call_id: str, summary_id: str) -> str | None:
        """Seal a note still waiting although the summary exists as an amendment of it; its id, or None."""
        note = await self._pending_note(call_id)
        if note is None:
            return None
        author, text = note
        log.info("record.note_after_summary", call_id=call_id)
        return await self._amend(call_id, summary_id, author, text, note_of=call_id)

    async def _pending_note(self, call_id: str) -> tuple[str, str] | None:
        pending = await asyncio.to_thread(self._records.pending_note, call_id)
        if pending is None:
            return None
        _, author, _, token, data_key_id = pending
        keys = await self._ring.keys([data_key_id])
        async with self._ring.cipher(keys) as cipher:
            return author, cipher.decrypt(token, table="call_notes", column="note", row_id=call_id)

    async def body(self, record: StoredRecord) -> bytes:
        token, data_key_id = await asyncio.to_thread(self._records.body, record.id)
        keys = await self._ring.keys([data_key_id])
        async with self._ring.cipher(keys) as cipher:
            return cipher.decrypt_bytes(token, table=TABLE, column="body", row_id=record.id)


def _token_time(token: bytes, imprint: bytes, certificate: x509.Certificate) -> datetime | None:
    try:
        return verify_token(token, imprint, [certificate]).gen_time
    except TimestampError:
        return None  # an external TSA: its anchors are checked by `records verify`


# --- verification --------------------------------------------------------------------------------------------


async def verify_records(
    sealer: RecordSealer,
    signer: SigningPort,
    store_dir: Path,
    *,
    call_id: str | None = None,
    extra_tsa_certificates: Sequence[x509.Certificate] = (),
) -> list[RecordCheck]:
    """Check the records of one call (or all): signatures, timestamps, body digests, recordings, links."""
    anchors = await signer.trust_anchors()
    signing_keys: dict[str, Ed25519PublicKey] = {
        key_id(anchors.signing_key): Ed25519PublicKey.from_public_bytes(anchors.signing_key)
    }
    tsa = [x509.load_pem_x509_certificate(anchors.tsa_certificate_pem), *extra_tsa_certificates]
    store = sealer.records
    if call_id is not None:
        records = await asyncio.to_thread(store.for_call, call_id)
    else:
        records = await asyncio.to_thread(store.all)
    by_id = {r.id: r for r in records}
    covered_ids = sorted({c.id for r in records for c in _covered(r)})
    facts = await asyncio.to_thread(store.recording_facts, covered_ids, store_dir)
    digests: dict[str, str] = {}
    failures: dict[str, str] = {}
    for record in records:
        try:
            digests[record.id] = hashlib.sha256(await sealer.body(record)).hexdigest()
        except MedhotlineError as exc:
            failures[record.id] = f"the encrypted body does not decrypt: {exc}"

    def body_digest(record: StoredRecord) -> str:
        if record.id in failures:
            raise RecordsError(failures[record.id])
        return digests[record.id]

    checks = []
    for record in records:
        missing_links = [by_id.get(record.amends)] if record.amends else []
        known = by_id | {r.id: r for r in missing_links if r is not None}
        if record.amends and record.amends not in known:
            original = await asyncio.to_thread(store.get, record.amends)
            if original is not None:
                known[original.id] = original
        checks.append(
            check_record(
                record,
                signing_keys=signing_keys,
                tsa_certificates=tsa,
                body_digest=body_digest,
                recordings=facts,
                records=known,
            )
        )
    return checks


def _covered(record: StoredRecord) -> tuple[CoveredRecording, ...]:
    try:
        return Header.parse(record.header).recordings
    except MedhotlineError:
        return ()


def open_sealer(
    config: Config, sessions: sessionmaker[Session], keys: SigningPort, audit: AuditLog | None
) -> RecordSealer:
    """The sealer the configuration asks for: the key service signs; the local authority inside it timestamps,
    or the external TSA at ``recordings.tsa_url``."""

    timestamper: Timestamper
    if config.recordings.tsa_url:
        timestamper = HttpTimestampClient(config.recordings.tsa_url)
    else:
        timestamper = KeyServiceTimestamper(keys)
    ring = DataKeyRing(DataKeyStore(sessions), cast(KeyServicePort, keys), audit=audit)
    return RecordSealer(sessions, keys, timestamper, ring, audit=audit)


def configured_tsa_certificates(config: Config) -> list[x509.Certificate]:
    """The external TSA's issuing certificates from ``recordings.tsa_certificates`` (errors name the file)."""
    certificates = []
    for path in config.recordings.tsa_certificates:
        try:
            certificates.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise RecordsError(f"{path}: not a readable PEM certificate file ({exc})") from None
    return certificates
