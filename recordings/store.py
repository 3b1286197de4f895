"""The ``recordings`` table: one short transaction per state change of a recording's life.

Each transition is a conditional UPDATE (``WHERE state = <expected>``), so two nodes resuming the same ingest,
or a purge racing a legal hold, can't both win: the loser sees ``False`` and re-reads. The database's triggers
(migration ``0008_recordings``) refuse what must never happen whatever this code does: deleting a row, rewriting
a stored recording's key or digests, purging before the retention date or under hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update

from ground.db import Repository, rowcount
from ground.errors import MedhotlineError
from recordings.envelope import SealedFile
from recordings.tables import RECORDING_KINDS, Recording


class RecordingNotFound(MedhotlineError):
    pass


@dataclass(frozen=True, slots=True)
class RecordingRow:
    id: str
    call_id: str
    name: str
    kind: str
    state: str
    patient_id: str | None
    department: str | None
    started_at: datetime
    ended_at: datetime | None
    wrapped_key: bytes | None
    kek_version: int | None
    plain_sha256: str | None
    cipher_sha256: str | None
    plain_size: int | None
    cipher_size: int | None
    duration_seconds: float | None
    path: str | None
    stored_at: datetime | None
    spool_removed_at: datetime | None
    retention_class: str | None
    retain_until: datetime | None
    legal_hold: bool
    hold_reason: str | None
    hold_by: str | None
    purged_at: datetime | None
    purged_by: str | None
    error: str | None

    @property
    def context(self) -> bytes:
        """The associated data binding the encrypted file to this row: a file copied over another recording's
        fails to decrypt instead of playing the wrong call."""
        return f"medhotline-recording|{self.id}".encode("ascii")

    @property
    def key_purpose(self) -> str:
        """What the key service binds this recording's wrapped data key to."""
        return f"recording:{self.id}"


def _row(r: Recording) -> RecordingRow:
    return RecordingRow(
        id=r.id,
        call_id=r.call_id,
        name=r.name,
        kind=r.kind,
        state=r.state,
        patient_id=r.patient_id,
        department=r.department,
        started_at=r.started_at,
        ended_at=r.ended_at,
        wrapped_key=r.wrapped_key,
        kek_version=r.kek_version,
        plain_sha256=r.plain_sha256,
        cipher_sha256=r.cipher_sha256,
        plain_size=r.plain_size,
        cipher_size=r.cipher_size,
        duration_seconds=r.duration_seconds,
        path=r.path,
        stored_at=r.stored_at,
        spool_removed_at=r.spool_removed_at,
        retention_class=r.retention_class,
        retain_until=r.retain_until,
        legal_hold=r.legal_hold,
        hold_reason=r.hold_reason,
        hold_by=r.hold_by,
        purged_at=r.purged_at,
        purged_by=r.purged_by,
        error=r.error,
    )


def recording_name(call_id: str, kind: str, n: int) -> str:
    """The spool file name of a call's ``n``-th recording of ``kind`` (call ids are UUIDs: no patient data)."""
    return f"medhotline-{call_id}-{kind}-{n}"


