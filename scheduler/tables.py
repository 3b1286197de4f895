"""Outreach tables (migration ``0009_outreach``): follow-up plans, outbound call attempts, readings, clinical
tasks, the do-not-call list, medication reminders and the notification outbox.

Patients are named by the registry's opaque id only. Phone numbers are never stored here: the dialer reads the
patient's number from the encrypted registry at dial time; the do-not-call list holds the number's keyed blind
index. Clinical values (readings, medication names, message bodies) are encrypted with their purpose's data key
(``outreach``); the associated data binds each token to its table, column and row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ground.models import Base, UTCDateTime

DATA_KEY_PURPOSE: Final = "outreach"

AttemptKind = Literal["followup", "medication", "vaccination_reminder", "adverse_followup", "complaint_survey"]
ATTEMPT_KINDS: Final[tuple[AttemptKind, ...]] = (
    "followup",
    "medication",
    "vaccination_reminder",
    "adverse_followup",
    "complaint_survey",
)
AttemptState = Literal["scheduled", "dialing", "answered", "completed", "failed", "cancelled"]
ATTEMPT_STATES: Final[tuple[AttemptState, ...]] = (
    "scheduled",
    "dialing",
    "answered",
    "completed",
    "failed",
    "cancelled",
)
TaskKind = Literal["recall", "unreachable", "medication_not_confirmed", "adverse_reaction"]
TASK_KINDS: Final[tuple[TaskKind, ...]] = ("recall", "unreachable", "medication_not_confirmed", "adverse_reaction")


class FollowupPlan(Base):
    __tablename__ = "followup_plans"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128))
    condition: Mapped[str] = mapped_column(String(32))
    interval_days: Mapped[int] = mapped_column(Integer)
    # Local time of day ("HH:MM") between which the patient may be called, in the hospital's time zone.
    window_start: Mapped[str] = mapped_column(String(5))
    window_end: Mapped[str] = mapped_column(String(5))
    flow: Mapped[str] = mapped_column(String(64))
    # JSON: {"systolic": {"low": 90, "high": 140}, ...}: outside [low, high] is abnormal.
    thresholds: Mapped[str] = mapped_column(Text)
    responsible: Mapped[str | None] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    next_due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(128))

    __table_args__ = (
        CheckConstraint("interval_days BETWEEN 1 AND 366", name="interval"),
        Index("ix_followup_plans_patient_id", "patient_id"),
    )


class OutreachAttempt(Base):
    """One outbound call to place (or placed): the dialer's unit of work and its history."""

    __tablename__ = "outreach_attempts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(24))
    # What the call is for: a follow-up plan, a medication reminder or a vaccination booking (by id).
    subject_id: Mapped[str] = mapped_column(String(36))
    patient_id: Mapped[str] = mapped_column(String(128))
    # The round of calls this attempt belongs to (one per due date) and its number within the round.
    round_id: Mapped[str] = mapped_column(String(36))
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    node: Mapped[str | None] = mapped_column(String(64))
    trunk: Mapped[str | None] = mapped_column(String(64))
    channel_id: Mapped[str | None] = mapped_column(String(64))
    call_id: Mapped[str | None] = mapped_column(String(36))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Why it ended: answered flow outcome, no_answer, busy, unreachable, dnc, identity_failed, ...
    outcome: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        CheckConstraint(
            "state IN ('scheduled', 'dialing', 'answered', 'completed', 'failed', 'cancelled')", name="state"
        ),
        CheckConstraint(
            "kind IN ('followup', 'medication', 'vaccination_reminder', 'adverse_followup', 'complaint_survey')",
            name="kind",
        ),
        UniqueConstraint("round_id", "attempt", name="round_attempt"),
        Index("ix_outreach_attempts_state_not_before", "state", "not_before"),
        Index("ix_outreach_attempts_subject_id", "subject_id"),
    )


class Reading(Base):
    __tablename__ = "readings"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128))
    plan_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("followup_plans.id"))
    attempt_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("outreach_attempts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    # {"value": 182, "unit": "mmHg", "abnormal": true} encrypted: the value and the verdict are clinical.
    value_token: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_readings_patient_id", "patient_id"),)


class ClinicalTask(Base):
    """Work for a person: a physician's recall, a nurse's call to an unreachable patient, an escalation."""

    __tablename__ = "clinical_tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    patient_id: Mapped[str] = mapped_column(String(128))
    # The account it is for (the responsible physician), or only a role (any nurse) when nobody is named.
    assignee: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str | None] = mapped_column(String(36))
    call_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="open")
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    closed_by: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(
            "kind IN ('recall', 'unreachable', 'medication_not_confirmed', 'adverse_reaction')", name="kind"
        ),
        CheckConstraint("status IN ('open', 'done')", name="status"),
        Index("ix_clinical_tasks_status", "status"),
        Index("ix_clinical_tasks_patient_id", "patient_id"),
    )


class DoNotCall(Base):
    __tablename__ = "do_not_call"

    # The keyed blind index of the normalised number (never the number).
    phone_index: Mapped[str] = mapped_column(String(128), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime())
    added_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(200))


class MedicationReminder(Base):
    __tablename__ = "medication_reminders"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128))
    # {"medication": "...", "dose": "..."} encrypted.
    medication_token: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))
    # Local time of day ("HH:MM") of the reminder; "call" needs the patient's double confirmation.
    at_time: Mapped[str] = mapped_column(String(5))
    channel: Mapped[str] = mapped_column(String(8))
    responsible: Mapped[str | None] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    next_due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (CheckConstraint("channel IN ('call', 'sms')", name="channel"),)


class MedicationConfirmation(Base):
    __tablename__ = "medication_confirmations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    reminder_id: Mapped[str] = mapped_column(String(36), ForeignKey("medication_reminders.id"))
    attempt_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("outreach_attempts.id"))
    confirmed: Mapped[bool] = mapped_column(Boolean)
    # The keys pressed at the two questions ("1,1", "1,2", "1,-" …): evidence of what the patient answered.
    keys: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboxMessage(Base):
    """A notification waiting for (or handed to) its channel's gateway: the outbox pattern."""

    __tablename__ = "notification_outbox"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    channel: Mapped[str] = mapped_column(String(8))
    patient_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str | None] = mapped_column(String(36))
    body_token: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey("data_keys.id"))
    state: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    gateway_ref: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(String(500))

    __table_args__ = (
        CheckConstraint("channel IN ('sms')", name="channel"),
        CheckConstraint("state IN ('pending', 'sending', 'sent', 'failed')", name="state"),
        Index("ix_notification_outbox_state_not_before", "state", "not_before"),
    )
