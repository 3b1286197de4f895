"""Database schema, declared once with SQLAlchemy 2 typed mappings.

The schema itself is created and changed only by the Alembic migrations in ``ground/migrations``; these
classes describe it for the repositories. Patient identifiers (caller number, name, record number) are never
stored in clear: there is deliberately no caller number column here; the patient registry (``his/tables.py``)
holds them as field-encrypted tokens with a keyed blind index for phone lookups.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# A fixed naming convention gives every constraint and index a deterministic name, so migrations written on
# SQLite and PostgreSQL can refer to (and later drop or alter) the same constraint by name.
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# ``node_lost``: the node that held the call stopped renewing its lease; another node closed the record
# (``ground.leases``), with the time it did so.
CallOutcome = Literal[
    "in_progress", "completed", "routed", "transferred", "caller_hangup", "connection_lost", "error", "node_lost"
]
CALL_OUTCOMES: Final[tuple[CallOutcome, ...]] = (
    "in_progress",
    "completed",
    "routed",
    "transferred",
    "caller_hangup",
    "connection_lost",
    "error",
    "node_lost",
)
Transport = Literal["ari", "fastagi"]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored and returned in UTC on every backend.

    SQLite has no timezone-aware type and gives back naive values; PostgreSQL gives them back in the session's
    time zone. Normalising here means callers always get aware UTC datetimes, and a naive datetime (whose
    meaning depends on the host's clock settings) is refused instead of stored ambiguously.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: pass a timezone-aware datetime")
        utc = value.astimezone(UTC)
        # SQLite stores the text without an offset; it is UTC by construction.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base for every table; carries the shared naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Call(Base):
    """One inbound or outbound call as seen by one service node.

    ``id`` is the ``call_id`` bound into every log line of the call, so a log line and its row can be joined
    without storing anything identifying about the caller.
    """

    __tablename__ = "calls"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(16))
    # Asterisk's channel id (ARI) or uniqueid (AGI), to correlate with Asterisk's own logs and CDRs.
    channel_id: Mapped[str] = mapped_column(String(64))
    channel_name: Mapped[str] = mapped_column(String(128))
    flow: Mapped[str] = mapped_column(String(64))
    flow_version: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(32), default="in_progress", server_default="in_progress")
    # Where in the flow the call was when it ended, to find the step callers hang up on.
    last_step: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    # How the IVR part ended: the consult category and priority handed to routing, or the transfer target.
    route_category: Mapped[str | None] = mapped_column(String(32))
    route_priority: Mapped[str | None] = mapped_column(String(16))
    transfer_to: Mapped[str | None] = mapped_column(String(32))
    # Triage of what the caller said (docs/triage.md), never the words: the level, how sure the classifier was,
    # the discriminator that fired; whether "是否需要急救" was asked and the answer (key, speech, declined,
    # no_input). ``upgraded_*``: the agent who upgraded the call to emergency during the conversation, and when.
    triage_level: Mapped[str | None] = mapped_column(String(16))
    triage_confidence: Mapped[float | None] = mapped_column(Float)
    triage_discriminator: Mapped[str | None] = mapped_column(String(64))
    triage_confirm_asked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    triage_confirm_answer: Mapped[str | None] = mapped_column(String(16))
    upgraded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    upgraded_by: Mapped[str | None] = mapped_column(String(64))
    # Did the caller's listen nodes get a recognizer: "admitted", or "refused" when the node's budget of concurrent
    # recognitions was spent (or the speech engine full) and the caller got the key menu at once. NULL: no listen
    # node with speech was reached.
    speech_admission: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        # The database refuses values the code does not know, whichever node or tool wrote them.
        CheckConstraint(
            "outcome IN ('in_progress', 'completed', 'routed', 'transferred', 'caller_hangup', 'connection_lost', "
            "'error', 'node_lost')",
            name="outcome",
        ),
        CheckConstraint("transport IN ('ari', 'fastagi')", name="transport"),
        CheckConstraint(
            "triage_level IS NULL OR triage_level IN ('emergency', 'urgent', 'routine')", name="triage_level"
        ),
        CheckConstraint(
            "triage_confidence IS NULL OR (triage_confidence >= 0 AND triage_confidence <= 1)", name="triage_confidence"
        ),
        CheckConstraint(
            "triage_confirm_answer IS NULL OR "
            "(triage_confirm_asked AND triage_confirm_answer IN ('key', 'speech', 'declined', 'no_input'))",
            name="triage_confirm_answer",
        ),
        CheckConstraint("(upgraded_at IS NULL) = (upgraded_by IS NULL)", name="upgraded"),
        CheckConstraint(
            "speech_admission IS NULL OR speech_admission IN ('admitted', 'refused')", name="speech_admission"
        ),
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_channel_id", "channel_id"),
    )


class CallStep(Base):
    """One node a call visited, in order, with the edge taken and the input that chose it."""

    __tablename__ = "call_steps"

    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("calls.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    flow: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(64))
    node_type: Mapped[str] = mapped_column(String(32))
    edge: Mapped[str | None] = mapped_column(String(64))
    input: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())

    # The statistics find the calls that joined the queue in a window by their ``queued`` step (0014_stats).
    __table_args__ = (Index("ix_call_steps_node_at", "node", "at"),)