class RecordingStore(Repository):
    # --- capture ---------------------------------------------------------------------------------------------

    def begin(
        self,
        call_id: str,
        kind: str,
        started_at: datetime,
        *,
        name: str | None = None,
        patient_id: str | None = None,
        department: str | None = None,
    ) -> RecordingRow:
        """Register a recording before Asterisk is asked to start it: a crash after the start leaves a row to
        resume from, never an unknown plaintext file in the spool."""
        if kind not in RECORDING_KINDS:
            raise MedhotlineError(f"unknown recording kind {kind!r}; kinds: {', '.join(RECORDING_KINDS)}")
        with self._transaction(f"registering a {kind} recording of call {call_id}") as session:
            if name is None:
                count = len(session.scalars(select(Recording.id).where(Recording.call_id == call_id)).all())
                name = recording_name(call_id, kind, count + 1)
            row = Recording(
                id=str(uuid.uuid4()),
                call_id=call_id,
                name=name,
                kind=kind,
                state="capturing",
                patient_id=patient_id,
                department=department,
                started_at=started_at,
                legal_hold=False,
            )
            session.add(row)
            session.flush()
            return _row(row)

    def finish(self, recording_id: str, ended_at: datetime) -> bool:
        """Asterisk has stopped writing: the file may be ingested. False if it was not capturing."""
        with self._transaction(f"finishing recording {recording_id}") as session:
            result = session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.state == "capturing")
                .values(state="finished", ended_at=ended_at)
            )
            return bool(rowcount(result))

    def set_patient(self, call_id: str, patient_id: str | None, department: str | None) -> None:
        """The IVR identified the caller after the recording began: its recordings belong to that patient."""
        with self._transaction(f"linking the recordings of call {call_id} to their patient") as session:
            session.execute(
                update(Recording)
                .where(Recording.call_id == call_id, Recording.patient_id.is_(None))
                .values(patient_id=patient_id, department=department)
            )

    # --- ingest ----------------------------------------------------------------------------------------------

    def claim_key(self, recording_id: str, wrapped: bytes, kek_version: int) -> RecordingRow:
        """Store the recording's wrapped data key unless one is there already; returns the row as it now is (a
        resumed ingest keeps using the first key, under which a file may already exist)."""
        with self._transaction(f"storing the data key of recording {recording_id}") as session:
            session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.wrapped_key.is_(None))
                .values(wrapped_key=wrapped, kek_version=kek_version)
            )
            row = session.get(Recording, recording_id)
            if row is None:
                raise RecordingNotFound(f"no recording {recording_id}")
            return _row(row)

    def mark_stored(
        self,
        recording_id: str,
        sealed: SealedFile,
        *,
        path: str,
        duration_seconds: float | None,
        retention_class: str,
        retain_until: datetime,
        at: datetime,
    ) -> bool:
        with self._transaction(f"recording {recording_id} as stored") as session:
            result = session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.state.in_(("capturing", "finished")))
                .values(
                    state="stored",
                    plain_sha256=sealed.plain_sha256,
                    cipher_sha256=sealed.cipher_sha256,
                    plain_size=sealed.plain_size,
                    cipher_size=sealed.cipher_size,
                    duration_seconds=duration_seconds,
                    path=path,
                    stored_at=at,
                    # The end Asterisk reported stays; a recording stored straight from capture ends now.
                    ended_at=func.coalesce(Recording.ended_at, at),
                    retention_class=retention_class,
                    retain_until=retain_until,
                )
            )
            return bool(rowcount(result))

    def mark_spool_removed(self, recording_id: str, at: datetime) -> bool:
        """Note when the plaintext left the spool; True only for the first to note it (who audits the ingest)."""
        with self._transaction(f"recording {recording_id}'s spool file as removed") as session:
            result = session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.spool_removed_at.is_(None))
                .values(spool_removed_at=at)
            )
            return bool(rowcount(result))

    def mark_missing(self, recording_id: str, error: str, at: datetime) -> None:
        with self._transaction(f"recording {recording_id} as missing") as session:
            session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.state.in_(("capturing", "finished")))
                .values(state="missing", error=error[:2000], ended_at=at)
            )

    def pending(self) -> list[RecordingRow]:
        """Recordings whose ingest is not complete: not yet stored, or stored with plaintext left in the spool."""
        with self._transaction("listing unfinished ingests") as session:
            rows = session.scalars(
                select(Recording)
                .where(
                    or_(
                        Recording.state.in_(("capturing", "finished")),
                        (Recording.state == "stored") & Recording.spool_removed_at.is_(None),
                    )
                )
                .order_by(Recording.started_at)
            ).all()
            return [_row(r) for r in rows]

    # --- reading ---------------------------------------------------------------------------------------------

    def get(self, recording_id: str) -> RecordingRow:
        with self._transaction(f"reading recording {recording_id}") as session:
            row = session.get(Recording, recording_id)
            if row is None:
                raise RecordingNotFound(f"no recording {recording_id}")
            return _row(row)

    def for_call(self, call_id: str) -> list[RecordingRow]:
        with self._transaction(f"reading the recordings of call {call_id}") as session:
            rows = session.scalars(
                select(Recording).where(Recording.call_id == call_id).order_by(Recording.started_at, Recording.name)
            ).all()
            return [_row(r) for r in rows]

    def recent(self, *, call_id: str | None = None, state: str | None = None, limit: int = 50) -> list[RecordingRow]:
        with self._transaction("listing recordings") as session:
            query = select(Recording).order_by(Recording.started_at.desc()).limit(limit)
            if call_id is not None:
                query = query.where(Recording.call_id == call_id)
            if state is not None:
                query = query.where(Recording.state == state)
            return [_row(r) for r in session.scalars(query).all()]

    def expired(self, now: datetime) -> list[RecordingRow]:
        """Stored recordings past their retention date and not on hold: the only ones a purge may remove."""
        with self._transaction("listing expired recordings") as session:
            rows = session.scalars(
                select(Recording)
                .where(
                    Recording.state == "stored",
                    Recording.retain_until <= now,
                    Recording.legal_hold.is_(False),
                )
                .order_by(Recording.retain_until)
            ).all()
            return [_row(r) for r in rows]

    # --- retention and hold ----------------------------------------------------------------------------------

    def set_hold(self, recording_ids: Sequence[str], *, on: bool, reason: str, by: str, at: datetime) -> int:
        """Place (``on``) or lift a legal hold; returns how many recordings changed (already so: unchanged)."""
        if on and not reason.strip():
            # The database only asks for a non-NULL reason; an empty one would explain nothing later.
            raise MedhotlineError("a legal hold needs a reason (the case or request it is for)")
        with self._transaction("changing a legal hold") as session:
            values = (
                {"legal_hold": True, "hold_reason": reason, "hold_by": by, "held_at": at}
                if on
                else {"legal_hold": False, "hold_reason": None, "hold_by": None, "held_at": None}
            )
            result = session.execute(
                update(Recording).where(Recording.id.in_(list(recording_ids)), Recording.legal_hold.is_(not on))
                .values(**values)
            )  # fmt: skip
            return rowcount(result)

    def extend_retention(self, recording_id: str, retention_class: str, retain_until: datetime) -> bool:
        """Move a recording to a longer retention (e.g. the patient was admitted: inpatient). Never shorter."""
        with self._transaction(f"extending the retention of recording {recording_id}") as session:
            result = session.execute(
                update(Recording)
                .where(Recording.id == recording_id, Recording.state == "stored", Recording.retain_until < retain_until)
                .values(retention_class=retention_class, retain_until=retain_until)
            )
            return bool(rowcount(result))

    def mark_purged(self, recording_id: str, *, by: str, at: datetime) -> bool:
        """The tombstone: digests and metadata stay; the database refuses this before retention or under hold."""
        with self._transaction(f"purging recording {recording_id}") as session:
            result = session.execute(
                update(Recording)
                .where(
                    Recording.id == recording_id,
                    Recording.state == "stored",
                    Recording.legal_hold.is_(False),
                    Recording.retain_until <= at,
                )
                .values(state="purged", purged_at=at, purged_by=by)
            )
            return bool(rowcount(result))
