"""Tables of quality control (migration ``0019_quality``): one check per finished call, and the reviews.

``quality_checks`` holds the flags (rule ids, severities and reasons: no patient identifier) and whether the call is
in the review queue; ``quality_reviews`` points at the signed amendment that seals each score.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ground.models import Base, UTCDateTime


class QualityCheck(Base):
    __tablename__ = "quality_checks"

    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("calls.id"), primary_key=True)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The call's end (copied): `quality queue` and `check --since` order and select by it.
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # JSON list of {"rule", "severity", "why"}.
    flags: Mapped[str] = mapped_column(Text)
    worst: Mapped[str | None] = mapped_column(String(16))
    sampled: Mapped[bool] = mapped_column(Boolean)
    for_review: Mapped[bool] = mapped_column(Boolean)

    __table_args__ = (Index("ix_quality_checks_for_review", "for_review", "ended_at"),)


class QualityReview(Base):
    __tablename__ = "quality_reviews"

    call_id: Mapped[str] = mapped_column(String(36), ForeignKey("quality_checks.call_id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(64))
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The signed amendment (call_records.id) that seals the score.
    record_id: Mapped[str] = mapped_column(String(36), ForeignKey("call_records.id"))
