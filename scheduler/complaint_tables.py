"""The table of 12320 complaint tasks (migration ``0020_complaints``, docs/complaints.md).

No patient identifier in clear: the patient, if named, by the registry's pseudonymous id; the summary is checked
for number-like runs before it is stored (:func:`scheduler.complaint_core.check_summary`). Deadlines are not
stored: they follow from the times and the configured calendar, so a corrected holiday list corrects them all.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ground.models import Base, UTCDateTime


class ComplaintTask(Base):
    __tablename__ = "complaint_tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # The 12320 call the complaint came in on (our call id, or the 12320 platform's reference).
    call_id: Mapped[str] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(String(16))
    patient_id: Mapped[str | None] = mapped_column(String(128))
    summary: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    department: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    referred_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    survey_score: Mapped[int | None] = mapped_column(Integer)
    # The outbound survey call scheduled at resolution (outreach_attempts.id), if the patient can be called.
    survey_attempt_id: Mapped[str | None] = mapped_column(String(36))
    opened_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("state IN ('received', 'referred', 'resolved', 'answered')", name="state"),
        CheckConstraint("category IN ('attitude', 'quality', 'fees', 'access', 'ethics', 'other')", name="category"),
        CheckConstraint("survey_score IS NULL OR survey_score BETWEEN 1 AND 5", name="survey_score"),
        Index("ix_complaint_tasks_state", "state"),
    )
