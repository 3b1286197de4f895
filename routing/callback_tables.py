"""Tables of callbacks and of the hotline's mode (normal or surge): migration ``0012_callbacks_surge``.

``callbacks``: one row per caller who chose to be called back. The number is stored only as an AES-256-GCM token
(``phone_enc``, associated data ``callbacks|phone_enc|<id>|<key version>``, under the ``callbacks`` data key the
row names) and as its keyed blind index (``phone_bidx``, the same index as ``patients.phone_bidx``). A partial
unique index on ``phone_bidx`` over the open states refuses a second open callback for one number, whichever
node or tool writes it. ``requested_at`` is the arrival time of the original call: the callback's place.

``hotline_modes``: every switch of the hotline's configuration, append-only; the newest row is in force on every
node. A surge row keeps the profile's text and the entry flow made from it; switching off copies the row that was
in force before the surge (``previous_id``), so the previous configuration comes back exactly.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal, get_args

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

import compliance.data_keys  # noqa: F401  (data_keys on Base.metadata for the foreign key)
from ground.models import Base, UTCDateTime

__all__ = ["CALLBACK_STATES", "OPEN_STATES", "CallbackRow", "CallbackState", "HotlineModeRow"]

CallbackState = Literal["pending", "dialling", "connected", "failed", "cancelled"]
CALLBACK_STATES: Final[tuple[CallbackState, ...]] = get_args(CallbackState)
# States in which a callback is still to be done: at most one such row per number.
OPEN_STATES: Final = ("pending", "dialling")
OPEN_CONDITION: Final = "state IN ('pending', 'dialling')"


class CallbackRow(Base):
    __tablename__ = "callbacks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # The call in which the caller asked for it (its record says "callback" in the path).
    call_id: Mapped[str] = mapped_column(String(36))
    # The node whose dispatcher orders it (each node orders its own queue; see docs/routing.md).
    node: Mapped[str] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    phone_enc: Mapped[str] = mapped_column(Text)
    phone_bidx: Mapped[str] = mapped_column(String(128))
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))
    # The patient the IVR identified, if any (an opaque id), for the task a failed callback becomes.
    patient_id: Mapped[str | None] = mapped_column(String(36))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The call id of the attempt being dialled, and the agent reserved for it.
    attempt_call_id: Mapped[str | None] = mapped_column(String(36))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    last_outcome: Mapped[str | None] = mapped_column(String(32))
    task_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'dialling', 'connected', 'failed', 'cancelled')", name="state"),
        CheckConstraint("priority IN ('normal', 'emergency')", name="priority"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index(
            "uq_callbacks_open_phone",
            "phone_bidx",
            unique=True,
            sqlite_where=text(OPEN_CONDITION),
            postgresql_where=text(OPEN_CONDITION),
        ),
        Index("ix_callbacks_node_state", "node", "state"),
    )


HotlineMode = Literal["normal", "surge"]


class HotlineModeRow(Base):
    __tablename__ = "hotline_modes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    mode: Mapped[str] = mapped_column(String(16))
    profile_name: Mapped[str | None] = mapped_column(String(64))
    # The profile YAML as given, and the entry flow made from it (YAML): what was in force, kept exactly.
    profile_text: Mapped[str | None] = mapped_column(Text)
    entry_flow: Mapped[str | None] = mapped_column(Text)
    # The row in force before this one (0 for the first switch). Unique: of two switches made at the same moment
    # from the same state, one fails instead of both claiming to have replaced it.
    replaces: Mapped[int] = mapped_column(Integer, unique=True)
    # Surge on: the row it suspended, which switching off restores. Surge off / normal: the row it restored.
    previous_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("hotline_modes.id"))
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(256))
    at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("mode IN ('normal', 'surge')", name="mode"),
        CheckConstraint(
            "(mode = 'normal' AND profile_text IS NULL AND entry_flow IS NULL) OR "
            "(mode = 'surge' AND profile_text IS NOT NULL AND entry_flow IS NOT NULL AND profile_name IS NOT NULL)",
            name="profile",
        ),
    )
