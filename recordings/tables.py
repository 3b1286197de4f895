"""The recordings and signed call records tables (created by migration ``0008_recordings``).

``recordings`` holds one row per captured audio file: where it is in its life (capturing → finished → stored →
purged, or missing), the data key that encrypts it (wrapped by the key service, never in clear), the digests of
plaintext and ciphertext, and the retention it falls under. The file itself lives in the recordings store
directory, encrypted; a purged recording keeps its row (a tombstone with its digests) so the signed call
records that name its hash can still be explained.

``call_records`` holds the signed records: the call summary sealed at wrap-up, consents given in the IVR, and
amendments. The signed *header* (no patient data) and the encrypted *body* are kept apart so integrity can be
checked by anyone holding the public keys, and the content only by whoever may decrypt it. The table is
append-only: the database refuses UPDATE and DELETE, so an archived record can only be amended by a new one.

``call_notes`` holds an agent's note between the end of the conversation and the sealing of the summary
(encrypted); a note written after the seal becomes a signed amendment instead.

No column holds a patient identifier in clear: patients are named by the registry's opaque id only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from ground.models import Base, UTCDateTime

RecordingState = Literal["capturing", "finished", "stored", "purged", "missing"]
RECORDING_STATES: Final[tuple[RecordingState, ...]] = ("capturing", "finished", "stored", "purged", "missing")
RecordingKind = Literal["conversation", "ivr", "consent"]
RECORDING_KINDS: Final[tuple[RecordingKind, ...]] = ("conversation", "ivr", "consent")
RecordKind = Literal["call_summary", "consent", "amendment"]
RECORD_KINDS: Final[tuple[RecordKind, ...]] = ("call_summary", "consent", "amendment")


class Recording(Base):
    __tablename__ = "recordings"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("calls.id"))
    # The file name Asterisk writes (<name>.wav in its recording spool); unique so a retry never records twice.
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="capturing")
    # The registry's opaque patient id when the caller was identified; the department owning the record.
    patient_id: Mapped[str | None] = mapped_column(String(128))
    department: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The recording's own data key, wrapped by the key service for "recording:<id>"; set before sealing starts,
    # so an ingest resumed after a crash reuses the key it may already have written a file under.
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    kek_version: Mapped[int | None] = mapped_column(Integer)
    plain_sha256: Mapped[str | None] = mapped_column(String(64))
    cipher_sha256: Mapped[str | None] = mapped_column(String(64))
    plain_size: Mapped[int | None] = mapped_column(BigInteger)
    cipher_size: Mapped[int | None] = mapped_column(BigInteger)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    # Relative to the recordings store directory.
    path: Mapped[str | None] = mapped_column(String(255))
    stored_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    spool_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    retention_class: Mapped[str | None] = mapped_column(String(16))
    retain_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    hold_reason: Mapped[str | None] = mapped_column(String(500))
    hold_by: Mapped[str | None] = mapped_column(String(64))
    held_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purged_by: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("state IN ('capturing', 'finished', 'stored', 'purged', 'missing')", name="state"),
        CheckConstraint("kind IN ('conversation', 'ivr', 'consent')", name="kind"),
        CheckConstraint(
            "state <> 'stored' OR (cipher_sha256 IS NOT NULL AND plain_sha256 IS NOT NULL AND path IS NOT NULL "
            "AND retain_until IS NOT NULL AND wrapped_key IS NOT NULL)",
            name="stored_complete",
        ),
        CheckConstraint("NOT legal_hold OR hold_reason IS NOT NULL", name="hold_has_reason"),
        Index("ix_recordings_call_id", "call_id"),
        Index("ix_recordings_state", "state"),
        Index("ix_recordings_retain_until", "retain_until"),
    )


class SignedCallRecord(Base):
    __tablename__ = "call_records"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("calls.id"))
    kind: Mapped[str] = mapped_column(String(16))
    # An amendment names the record it amends; the original stays as it was signed.
    amends: Mapped[str | None] = mapped_column(String(36), ForeignKey("call_records.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The canonical JSON that was signed (ids, times, digests; no patient data, no note text).
    header: Mapped[str] = mapped_column(Text)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    signing_key_id: Mapped[str] = mapped_column(String(64))
    # RFC 3161 TimeStampToken (DER) over SHA-256(header || signature).
    timestamp_token: Mapped[bytes] = mapped_column(LargeBinary)
    timestamped_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The body (summary, note, consent text) as canonical JSON, encrypted with the "call_records" data key.
    body_token: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))

    __table_args__ = (
        CheckConstraint("kind IN ('call_summary', 'consent', 'amendment')", name="kind"),
        CheckConstraint("kind <> 'amendment' OR amends IS NOT NULL", name="amendment_names_original"),
        Index("ix_call_records_call_id", "call_id"),
        Index("ix_call_records_amends", "amends"),
        # One summary per call, whoever seals it.
        Index(
            "uq_call_records_one_summary",
            "call_id",
            unique=True,
            sqlite_where=text("kind = 'call_summary'"),
            postgresql_where=text("kind = 'call_summary'"),
        ),
    )


class CallNote(Base):
    __tablename__ = "call_notes"

    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("calls.id"), primary_key=True)
    author: Mapped[str] = mapped_column(String(64))
    written_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The note, encrypted with the "call_records" data key (AAD binds table, column and call id).
    note_token: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))
    # The summary record the note went into; NULL while the note waits for the seal.
    sealed_in: Mapped[str | None] = mapped_column(String(36), ForeignKey("call_records.id"))
