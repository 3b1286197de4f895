"""The ``his_outbox`` table (migration ``0015_his_outbox``) and its synchronous repository.

The repository moves tokens, never message text: :class:`his.outbox.Outbox` encrypts and decrypts, and calls
this through ``asyncio.to_thread``. The queue is sent in ``id`` order; only the head is ever in flight, and the
node sending it holds a lease (``claimed_by``/``claimed_until``) so two nodes never send it at once. A node that
dies mid-send leaves the lease to expire; whoever takes it next sends the same bytes with the same control id.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, func, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from compliance.data_keys import DataKey, DataKeyRecord, data_key_record
from ground.db import DatabaseError, Repository, rowcount
from ground.models import Base, UTCDateTime

TABLE: Final = "his_outbox"
OutboxStatus = Literal["pending", "sent", "failed"]


class OutboxRow(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    control_id: Mapped[str] = mapped_column(String(20))
    message_type: Mapped[str] = mapped_column(String(16))
    patient: Mapped[str | None] = mapped_column(String(128))
    body_enc: Mapped[str] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey(DataKey.id, ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ack_code: Mapped[str | None] = mapped_column(String(2))
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index("uq_his_outbox_control_id", "control_id", unique=True),
        Index("ix_his_outbox_status_id", "status", "id"),
        Index("ix_his_outbox_data_key_id", "data_key_id"),
    )


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox row as stored: the encrypted body and its data key, the state of its delivery."""

    id: int
    control_id: str
    message_type: str
    patient: str | None
    body_enc: str = field(repr=False)
    data_key: DataKeyRecord
    status: OutboxStatus
    attempts: int
    next_attempt_at: datetime
    ack_code: str | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


def _entry(row: OutboxRow, key: DataKey) -> OutboxEntry:
    status: OutboxStatus = "sent" if row.status == "sent" else "failed" if row.status == "failed" else "pending"
    return OutboxEntry(
        id=row.id,
        control_id=row.control_id,
        message_type=row.message_type,
        patient=row.patient,
        body_enc=row.body_enc,
        data_key=data_key_record(key),
        status=status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        ack_code=row.ack_code,
        last_error=row.last_error,
        created_at=row.created_at,
        sent_at=row.sent_at,
    )


class OutboxStore(Repository):
    """Reads and writes ``his_outbox`` rows; each method is one transaction."""

    def add(
        self,
        *,
        control_id: str,
        message_type: str,
        patient: str | None,
        body_enc: str,
        data_key_id: int,
        at: datetime,
    ) -> bool:
        """Queue a message; False (nothing written) if this control id is queued already (idempotent)."""
        try:
            with self._transaction(f"queueing HL7 message {control_id}") as session:
                session.add(
                    OutboxRow(
                        control_id=control_id,
                        message_type=message_type,
                        patient=patient,
                        body_enc=body_enc,
                        data_key_id=data_key_id,
                        status="pending",
                        attempts=0,
                        next_attempt_at=at,
                        created_at=at,
                    )
                )
                session.flush()
        except DatabaseError:
            # The unique control id (the transaction maps the IntegrityError): queued before, by us or a retry.
            if self.get(control_id) is not None:
                return False
            raise
        return True

    def get(self, control_id: str) -> OutboxEntry | None:
        with self._transaction(f"reading HL7 message {control_id}") as session:
            found = session.execute(
                select(OutboxRow, DataKey)
                .join(DataKey, OutboxRow.data_key_id == DataKey.id)
                .where(OutboxRow.control_id == control_id)
            ).first()
            return None if found is None else _entry(found[0], found[1])

    def head(self) -> OutboxEntry | None:
        """The oldest pending message: the only one that may be sent now (order is kept)."""
        with self._transaction("reading the head of the HIS outbox") as session:
            found = session.execute(
                select(OutboxRow, DataKey)
                .join(DataKey, OutboxRow.data_key_id == DataKey.id)
                .where(OutboxRow.status == "pending")
                .order_by(OutboxRow.id)
                .limit(1)
            ).first()
            return None if found is None else _entry(found[0], found[1])

    def claim(self, entry_id: int, node: str, now: datetime, until: datetime) -> bool:
        """Take the lease on a pending row: free, expired, or already this node's (a restarted node takes its own)."""
        with self._transaction(f"claiming HL7 outbox entry {entry_id}") as session:
            result = session.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id == entry_id,
                    OutboxRow.status == "pending",
                    or_(
                        OutboxRow.claimed_until.is_(None),
                        OutboxRow.claimed_until < now,
                        OutboxRow.claimed_by == node,
                    ),
                )
                .values(claimed_by=node, claimed_until=until)
            )
            return rowcount(result) == 1

    def finish(
        self,
        entry_id: int,
        node: str,
        *,
        status: OutboxStatus,
        attempts: int,
        next_attempt_at: datetime,
        ack_code: str | None,
        last_error: str | None,
        sent_at: datetime | None,
    ) -> bool:
        """Record an attempt's result and release the lease; False if this node no longer held it."""
        with self._transaction(f"recording the delivery of HL7 outbox entry {entry_id}") as session:
            result = session.execute(
                update(OutboxRow)
                .where(OutboxRow.id == entry_id, OutboxRow.claimed_by == node, OutboxRow.status == "pending")
                .values(
                    status=status,
                    attempts=attempts,
                    next_attempt_at=next_attempt_at,
                    ack_code=ack_code,
                    last_error=None if last_error is None else last_error[:300],
                    sent_at=sent_at,
                    claimed_by=None,
                    claimed_until=None,
                )
            )
            return rowcount(result) == 1

    def counts(self) -> dict[str, int]:
        with self._transaction("counting the HIS outbox") as session:
            rows = session.execute(select(OutboxRow.status, func.count()).group_by(OutboxRow.status)).all()
            return {str(status): int(n) for status, n in rows}

    def list(self, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxEntry]:
        query = select(OutboxRow, DataKey).join(DataKey, OutboxRow.data_key_id == DataKey.id).order_by(OutboxRow.id)
        if status is not None:
            query = query.where(OutboxRow.status == status)
        with self._transaction("listing the HIS outbox") as session:
            return [_entry(r, k) for r, k in session.execute(query.limit(limit)).all()]

    def last_answered(self) -> OutboxEntry | None:
        """The message the HIS answered last (sent, or set aside on its AE/AR), for ``his status``."""
        with self._transaction("reading the last HIS answer") as session:
            found = session.execute(
                select(OutboxRow, DataKey)
                .join(DataKey, OutboxRow.data_key_id == DataKey.id)
                .where(OutboxRow.ack_code.is_not(None))
                .order_by(func.coalesce(OutboxRow.sent_at, OutboxRow.next_attempt_at).desc(), OutboxRow.id.desc())
                .limit(1)
            ).first()
            return None if found is None else _entry(found[0], found[1])

    def retry(self, control_id: str, at: datetime) -> OutboxStatus | None:
        """Put a failed message back in the queue (attempts from zero, due at ``at``), keeping its place by id.

        Returns the status it had: ``failed`` (now pending again), ``pending`` (made due now), ``sent`` (left
        alone: the HIS has it, sending it again would be a duplicate), None when no such control id.
        """
        with self._transaction(f"retrying HL7 message {control_id}") as session:
            row = session.execute(select(OutboxRow).where(OutboxRow.control_id == control_id)).scalar_one_or_none()
            if row is None:
                return None
            was: OutboxStatus = "sent" if row.status == "sent" else "failed" if row.status == "failed" else "pending"
            if was == "failed":
                row.status, row.attempts, row.next_attempt_at = "pending", 0, at
                row.claimed_by = row.claimed_until = None
            elif was == "pending":
                row.next_attempt_at = at
            return was

    def replay(
        self, at: datetime, *, message_type: str | None = None, since: datetime | None = None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Queue again every failed message (of ``message_type``, created at or after ``since``), as :meth:`retry`
        does one: same stored bytes and control id, attempts from zero, due at ``at``, in their original order.

        Returns the control ids queued again and those matching the filters that the HIS acknowledged (AA): those
        are left alone, sending them again would duplicate them. One transaction.
        """
        query = select(OutboxRow).where(OutboxRow.status.in_(("failed", "sent"))).order_by(OutboxRow.id)
        if message_type is not None:
            query = query.where(OutboxRow.message_type == message_type)
        if since is not None:
            query = query.where(OutboxRow.created_at >= since)
        queued: builtins.list[str] = []  # "list" is a method of this class
        acknowledged: builtins.list[str] = []
        with self._transaction("replaying the HIS outbox") as session:
            for row in session.execute(query).scalars():
                if row.status == "sent":
                    acknowledged.append(row.control_id)
                    continue
                row.status, row.attempts, row.next_attempt_at = "pending", 0, at
                row.claimed_by = row.claimed_until = None
                queued.append(row.control_id)
        return tuple(queued), tuple(acknowledged)
